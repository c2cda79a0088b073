"""Real catalogues as they come (the input side): CSV dialects and encodings, unusable paths, data
without timestamps, implicit feedback, the rating scale and domain attributes, each through the real
loader, input gate and `recaug validate` on small files written here byte by byte."""

from __future__ import annotations

import os
import re

import polars as pl
import pytest

from recaug.augmenters.base import normalise_attributes
from recaug.core.timeparse import format_utc
from recaug.augmenters.base import AugmentInputs
from recaug.augmenters.context import history_context, item_context, item_lines, user_context
from recaug.pipelines import cli
from recaug.core.config import ConfigError, load_config, parse_config
from recaug.pipelines.inputs import prepare_inputs
from recaug.schemas.input_gate import InputSchemaError


def words(texts):
    return [len(t.split()) for t in texts]


def write_books(root, *, sep=";", encoding="latin-1", eol="\r\n", escape=True, timestamps=False):
    """A tiny books catalogue in Book-Crossing's dialect: ';', latin-1, CRLF, backslash-escaped quotes,
    no timestamps, rating 0 = implicit."""
    q = '\\"' if escape else '""'
    users = ["User-ID", "Location", "Age"], [["1", "nyc, new york, usa", "34"], ["2", "porto, portugal", "NULL"],
                                             ["3", "berlin, germany", "51"], ["4", "lyon, france", ""]]
    items = ["ISBN", "Book-Title", "Book-Author", "Year-Of-Publication", "Publisher"], [
        ["0001", f"Caf\u00e9 {q}Noir{q} stories", "Jos\u00e9 Sarmento", "1999", "Edi\u00e7\u00f5es Pi"],
        ["0002", "Dune", "Frank Herbert", "1965", "Ace"],
        ["0003", "Emma", "Jane Austen", "1815", ""],
        ["0004", "Ulysses", "James Joyce", "1922", "Shakespeare and Company"],
    ]
    inter_cols = ["User-ID", "ISBN", "Book-Rating"] + (["When"] if timestamps else [])
    inter = []
    for u in ("1", "2", "3"):
        for k, isbn in enumerate(("0001", "0002", "0003", "0004")):
            row = [u, isbn, str((int(u) * 3 + k * 2) % 11)]
            inter.append(row + ([str(900_000_000 + k)] if timestamps else []))

    def write(name, header, rows):
        def cell(v):
            return f'"{v}"' if (sep in v or '"' in v) else v
        lines = [sep.join(cell(c) for c in header)] + [sep.join(cell(c) for c in r) for r in rows]
        (root / name).write_bytes((eol.join(lines) + eol).encode(encoding))

    write("users.csv", *users)
    write("books.csv", *items)
    write("ratings.csv", inter_cols, inter)


def books_config(root, **over):
    dialect = {"csv_delimiter": ";", "encoding": "latin-1", "escape": "\\"}
    cfg = {
        "name": "books",
        "workdir": str(root / "work"),
        "dataset": {
            "kind": "files",
            "domain": "books",
            "implicit_ratings": [0],
            "users": {"path": "users.csv", **dialect, "columns": {"user_id": "User-ID", "age": "Age", "region": "Location"}},
            "items": {"path": "books.csv", **dialect, "columns": {"item_id": "ISBN", "title": "Book-Title", "year": "Year-Of-Publication"},
                      "attributes": {"author": "Book-Author", "publisher": "Publisher"}},
            "interactions": {"path": "ratings.csv", **dialect,
                             "columns": {"user_id": "User-ID", "item_id": "ISBN", "rating": "Book-Rating"}},
        },
        "input_gate": {"rating_min": 1, "rating_max": 10, "max_quarantine_share": 0.5},
        "split": {"mode": "by_row_order"},
        "engine": {"kind": "fake"},
    }
    for path, value in over.items():
        node = cfg
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return parse_config(cfg, source_path=str(root / "pipeline.yaml"))


def inputs_of(prep, cfg) -> AugmentInputs:
    from recaug.ctr_models.splits import prompt_context

    return AugmentInputs(
        users=pl.from_arrow(prep.users), items=pl.from_arrow(prep.items), history=prompt_context(prep.split),
        domain="books", count_tokens=words,
        extras={"rating_scale": (cfg.input_gate.rating_min, cfg.input_gate.rating_max)},
    )


# --- dialects ----------------------------------------------------------------------------------------


def test_books_dialect_reads_with_config_options_only(tmp_path):
    write_books(tmp_path)
    cfg = books_config(tmp_path)
    prep = prepare_inputs(cfg)
    assert prep.gate.quarantine.num_rows == 0, prep.gate.quarantine.to_pylist()
    items = pl.from_arrow(prep.items)
    first = items.filter(pl.col("item_id") == "0001").row(0, named=True)
    # latin-1 decoded, backslash-escaped quotes unescaped, no '\r' left by CRLF
    assert first["title"] == 'Caf\u00e9 "Noir" stories'
    assert first["attr_author"] == "Jos\u00e9 Sarmento" and first["attr_publisher"] == "Edi\u00e7\u00f5es Pi"
    assert not items["attr_publisher"].str.contains("\r").any()
    assert items.filter(pl.col("item_id") == "0003")["attr_publisher"].to_list() == [None]
    users = pl.from_arrow(prep.users)
    assert users.filter(pl.col("user_id") == "2")["age"].to_list() == [None]  # "NULL" is missing, not a failure


def test_latin1_read_as_utf8_names_the_encoding_option(tmp_path, capsys):
    write_books(tmp_path)
    cfg = books_config(tmp_path, **{"dataset.items.encoding": "utf-8", "input_gate.max_quarantine_share": 0.01})
    (tmp_path / "pipeline.yaml").write_text(__import__("yaml").safe_dump(cfg.model_dump(mode="json", exclude={"source_path"})))
    code = cli.main(["validate", str(tmp_path / "pipeline.yaml")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INPUT_GATE, err
    # one prefix, the quarantine table's path, and the encoding option as the fix
    assert err.count("input gate stopped the run") == 1, err
    assert str(tmp_path / "work" / "validate" / "quarantine.parquet") in err
    assert "set dataset.items.encoding" in err
    q = pl.read_parquet(tmp_path / "work" / "validate" / "quarantine.parquet")
    assert q.filter(pl.col("check") == "title.encoding")["reason"].str.contains("set dataset.items.encoding").all()


def test_wrong_separator_gets_the_delimiter_hint_not_a_ragged_row(tmp_path):
    # a ';' file whose data rows hold ',' (Book-Crossing's Location): the header decides the hint
    write_books(tmp_path)
    cfg = books_config(tmp_path, **{"dataset.users.csv_delimiter": ","})
    with pytest.raises(InputSchemaError) as exc:
        prepare_inputs(cfg)
    msg = str(exc.value)
    assert "parses as one column" in msg and "set dataset.users.csv_delimiter to ';'" in msg
    assert "inside an unquoted value" not in msg


def test_backslash_escapes_without_the_option_say_so_with_the_line(tmp_path):
    write_books(tmp_path)
    (tmp_path / "books.csv").write_bytes(b'ISBN,Book-Title,Book-Author,Year-Of-Publication,Publisher\n'
                                         b'0001,Dune,Frank Herbert,1965,Ace\n'
                                         b'0002,"Say \\"hi\\", then go",Someone,2001,Pub\n')
    cfg = books_config(tmp_path, **{"dataset.items.csv_delimiter": ",", "dataset.items.encoding": "utf-8", "dataset.items.escape": None})
    with pytest.raises(InputSchemaError) as exc:
        prepare_inputs(cfg)
    msg = str(exc.value)
    assert "line 3 of the file" in msg and "backslash-escaped quotes" in msg and "dataset.items.escape" in msg


def test_ragged_row_names_its_line(tmp_path):
    write_books(tmp_path)
    data = (tmp_path / "ratings.csv").read_bytes() + b"1;0002;5;extra\r\n"
    (tmp_path / "ratings.csv").write_bytes(data)
    with pytest.raises(InputSchemaError) as exc:
        prepare_inputs(books_config(tmp_path))
    assert "has 4 fields but the header has 3 (line 14 of the file)" in str(exc.value)
    assert "';' inside an unquoted value" in str(exc.value)


def test_binary_and_compressed_files_are_named(tmp_path):
    import gzip

    write_books(tmp_path)
    (tmp_path / "users.csv").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(InputSchemaError, match="holds binary data"):
        prepare_inputs(books_config(tmp_path))
    (tmp_path / "users.csv").write_bytes(gzip.compress(b"User-ID;Location;Age\r\n1;x;3\r\n"))
    with pytest.raises(InputSchemaError, match="gzip-compressed, not CSV text; decompress"):
        prepare_inputs(books_config(tmp_path))
    (tmp_path / "users.csv").write_bytes("User-ID;Location;Age\r\n1;x;3\r\n".encode("utf-16-le"))
    with pytest.raises(InputSchemaError, match="set dataset.users.encoding: utf-16-le"):
        prepare_inputs(books_config(tmp_path))


def test_duplicate_header_names_are_refused(tmp_path):
    write_books(tmp_path)
    (tmp_path / "books.csv").write_bytes(b"ISBN;Book-Title;Book-Title;Book-Author;Year-Of-Publication;Publisher\r\n0001;A;B;C;1999;P\r\n")
    with pytest.raises(InputSchemaError, match=r"names column\(s\) \['Book-Title'\] more than once"):
        prepare_inputs(books_config(tmp_path))


def test_unusable_paths_are_clear(tmp_path):
    write_books(tmp_path)
    (tmp_path / "adir").mkdir()
    with pytest.raises(InputSchemaError, match="is a directory, not a file; set dataset.users.path"):
        prepare_inputs(books_config(tmp_path, **{"dataset.users.path": "adir"}))
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    with pytest.raises(InputSchemaError, match="Symlink loop|symbolic links"):
        prepare_inputs(books_config(tmp_path, **{"dataset.users.path": "loop_a"}))
    os.symlink(tmp_path / "gone.csv", tmp_path / "dangling.csv")
    with pytest.raises(InputSchemaError, match="symbolic link to nothing"):
        prepare_inputs(books_config(tmp_path, **{"dataset.users.path": "dangling.csv"}))
    if os.geteuid() != 0:  # root reads anything
        (tmp_path / "users.csv").chmod(0)
        with pytest.raises(InputSchemaError, match="cannot be opened: Permission denied"):
            prepare_inputs(books_config(tmp_path))


@pytest.mark.parametrize("value, text", [("", "which is empty"), (";;", "2 characters long"), ("\n", "line break")])
def test_csv_delimiter_must_be_one_character(tmp_path, value, text):
    with pytest.raises(ConfigError, match=text):
        books_config(tmp_path, **{"dataset.users.csv_delimiter": value})


def test_unknown_encoding_and_clashing_dialect_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown text encoding 'latin-9000'"):
        books_config(tmp_path, **{"dataset.users.encoding": "latin-9000"})
    with pytest.raises(ConfigError, match="csv_delimiter and quote are both"):
        books_config(tmp_path, **{"dataset.users.quote": ";"})


# --- data without timestamps -------------------------------------------------------------------------


def test_by_row_order_needs_no_timestamp_and_trains_every_evaluated_user(tmp_path):
    import random

    rng = random.Random(3)
    write_books(tmp_path)
    rows = ["User-ID;ISBN;Book-Rating"]
    for u in range(1, 5):
        for _ in range(rng.randint(1, 12)):
            rows.append(f"{u};000{rng.randint(1, 4)};{rng.randint(0, 10)}")
    (tmp_path / "ratings.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    cfg = books_config(tmp_path)
    prep = prepare_inputs(cfg)
    split = pl.from_arrow(prep.split)
    per_user = split.group_by("user_id").agg(pl.col("split"))
    for user, splits in per_user.iter_rows():
        if "valid" in splits or "test" in splits:
            assert "train" in splits, (user, splits)
    assert {"train", "valid", "test"} <= set(split["split"])
    # prompt rows come first in file order, test rows last (file order = timestamp = row number)
    first = split.filter(pl.col("user_id") == "1").sort("timestamp")["split"].to_list()
    assert first == sorted(first, key=["prompt", "train", "valid", "test"].index)
    assert prep.timestamps == "row_order" and "1970" not in prep.describe_time(prep.data_cutoff, format_utc)


def test_by_row_order_refuses_a_timestamp_mapping(tmp_path):
    with pytest.raises(ConfigError, match="remove dataset.interactions.columns.timestamp"):
        books_config(tmp_path, **{"dataset.interactions.columns": {"user_id": "User-ID", "item_id": "ISBN", "timestamp": "When"}})


def test_missing_timestamp_in_time_mode_points_at_by_row_order(tmp_path):
    write_books(tmp_path)
    with pytest.raises(InputSchemaError, match="set split.mode: by_row_order"):
        prepare_inputs(books_config(tmp_path, **{"split.mode": "time"}))


def test_derived_timestamps_warn_and_summaries_do_not_say_1970_silently(tmp_path, capsys):
    write_books(tmp_path)
    lines = (tmp_path / "ratings.csv").read_text(encoding="latin-1").splitlines()
    out = [lines[0] + ";When"] + [f"{row};{n}" for n, row in enumerate(lines[1:])]
    (tmp_path / "ratings.csv").write_bytes(("\r\n".join(out) + "\r\n").encode("latin-1"))
    cfg = books_config(tmp_path, **{"split.mode": "time",
                                   "dataset.interactions.columns": {"user_id": "User-ID", "item_id": "ISBN", "rating": "Book-Rating", "timestamp": "When"}})
    (tmp_path / "pipeline.yaml").write_text(__import__("yaml").safe_dump(cfg.model_dump(mode="json", exclude={"source_path"})))
    assert cli.main(["validate", str(tmp_path / "pipeline.yaml")]) == 0
    captured = capsys.readouterr()
    assert "they look derived" in captured.err and "split.mode: by_row_order" in captured.err
    cutoff = next(line for line in captured.out.splitlines() if line.startswith("data cutoff"))
    assert "not a date: within 30 days of 1970" in cutoff and "1970-01" not in cutoff


# --- implicit feedback, the scale, attributes ------------------------------------------------------------


def test_implicit_ratings_are_kept_as_unrated_clicks(tmp_path, capsys):
    write_books(tmp_path)
    cfg = books_config(tmp_path)
    prep = prepare_inputs(cfg)
    inter = pl.from_arrow(prep.interactions)
    assert inter.height == 12 and prep.gate.counts["interactions"]["rows_quarantined"] == 0
    zeros = sum(1 for u in (1, 2, 3) for k in range(4) if (u * 3 + k * 2) % 11 == 0)
    assert zeros > 0 and inter["rating"].null_count() == zeros == prep.notes["implicit_ratings"]
    samples = pl.from_arrow(prep.samples).join(inter.select("user_id", "item_id", "rating"), on=["user_id", "item_id"])
    assert samples.filter(pl.col("rating").is_null())["label"].to_list() == [1] * samples["rating"].null_count()
    # without the option, 0 is a rating outside [1, 10]: quarantined, as before
    prep = prepare_inputs(books_config(tmp_path, **{"dataset.implicit_ratings": []}))
    assert prep.gate.counts["interactions"]["by_check"] == {"rating.range": zeros}


def test_history_shows_the_configured_scale_and_item_attributes(tmp_path):
    write_books(tmp_path)
    cfg = books_config(tmp_path, **{"split.prompt_share": 0.75})
    prep = prepare_inputs(cfg)
    inputs = inputs_of(prep, cfg)
    hist = history_context(inputs, ["1", "2", "3"], 500)
    lines = [line for h in hist["history"].to_list() for line in h]
    assert lines and not any("/5" in line for line in lines)
    assert any(re.search(r", rated \d+/10$", line) for line in lines), lines
    assert any("author: Frank Herbert; publisher: Ace" in line for line in lines), lines
    dune = item_lines(inputs.items).filter(pl.col("item_id") == "0002")["item_line"].item()
    assert dune == "Dune (1965; author: Frank Herbert; publisher: Ace)"
    emma = item_lines(inputs.items).filter(pl.col("item_id") == "0003")["item_line"].item()
    assert emma == "Emma (1815; author: Jane Austen)"  # an empty publisher is left out


def test_ratings_show_the_scale_of_the_config(tmp_path, write_config):
    # only keys that always existed: input_gate.rating_max 10 used to print "rated 8/5"
    from recaug.pipelines.engines import make_engine
    from recaug.pipelines.long_job import augment_inputs

    (tmp_path / "u.csv").write_text("user_id,region\nu1,porto\n")
    (tmp_path / "i.csv").write_text("item_id,title\n" + "".join(f"i{k},Book {k}\n" for k in range(6)))
    (tmp_path / "r.csv").write_text("user_id,item_id,rating,timestamp\n" + "".join(f"u1,i{k},{k + 5},{900000000 + k}\n" for k in range(6)))
    path = write_config({"name": "scale", "dataset": {"kind": "files", "users": {"path": "u.csv"}, "items": {"path": "i.csv"},
                                                      "interactions": {"path": "r.csv"}},
                         "input_gate": {"rating_min": 1, "rating_max": 10}, "engine": {"kind": "fake"}})
    cfg = load_config(path)
    prep = prepare_inputs(cfg)
    inputs = augment_inputs(cfg, prep, make_engine(cfg.engine))
    ctx = user_context(inputs, ["u1"], {"history_token_budget": 200}).to_dicts()[0]
    assert ctx["history"] == ["Book 0 (year unknown), rated 5/10", "Book 1 (year unknown), rated 6/10", "Book 2 (year unknown), rated 7/10"]
    assert ctx["region"] == "porto"


def test_contexts_carry_attributes_and_region(tmp_path):
    write_books(tmp_path)
    (tmp_path / "users.csv").write_bytes(b"User-ID;Location;Age;Club\r\n1;nyc, new york, usa;34;readers\r\n2;porto;;\r\n3;x;3;\r\n4;y;4;\r\n")
    cfg = books_config(tmp_path, **{"dataset.users.attributes": {"club": "Club"}})
    prep = prepare_inputs(cfg)
    inputs = inputs_of(prep, cfg)
    items = item_context(inputs, ["0001", "0003"], {}).sort("entity_id").to_dicts()
    assert list(normalise_attributes(items[0]["attributes"]).items()) == [("author", "Jos\u00e9 Sarmento"), ("publisher", "Edi\u00e7\u00f5es Pi")]
    assert normalise_attributes(items[1]["attributes"]) == {"author": "Jane Austen"}
    assert not any(k.startswith("attr_") for k in items[0])
    users = user_context(inputs, ["1", "2"], {"history_token_budget": 100}).sort("entity_id").to_dicts()
    assert users[0]["region"] == "nyc, new york, usa" and normalise_attributes(users[0]["attributes"]) == {"club": "readers"}
    assert normalise_attributes(users[1]["attributes"]) == {}


def test_attribute_columns_are_held_to_the_text_limit(tmp_path):
    write_books(tmp_path)
    cfg = books_config(tmp_path, **{"input_gate.max_text_chars": 12, "input_gate.max_quarantine_share": 1.0})
    prep = prepare_inputs(cfg)
    reasons = prep.gate.reasons("items", "attr_publisher.max_length")
    assert reasons and "attr_publisher is 23 characters long" in reasons[0]


def test_attribute_mapping_to_a_missing_column_names_it(tmp_path):
    write_books(tmp_path)
    with pytest.raises(InputSchemaError, match=r"no column\(s\) \['Writer'\] named in dataset.items.columns/attributes"):
        prepare_inputs(books_config(tmp_path, **{"dataset.items.attributes": {"author": "Writer"}}))
    with pytest.raises(ConfigError, match="must start with a letter"):
        books_config(tmp_path, **{"dataset.items.attributes": {"the author": "Book-Author"}})


# --- messages ----------------------------------------------------------------------------------------------


def test_gate_stop_says_its_prefix_once_and_names_the_quarantine_table(tmp_path, write_config, capsys):
    # plain UTF-8 CSVs and only keys that always existed: the message itself was wrong before
    (tmp_path / "u.csv").write_text("user_id\nu1\nu2\n")
    (tmp_path / "i.csv").write_text("item_id,title\ni1,A\ni2,B\n")
    (tmp_path / "r.csv").write_text("user_id,item_id,rating,timestamp\nu1,i1,9,900000000\nu2,i2,4,900000001\n")
    path = write_config({"name": "stop", "dataset": {"kind": "files", "users": {"path": "u.csv"}, "items": {"path": "i.csv"},
                                                     "interactions": {"path": "r.csv"}}})
    assert cli.main(["validate", str(path)]) == cli.EXIT_INPUT_GATE
    err = capsys.readouterr().err
    assert err.count("input gate stopped the run") == 1, err
    assert str(tmp_path / "work" / "validate" / "quarantine.parquet") in err, err

_LOAD_BOTH = """
from recaug.pipelines import cli
cli._quiet_third_party()
from recaug.encoders.text_encoder import TextEncoder
from recaug.core.config import EncoderConfig, EngineConfig
from recaug.pipelines.engines import make_engine
make_engine(EngineConfig(max_new_tokens=4)).load()
TextEncoder(EncoderConfig(), progress=False)
print("loaded")
"""


@pytest.mark.slow
def test_no_loading_weights_bars_when_stderr_is_not_a_terminal():
    """The packaged LLM and encoder load as the CLI loads them; a log (stderr not a tty) gets no bars."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    proc = subprocess.run([sys.executable, "-c", _LOAD_BOTH], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr and "it/s]" not in proc.stderr, proc.stderr[-2000:]
