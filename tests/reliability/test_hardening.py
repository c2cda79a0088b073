"""Hardening: one or more cases per class of fault found by an independent attack on the product.

Each case is an example of our own, run through the real CLI. The classes:

- config loading: YAML alias bombs, anchors, keys given twice, Python tags, deep nesting, huge values
  (bounded error messages), `workdir` format fields, `workdir: /`, a workdir that is a file, ranges
  that cannot hold (exit 2, one clear message, fast);
- identity and values in the input gate: ids with zero-width or bidi-control characters, ids that
  differ only by Unicode normalisation, NaN ratings, ages out of range (quarantined with the reason);
- exit codes come from the error's class (README's table is the one in recaug/errors.py);
- `recaug schedule tick` while a manual run holds the lock: "nothing to do", exit 0, nothing recorded.

Full and read-only workdirs are in test_full_disk.py; input and output text limits in test_text_limits.py.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import re
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from recaug.core import errors
from recaug.pipelines import cli

_spec = importlib.util.spec_from_file_location("_bad_input_corpus", Path(__file__).with_name("test_bad_input.py"))
_corpus = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(_corpus)
base_shop, Shop = _corpus.base_shop, _corpus.Shop

REPO = Path(__file__).resolve().parents[2]


def validate(shop: Shop, tmp_path: Path, capsys) -> tuple[int, str, str]:
    cfg = shop.write(tmp_path)
    code = cli.main(["validate", str(cfg)])  # an unexpected error escapes here and fails the case
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def quarantine(tmp_path: Path) -> pl.DataFrame:
    return pl.read_parquet(tmp_path / "work" / "validate" / "quarantine.parquet")


# --- config loading ------------------------------------------------------------------------------------

BILLION_LAUGHS = """\
name: bomb
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""

# a bomb hidden in a free-form mapping, where no model field would reject the expanded value
BOMB_IN_OPTIONS = """\
name: bomb
augmenters:
  - name: kar_item_knowledge
    options: {x: &x [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]]}
  - name: kar_user_preference
    options: {y: [*x, *x, *x, *x, *x, *x, *x, *x]}
"""

CONFIG_CASES = {
    # name: (config text written after the shop's valid config is replaced, expected message part)
    "billion_laughs": (BILLION_LAUGHS, "YAML anchors (&a) are not allowed"),
    "alias_bomb_in_free_form_options": (BOMB_IN_OPTIONS, "YAML anchors (&x) are not allowed"),
    "alias_without_anchor": ("name: x\nworkdir: *w\n", "YAML aliases (*w) are not allowed"),
    "key_given_twice": ("name: x\nname: y\n", "line 2: key name is given twice (first on line 1)"),
    "nested_key_given_twice": ("name: x\ninput_gate:\n  rating_min: 1\n  rating_min: 2\n", "key rating_min is given twice"),
    "python_tag": ("name: !!python/object/apply:os.system ['echo pwned']\n", "the YAML tag !!python/object/apply:os.system"),
    "local_tag": ("name: !shell x\n", "the YAML tag !shell is not allowed"),
    "deep_nesting": ("name: x\nengine: {vllm_args: {k: " + "[" * 5000 + "]" * 5000 + "}}\n", "nested more than 32 levels"),
    "workdir_attribute_field": ("name: x\nworkdir: '{name.__class__}'\n", "{name.__class__} is not allowed in workdir"),
    "workdir_item_field": ("name: x\nworkdir: '{name[0]}'\n", "{name[0]} is not allowed in workdir"),
    "workdir_positional_field": ("name: x\nworkdir: 'w/{}'\n", "{} is not allowed in workdir"),
    "workdir_numbered_field": ("name: x\nworkdir: 'w/{0}'\n", "{0} is not allowed in workdir"),
    "workdir_unknown_field": ("name: x\nworkdir: 'w/{user}'\n", "{user} is not allowed in workdir"),
    "workdir_conversion": ("name: x\nworkdir: 'w/{name!r}'\n", "{name!r} is not allowed in workdir"),
    "workdir_format_spec": ("name: x\nworkdir: 'w/{name:>99999999}'\n", "{name:>99999999} is not allowed"),
    "workdir_unbalanced_brace": ("name: x\nworkdir: 'w/{name'\n", "is not a valid template"),
    "workdir_root": ("name: x\nworkdir: /\n", "is the root of the file system"),
    "workdir_dots_to_root": ("name: x\nworkdir: /../../..\n", "is the root of the file system"),
    "rating_min_above_max": ("name: x\ninput_gate: {rating_min: 5, rating_max: 1}\n",
                             "input_gate.rating_min (5) is above input_gate.rating_max (1)"),
    "age_min_above_max": ("name: x\ninput_gate: {age_min: 90, age_max: 10}\n", "input_gate.age_min (90) is above"),
    "rating_bound_nan": ("name: x\ninput_gate: {rating_max: .nan}\n", "input_gate.rating_max"),
    "output_text_bounds_swapped": ("name: x\noutput_gate: {min_text_chars: 50, max_text_chars: 10}\n",
                                   "output_gate.min_text_chars (50) is above output_gate.max_text_chars (10)"),
    "norm_bounds_swapped": ("name: x\noutput_gate: {min_norm: 2, max_norm: 1}\n", "output_gate.min_norm (2) is above"),
    "huge_bad_value": ("name: x\naugmenters: [{name: kar_item_knowledge, max_entities: '" + "9x" * 300_000 + "'}]\n",
                       "augmenters.0.max_entities"),
    "file_over_one_mib": ("name: x\n# " + "pad " * 300_000 + "\n", "larger than 1024 KiB"),
    "not_utf8": (b"name: caf\xe9\n", "is not UTF-8 text"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_config_faults_are_one_clear_usage_error(name, tmp_path, capsys):
    text, expected = CONFIG_CASES[name]
    shop = base_shop()
    cfg = tmp_path / "pipeline.yaml"
    shop.write(tmp_path)  # the data files, so that only the config is at fault
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.perf_counter()
    code = cli.main(["validate", str(cfg)])
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert code == errors.EXIT_USAGE, (code, err[:500])
    assert err.startswith("recaug: ") and expected in err, err[:2000]
    assert "Traceback" not in err
    # bounded: a bad value is cut when shown, whatever its size; nothing hangs or expands
    assert len(err) < 3000, len(err)
    assert seconds < 30, seconds


def test_workdir_that_is_a_file_is_refused(tmp_path, capsys):
    shop = base_shop()
    cfg = shop.write(tmp_path)
    (tmp_path / "work").write_text("I am a file")
    code = cli.main(["validate", str(cfg)])
    err = capsys.readouterr().err
    assert code == errors.EXIT_USAGE and f"workdir {tmp_path / 'work'} is an existing file" in err, err


def test_workdir_literal_braces_and_name_field_still_work(tmp_path, capsys):
    shop = base_shop()
    cfg = shop.write(tmp_path)
    text = cfg.read_text().replace(f"workdir: {tmp_path / 'work'}", f"workdir: '{tmp_path}/{{{{x}}}}-{{name}}'")
    cfg.write_text(text)
    assert cli.main(["validate", str(cfg)]) == 0, capsys.readouterr().err
    assert (tmp_path / "{x}-badshop" / "validate" / "quarantine.parquet").is_file()


# --- identity and values in the input gate ----------------------------------------------------------------


def _reasons(q: pl.DataFrame, table: str, check: str) -> list[str]:
    return q.filter((pl.col("table") == table) & (pl.col("check") == check))["reason"].to_list()


@pytest.mark.parametrize(
    "table,column,row,value,shown",
    [
        ("users", "user_id", 3, "u3\u200b", "U+200B ZERO WIDTH SPACE"),
        ("items", "item_id", 5, "i5\u202e", "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ("items", "item_id", 6, "\u2066i6\u2069", "U+2066 LEFT-TO-RIGHT ISOLATE"),
        ("users", "user_id", 7, "u\ufeff7", "U+FEFF ZERO WIDTH NO-BREAK SPACE"),
        ("interactions", "item_id", 2, "i\u200d2", "U+200D ZERO WIDTH JOINER"),
    ],
)
def test_ids_with_invisible_characters_are_quarantined(table, column, row, value, shown, tmp_path, capsys):
    shop = base_shop()
    shop.set(table, row, column, value)
    code, out, err = validate(shop, tmp_path, capsys)
    assert code == 0, err
    q = quarantine(tmp_path)
    reasons = _reasons(q, table, f"{column}.invisible_chars")
    assert len(reasons) == 1 and shown in reasons[0] and "would look like another id" in reasons[0], q.to_dicts()
    assert q.filter((pl.col("table") == table) & (pl.col("check") == f"{column}.invisible_chars"))["row_number"].to_list() == [row]


def test_an_invisible_twin_of_an_id_is_not_a_second_entity(tmp_path, capsys):
    """"u1" and "u1<ZWSP>" are two rows for the eye and were two users before; now the twin is out and
    its interactions fail referential integrity, naming why."""
    shop = base_shop()
    shop.append("users", {"user_id": "u1\u200b", "age": "30", "gender": "F", "occupation": "writer"})
    shop.set("interactions", 0, "user_id", "u1\u200b")
    code, out, err = validate(shop, tmp_path, capsys)
    assert code == 0, err
    q = quarantine(tmp_path)
    assert _reasons(q, "users", "user_id.invisible_chars")
    ref = _reasons(q, "interactions", "user_id.in_users")
    assert ref and "its users row was quarantined (user_id.invisible_chars" in ref[0], ref


def test_ids_are_nfc_normalised_so_twins_collapse_and_references_join(tmp_path, capsys):
    shop = base_shop()
    shop.set("items", 3, "item_id", "Caf\u00e9")  # composed
    shop.append("items", {"item_id": "Cafe\u0301", "title": "Twin", "year": "2001", "genres": "Drama",
                          "description": "decomposed é"})
    shop.frames["interactions"] = shop.frames["interactions"].with_columns(
        pl.when(pl.col("item_id") == "i3").then(pl.lit(" Cafe\u0301 ")).otherwise(pl.col("item_id")).alias("item_id")
    )
    code, out, err = validate(shop, tmp_path, capsys)
    assert code == 0, err
    q = quarantine(tmp_path)
    dup = _reasons(q, "items", "item_id.unique")
    assert dup == ["duplicate item_id 'Café' (first at row 3)"], q.to_dicts()
    assert not _reasons(q, "interactions", "item_id.in_items")  # decomposed, padded references join the item
    assert "items.item_id.nfc_normalised in 1 value(s)" in out and "interactions.item_id.nfc_normalised" in out, out


@pytest.mark.parametrize("source", ["csv_text", "parquet_float"])
def test_nan_rating_is_quarantined_not_a_click(source, tmp_path, capsys):
    shop = base_shop()
    if source == "csv_text":
        shop.set("interactions", 4, "rating", "NaN")
        shop.set("interactions", 9, "rating", " nan ")
        rows = [4, 9]
    else:
        inter = shop.frames["interactions"]
        ratings = [float(r) for r in inter["rating"]]
        ratings[4] = float("nan")
        ratings[9] = None
        _corpus._parquet(shop, "interactions", pa.table({
            "user_id": inter["user_id"].to_list(), "item_id": inter["item_id"].to_list(),
            "rating": pa.array(ratings, pa.float64()), "timestamp": pa.array([int(t) for t in inter["timestamp"]]),
        }))
        rows = [4]  # row 9 is a real null: no rating, a click
    code, out, err = validate(shop, tmp_path, capsys)
    assert code == 0, err
    q = quarantine(tmp_path).filter(pl.col("check") == "rating.type")
    assert q["row_number"].to_list() == rows, q.to_dicts()
    assert all("is NaN, not a rating" in r for r in q["reason"]), q["reason"].to_list()


def test_nan_rating_never_becomes_a_positive_label(tmp_path):
    from recaug.core.config import load_config
    from recaug.pipelines.inputs import prepare_inputs

    shop = base_shop()
    shop.set("interactions", 4, "rating", "NaN")
    cfg = load_config(shop.write(tmp_path))
    prep = prepare_inputs(cfg)
    bad = shop.frames["interactions"].row(4, named=True)
    kept = pl.from_arrow(prep.split).filter((pl.col("user_id") == bad["user_id"]) & (pl.col("item_id") == bad["item_id"])
                                            & (pl.col("timestamp") == int(bad["timestamp"])))
    assert kept.height == 0  # not in any split, so in no sample with label 1
    assert prep.gate.counts["interactions"]["rows_quarantined"] == 1


@pytest.mark.parametrize("age,reason", [("-3", "age -3 is outside [0, 130]"), ("200", "age 200 is outside [0, 130]")])
def test_age_out_of_range_is_quarantined(age, reason, tmp_path, capsys):
    shop = base_shop()
    shop.set("users", 2, "age", age)
    code, out, err = validate(shop, tmp_path, capsys)
    assert code == 0, err
    assert _reasons(quarantine(tmp_path), "users", "age.range") == [reason + " (input_gate.age_min, age_max)"]


def test_age_bounds_come_from_the_config(tmp_path, capsys):
    shop = base_shop()
    shop.config["input_gate"].update(age_min=21, age_max=25)
    code, out, err = validate(shop, tmp_path, capsys)
    assert code == 0, err
    rows = quarantine(tmp_path).filter(pl.col("check") == "age.range")["row_number"].to_list()
    assert rows == [0, 6, 7, 8, 9]  # ages 20..29: 20 and 26..29 are outside [21, 25]


# --- exit codes come from the error's class ----------------------------------------------------------------


def test_readme_exit_code_table_is_the_one_in_errors():
    readme = (REPO / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("Exit codes"))
    text = " ".join((line + " " + readme.split(line, 1)[1]).split()).split(" unexpected.", 1)[0] + " unexpected"
    documented = {int(code): what for code, what in re.findall(r"(\d) ([a-z][^,.]*)", text)}
    assert documented[errors.EXIT_OK].startswith("ok")
    assert documented[errors.EXIT_USAGE].startswith("usage or config")
    assert documented[errors.EXIT_INPUT].startswith("input unusable")
    assert documented[errors.EXIT_INPUT_GATE].startswith("input gate")
    assert documented[errors.EXIT_OUTPUT_GATE].startswith("output gate")
    assert documented[errors.EXIT_LOCKED].startswith("another run holds the lock")
    assert documented[errors.EXIT_WORKDIR].startswith("workdir full or not writable")
    assert documented[errors.EXIT_UNEXPECTED].startswith("unexpected")
    classes = {errors.UsageError: 2, errors.InputUnusable: 3, errors.InputGateStopped: 4, errors.NothingPublished: 5,
               errors.Locked: 6, errors.WorkdirUnwritable: 7}
    assert {cls: cls.exit_code for cls in classes} == classes


def test_every_product_error_maps_by_class_not_name():
    """The product's errors sit in the hierarchy; the CLI has no name or message matching left."""
    from recaug.augmenters.base import AugmenterError, UnknownAugmenter
    from recaug.core.config import ConfigError
    from recaug.pipelines.engines.base import EngineError
    from recaug.core.locking import RunLocked
    from recaug.pipelines.long_job import OutputGateBlocked
    from recaug.core.packaged import PackagedAssetMissing
    from recaug.pipelines.snapshots import SnapshotLocked, SnapshotNotFound
    from recaug.prompts import PromptError
    from recaug.schemas.input_gate import InputSchemaError, QuarantineThresholdExceeded
    from recaug.schemas.output_gate import OutputGateFailed

    expected = {ConfigError: 2, AugmenterError: 2, UnknownAugmenter: 2, EngineError: 2, PackagedAssetMissing: 2,
                SnapshotNotFound: 2, PromptError: 2, InputSchemaError: 3, QuarantineThresholdExceeded: 4,
                OutputGateBlocked: 5, OutputGateFailed: 5, RunLocked: 6, SnapshotLocked: 6}
    assert {cls: cls.exit_code for cls in expected} == expected
    assert all(issubclass(cls, errors.RecaugError) for cls in expected)
    source = (REPO / "pipelines" / "cli.py").read_text()
    assert not re.search(r"= type\(exc\)\.__name__|__name__\s*(==|in)\s*[(\"']Input|in str\(exc\)", source)


def test_a_subclass_of_a_product_error_gets_its_code(tmp_path, capsys, monkeypatch):
    class SomethingNew(errors.InputUnusable):
        pass

    def boom(args):
        raise SomethingNew("a brand-new reason")

    monkeypatch.setattr(cli, "cmd_validate", boom)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), "validate", boom))
    assert cli.main(["validate", "x.yaml"]) == errors.EXIT_INPUT
    assert capsys.readouterr().err == "recaug: input unusable: a brand-new reason\n"


def _with_func(parser, verb, func):
    sub = next(a for a in parser._actions if a.dest == "verb")
    sub.choices[verb].set_defaults(func=func)
    return parser


def test_unknown_augmenter_in_only_is_a_usage_error(tmp_path, capsys):
    cfg = base_shop().write(tmp_path)
    code = cli.main(["run", str(cfg), "--only", "kar_nope"])
    err = capsys.readouterr().err
    assert code == errors.EXIT_USAGE and "augmenter(s) ['kar_nope'] are not in the config" in err, err


# --- schedule tick while a manual run holds the lock --------------------------------------------------------


def _hold_run_lock(path: str, ready, release) -> None:
    from recaug.core.locking import RunLock

    with RunLock(Path(path)):
        ready.set()
        release.wait(120)


def test_schedule_tick_while_a_manual_run_holds_the_lock_does_nothing(tmp_path, capsys):
    cfg_path = base_shop().write(tmp_path)
    work = tmp_path / "work"
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_run_lock, args=(str(work / "run.lock"), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        code = cli.main(["schedule", "tick", str(cfg_path)])
        out, err = capsys.readouterr()
    finally:
        release.set()
        holder.join(60)
    assert code == errors.EXIT_OK, err
    assert "nothing to do: another run holds the lock" in out and "Traceback" not in err, (out, err)
    state = json.loads((work / "schedule" / "state.json").read_text())
    assert state["long"].get("status") is None and not state["history"], state  # nothing recorded: still due
    assert "DUE" in out  # the long job was due and stays due for the next tick


# --- input and output limits agree ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_title_exactly_at_the_input_limit_is_one_dead_letter_not_a_failed_publish(tmp_path, capsys):
    """A title of exactly input_gate.max_text_chars passes the input gate; kar_item_knowledge encodes
    "<title>. <answer>", longer than output_gate.max_text_chars (the same default). That item becomes
    the augmenter's dead letter with the reason, and everything else is published."""
    from recaug.core.config import InputGateConfig, OutputGateConfig, load_config
    from recaug.pipelines.snapshots import read_table, snapshot_root

    limit = InputGateConfig().max_text_chars
    assert limit == OutputGateConfig().max_text_chars  # the defaults agree
    shop = base_shop()
    for i in range(12, 40):  # enough items that one dead letter stays above output_gate.min_coverage
        shop.append("items", {"item_id": f"i{i}", "title": f"Film {i}", "year": "2000", "genres": "Drama",
                              "description": "A film."})
    title = ("An extremely long title " * limit)[:limit]
    shop.set("items", 3, "title", title)
    cfg_path = shop.write(tmp_path)
    code = cli.main(["run", str(cfg_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "published snapshot" in out
    root = snapshot_root(load_config(cfg_path))
    dead = pl.from_arrow(read_table(root, "latest", "dead_letter/kar_item_knowledge"))
    assert dead["entity_id"].to_list() == ["i3"], dead.to_dicts()
    assert f"above output_gate.max_text_chars = {limit:,}" in dead["reason"][0]
    vectors = pl.from_arrow(read_table(root, "latest", "embeddings/kar_item_knowledge"))
    assert "i3" not in vectors["entity_id"].to_list() and vectors.height == 39


def test_a_storage_error_outside_any_named_stage_is_still_exit_7(tmp_path, capsys, monkeypatch):
    """E.g. a CTR checkpoint written to a full disk: the CLI names the workdir of the config and the file."""
    import errno as errno_mod

    cfg = base_shop().write(tmp_path)
    target = tmp_path / "work" / "models" / "ckpt.pt"

    def full(args):
        raise OSError(errno_mod.ENOSPC, "No space left on device", str(target))

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), "train", full))
    assert cli.main(["train", str(cfg)]) == errors.EXIT_WORKDIR
    err = capsys.readouterr().err
    assert err == (f"recaug: workdir {tmp_path / 'work'} is full: recaug train writing {target} failed (No space left "
                   "on device); nothing was published; free space and re-run\n"), err
