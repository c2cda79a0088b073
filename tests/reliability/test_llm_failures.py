"""LLM failure injection: a share of answers comes back malformed, truncated, empty, as errors, or the
engine raises. The run must finish, retry boundedly, put every entity in exactly one of generated /
dead-letter (with the raw output and a reason), count truncation, and let the output gate decide
whether anything is published.

The injector is the product's own `ChaosEngine` (`engine.chaos` in a config), wrapped around the
deterministic fake engine for the broad matrix and the CLI runs, and around the real packaged
SmolLM2 once.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml

from recaug.augmenters.base import AugmentInputs, get_augmenter
from recaug.pipelines import cli
from recaug.pipelines.augment import run_augmenter
from recaug.pipelines.cache import GenerationCache
from recaug.core.config import AugmenterConfig, EngineConfig, load_config
from recaug.pipelines.engines.base import FINISH_ERROR, FINISH_LENGTH, Engine, GenerationRequest
from recaug.pipelines.engines.chaos import MALFORMED_ANSWERS, REQUEST_KINDS, ChaosEngine
from recaug.pipelines.engines.fake import FakeEngine
from recaug.pipelines.runners.local import LocalRunner
from recaug.pipelines.snapshots import list_snapshots, resolve_snapshot, snapshot_root, verify_snapshot
from shop_data import Shop

GOOD_JSON = '{"director": "Jane Doe", "country": "France", "language": "French"}'
TITLE = re.compile(r"^Title: (.+)$", re.MULTILINE)


def json_responder(request: GenerationRequest) -> str:
    return GOOD_JSON


class Counting(Engine):
    """Outermost wrapper: which entity each request sent to the engine belongs to."""

    kind = "counting"

    def __init__(self, inner: Engine, entity_of):
        self.inner, self.entity_of = inner, entity_of
        self.per_entity: Counter[str] = Counter()
        self.calls = 0

    @property
    def model_id(self):
        return self.inner.model_id

    def sampling_key(self):
        return self.inner.sampling_key()

    def load(self):
        self.inner.load()

    def count_tokens(self, texts):
        return self.inner.count_tokens(texts)

    def generate(self, requests):
        self.calls += 1
        for r in requests:
            self.per_entity[self.entity_of(r)] += 1
        return self.inner.generate(requests)


def item_inputs(n: int, count_tokens=None) -> AugmentInputs:
    items = pl.DataFrame(
        {"item_id": [f"i{k}" for k in range(n)], "title": [f"Movie {k}" for k in range(n)],
         "year": [1980 + k for k in range(n)], "genres": [["Drama"], ["Comedy", "Romance"]] * (n // 2) + [["Drama"]] * (n % 2),
         "description": [None] * n},
        schema_overrides={"year": pl.Int32, "description": pl.String},
    )
    users = pl.DataFrame({"user_id": ["u0"], "age": [30], "gender": ["F"], "occupation": ["x"], "region": [None]},
                         schema_overrides={"age": pl.Int32, "region": pl.String})
    history = pl.DataFrame({"user_id": ["u0"], "item_id": ["i0"], "rating": [4.0], "timestamp": [1]})
    return AugmentInputs(users=users, items=items, history=history, domain="movies",
                         count_tokens=count_tokens or (lambda ts: [len(t.split()) for t in ts]))


def run_stage(engine: Engine, inputs: AugmentInputs, tmp_path: Path, max_attempts: int, aug_name="llmrec_item_attributes",
              max_new_tokens: int | None = None, shard_size: int = 4):
    aug = get_augmenter(aug_name)
    counting = Counting(engine, lambda r: TITLE.search(r.messages[1]["content"]).group(1).replace("Movie ", "i"))
    out = run_augmenter(aug, AugmenterConfig(name=aug_name, max_new_tokens=max_new_tokens), inputs, counting,
                        EngineConfig(kind="fake", parse_attempts=max_attempts), GenerationCache(tmp_path / "cache"),
                        LocalRunner(counting).execute, shard_size=shard_size)
    return out, counting


def check_accounting(out, counting: Counting, max_attempts: int, fresh: bool = True) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The invariants every failure mix must keep (`fresh`: no cache hits, every attempt hit the engine)."""
    gen, dead = pl.from_arrow(out.generated), pl.from_arrow(out.dead_letter)
    expected = set(out.expected_entities)
    # every entity ends in exactly one table: none lost, none duplicated
    assert gen["entity_id"].n_unique() == gen.height and dead["entity_id"].n_unique() == dead.height
    assert set(gen["entity_id"]) | set(dead["entity_id"]) == expected
    assert not set(gen["entity_id"]) & set(dead["entity_id"])
    # retries are bounded, and every request the engine saw is accounted for in the final row
    assert max(counting.per_entity.values(), default=0) <= max_attempts
    final = {**dict(zip(gen["entity_id"], gen["attempts"])), **dict(zip(dead["entity_id"], dead["attempts"]))}
    assert max(final.values()) <= max_attempts
    if fresh:
        assert {e: counting.per_entity[e] for e in expected} == final
        assert out.stats.requests == sum(counting.per_entity.values()) == len(expected) + out.stats.retries
    # dead-letter rows carry what the model said and why it was rejected
    assert dead["reason"].str.len_chars().min() > 0 if dead.height else True
    engine_failed = dead.filter(pl.col("finish_reason") == FINISH_ERROR)
    assert engine_failed["reason"].str.starts_with("engine: ").all() and (engine_failed["raw_text"] == "").all()
    # truncation is counted wherever the final answer ended up
    assert out.stats.truncated == gen.filter(pl.col("finish_reason") == FINISH_LENGTH).height + \
        dead.filter(pl.col("finish_reason") == FINISH_LENGTH).height
    assert out.stats.parsed == gen.height and out.stats.dead_letter == dead.height
    return gen, dead


# --- the injector itself ------------------------------------------------------------------------------


def test_chaos_draws_are_deterministic_and_follow_the_shares():
    shares = {"malformed": 0.2, "truncated": 0.1, "empty": 0.1, "error": 0.1}
    keys = [f"key-{n}" for n in range(4000)]
    a, b = ChaosEngine(FakeEngine(), shares, seed=3), ChaosEngine(FakeEngine(), shares, seed=3)
    kinds = [a.failure_of(k) for k in keys]
    assert kinds == [b.failure_of(k) for k in keys]  # same seed and key, same fate
    assert kinds != [ChaosEngine(FakeEngine(), shares, seed=4).failure_of(k) for k in keys]
    counts = Counter(kinds)
    for kind, share in shares.items():
        assert abs(counts[kind] / len(keys) - share) < 0.03, counts
    # the chaos settings are part of the cache key: injected answers never mix with real ones
    assert a.sampling_key() != FakeEngine().sampling_key() and a.model_id.endswith("+chaos")
    with pytest.raises(ValueError, match="add up to more than 1"):
        ChaosEngine(FakeEngine(), {"malformed": 0.6, "empty": 0.6})
    with pytest.raises(ValueError, match="unknown failure kind"):
        ChaosEngine(FakeEngine(), {"garbled": 0.1})


def test_chaos_is_configured_from_the_pipeline_config(write_config):
    path = write_config({"name": "c", "engine": {"kind": "fake", "chaos": {"malformed": 0.25, "exception": 0.5, "seed": 9}}})
    from recaug.pipelines.engines import make_engine

    engine = make_engine(load_config(path).engine)
    assert isinstance(engine, ChaosEngine) and isinstance(engine.inner, FakeEngine)
    assert engine.shares["malformed"] == 0.25 and engine.shares["exception"] == 0.5 and engine.seed == 9
    bad = write_config({"name": "c", "engine": {"kind": "fake", "chaos": {"malformd": 0.1}}}, name="bad.yaml")
    assert cli.main(["validate", str(bad)]) == cli.EXIT_USAGE


# --- the augmentation stage under each failure kind (fake engine) -------------------------------------------

MATRIX = {
    "malformed": {"malformed": 0.4},
    "truncated": {"truncated": 0.4},
    "empty": {"empty": 0.4},
    "error": {"error": 0.4},
    "exception": {"exception": 0.4},
    "mix": {"malformed": 0.15, "truncated": 0.1, "empty": 0.1, "error": 0.05, "exception": 0.1},
    "everything_malformed": {"malformed": 1.0},
    "every_call_raises": {"exception": 1.0},
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_failure_matrix_on_the_augmentation_stage(name, tmp_path):
    max_attempts = 2
    chaos = ChaosEngine(FakeEngine(responder=json_responder), MATRIX[name], seed=11)
    out, counting = run_stage(chaos, item_inputs(40), tmp_path, max_attempts)
    gen, dead = check_accounting(out, counting, max_attempts)
    injected = chaos.injected
    reasons = dead["reason"].to_list()

    if name in REQUEST_KINDS or name == "exception":
        assert injected[name] > 0  # the failure did happen
        assert dead.height > 0 and gen.height > 0  # and the run still produced the good ones
    if name == "malformed":
        assert set(dead["raw_text"]) <= set(MALFORMED_ANSWERS)
        assert all("no JSON object" in r or "not valid JSON" in r or "schema violation" in r for r in reasons)
        assert (dead["attempts"] == max_attempts).all()  # each was retried up to the bound
        assert gen.filter(pl.col("attempts") > 1).height > 0  # and retries rescued others
    if name == "truncated":
        assert out.stats.truncated > 0
        assert (dead["finish_reason"] == FINISH_LENGTH).all()
        assert all(r.endswith("(answer truncated at max_new_tokens)") for r in reasons)
        assert all(GOOD_JSON.startswith(t) and t != GOOD_JSON for t in dead["raw_text"])  # the cut answer is kept
    if name == "empty":
        assert (dead["raw_text"] == "").all() and all("no JSON object" in r for r in reasons)
    if name in ("error", "exception", "every_call_raises"):
        # engine failures are not retried in the run (nor cached: the next run tries again)
        assert (dead["finish_reason"] == FINISH_ERROR).all()
        assert all(r.startswith("engine: ") for r in reasons)
    if name == "exception" or name == "every_call_raises":
        assert any("injected failure: the engine raised" in r for r in reasons)
    if name == "everything_malformed":
        assert gen.height == 0 and dead.height == 40 and (dead["attempts"] == max_attempts).all()
        assert counting.per_entity == Counter({f"i{k}": max_attempts for k in range(40)})
    if name == "every_call_raises":
        assert gen.height == 0 and dead.height == 40 and out.stats.engine_errors == 40
    assert out.stats.parse_rate == pytest.approx(gen.height / 40)


def test_a_rerun_reparses_cached_failures_and_retries_engine_errors(tmp_path):
    """Malformed answers are cached raw outputs (a re-run re-parses them without the LLM); engine
    errors are not cached, so the next run asks again."""
    shares = {"malformed": 0.3, "error": 0.3}
    first, _ = run_stage(ChaosEngine(FakeEngine(responder=json_responder), shares, seed=5), item_inputs(30), tmp_path, 2)
    errors = pl.from_arrow(first.dead_letter).filter(pl.col("finish_reason") == FINISH_ERROR)["entity_id"].to_list()
    assert errors
    again, counting = run_stage(ChaosEngine(FakeEngine(responder=json_responder), shares, seed=5), item_inputs(30), tmp_path, 2)
    check_accounting(again, counting, 2, fresh=False)
    assert set(counting.per_entity) == set(errors)  # only the engine errors went back to the engine


# --- the whole run through the CLI: the output gate decides ---------------------------------------------------


# 12 users, 16 items, 8 ratings each, in recaug's own column names (no mapping needed)
SHOP = Shop(style="canonical", n_users=12, n_items=16, per_user=8, seed=None, item_stride=3, first_age=20,
            genres=("Drama|Comedy",), user_columns=("user_id", "age"), item_columns=("item_id", "title", "genres"))


def write_shop(root: Path) -> None:
    SHOP.write(root)


def shop_config(root: Path, chaos: dict | None, gate: dict | None = None) -> Path:
    cfg = {
        "name": "chaos_shop",
        "workdir": str(root / "work"),
        "dataset": SHOP.dataset(),
        "engine": {"kind": "fake", **({"chaos": chaos} if chaos else {})},
        "runner": {"shard_size": 4},
        "augmenters": [{"name": "kar_item_knowledge"}, {"name": "kar_user_preference"}],
        "output_gate": {"min_coverage": 0.7, "min_parse_rate": 0.8, "max_dead_letter_share": 0.2, **(gate or {})},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def observed(run_dir: Path) -> dict[str, tuple[float, float]]:
    """augmenter -> (parse rate, dead-letter share), read back from the run's own tables."""
    out = {}
    for name in ("kar_item_knowledge", "kar_user_preference"):
        gen = pl.read_parquet(run_dir / "generated" / f"{name}.parquet").height
        dead = pl.read_parquet(run_dir / "dead_letter" / f"{name}.parquet").height
        expected = pl.read_parquet(run_dir / "expected" / f"{name}.parquet").height
        assert gen + dead == expected
        out[name] = (gen / expected, dead / expected)
    return out


def gate_allows(rates: dict[str, tuple[float, float]], cfg) -> bool:
    g = cfg.output_gate
    return all(p >= g.min_parse_rate and d <= g.max_dead_letter_share and 1 - d >= g.min_coverage for p, d in rates.values())


@pytest.mark.usefixtures("fake_encoder")  # not a test of encoding
def test_output_gate_publishes_a_mostly_good_run_and_blocks_a_bad_one(tmp_path, capsys):
    write_shop(tmp_path)
    # 1. a few failures: published, with its dead letters in the snapshot. These rates fail ~18% of the
    # answers; of the shop's 12 users that is 2-3 (which ones depends on the prompts), so the floors
    # leave room for 3
    low = shop_config(tmp_path, {"empty": 0.04, "error": 0.04, "truncated": 0.25, "malformed": 0.1, "seed": 1},
                      gate={"min_parse_rate": 0.7, "max_dead_letter_share": 0.3})
    code = cli.main(["run", str(low)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert code == 0, err
    cfg = load_config(low)
    root = snapshot_root(cfg)
    rates = observed(cfg.workdir_path() / "runs" / resolve_snapshot(root, "latest").manifest["run_id"])
    assert gate_allows(rates, cfg) and any(d > 0 for _, d in rates.values())  # failures happened and were tolerated
    first = resolve_snapshot(root, "latest")
    manifest = first.manifest
    assert manifest["model"]["id"] == "fake/echo+chaos"
    assert manifest["augmentation"]["kar_item_knowledge"]["truncated"] > 0
    dead_rows = sum(manifest["tables"][f"dead_letter/{n}"]["rows"] for n in ("kar_item_knowledge", "kar_user_preference"))
    assert dead_rows > 0 and re.search(r"dead-letter\s+[1-9]", out)

    # 2. most answers fail: the run finishes, the gate blocks it, nothing is published
    high = shop_config(tmp_path, {"empty": 0.35, "error": 0.35, "seed": 2})
    code = cli.main(["run", str(high)])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_OUTPUT_GATE and "Traceback" not in err
    assert "nothing published" in err and re.search(r"FAIL (parse_rate|dead_letter_share|coverage)", err)
    blocked_dir = Path(re.search(r"the gate report is in (\S+)", err).group(1))
    rates = observed(blocked_dir)
    assert not gate_allows(rates, cfg)
    dead = pl.read_parquet(blocked_dir / "dead_letter" / "kar_item_knowledge.parquet")
    assert dead.height > 0 and (dead["reason"].str.len_chars() > 0).all()
    assert set(dead["reason"].str.extract(r"^(engine: injected failure|empty answer)", 1).drop_nulls()) == {
        "engine: injected failure", "empty answer"}
    gate = json.loads((blocked_dir / "output_gate.json").read_text())
    assert gate["success"] is False
    # the previous snapshot is still the latest, whole and unchanged
    assert [s.snapshot_id for s in list_snapshots(root)] == [first.snapshot_id]
    assert resolve_snapshot(root, "latest").snapshot_id == first.snapshot_id
    assert verify_snapshot(root, first.snapshot_id) == []

    # 3. an engine that raises on every call: dead letters and a clear summary, not a traceback
    broken = shop_config(tmp_path, {"exception": 1.0, "seed": 3})
    code = cli.main(["run", str(broken)])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_OUTPUT_GATE and "Traceback" not in err
    assert re.search(r"kar_item_knowledge\s+16 entities .* parsed\s+0\.0%\s+dead-letter\s+16", out), out
    assert "FAIL coverage" in err and "nothing published" in err
    blocked_dir = Path(re.search(r"the gate report is in (\S+)", err).group(1))
    dead = pl.read_parquet(blocked_dir / "dead_letter" / "kar_user_preference.parquet")
    assert dead.height == 12 and dead["reason"].str.contains("injected failure: the engine raised").all()
    assert resolve_snapshot(root, "latest").snapshot_id == first.snapshot_id


def test_preview_shows_engine_failures_instead_of_crashing(tmp_path, capsys):
    write_shop(tmp_path)
    path = shop_config(tmp_path, {"exception": 1.0})
    code = cli.main(["preview", str(path), "kar_item_knowledge", "-n", "3"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    assert out.count("ERROR: ") == 3 and "injected failure: the engine raised" in out
    assert out.count("--- prompt [user]") == 3  # the prompts are still shown


# --- the real packaged model behind the injector ---------------------------------------------------------------


@pytest.mark.slow
def test_failure_injection_around_the_real_model(tmp_path):
    from recaug.pipelines.engines.transformers_engine import TransformersEngine

    real = TransformersEngine(EngineConfig(max_new_tokens=24, batch_size=8))
    chaos = ChaosEngine(real, {"malformed": 0.25, "truncated": 0.25, "empty": 0.1, "error": 0.1, "exception": 0.1}, seed=4)
    out, counting = run_stage(chaos, item_inputs(6, real.count_tokens), tmp_path, max_attempts=2, max_new_tokens=24)
    gen, dead = check_accounting(out, counting, 2)
    assert sum(chaos.injected.values()) > 0 and gen.height + dead.height == 6
    # whatever the model itself wrote that did not parse is in the dead letters too, with its reason
    for row in dead.iter_rows(named=True):
        assert row["reason"]
        assert row["raw_text"] or row["finish_reason"] == FINISH_ERROR or "no JSON object" in row["reason"]
    # the model's real answers passed through where nothing was injected
    assert all(r not in MALFORMED_ANSWERS for r in gen["raw_text"])


def test_an_unreachable_server_stops_the_run_with_a_clear_message(tmp_path, capsys):
    """EngineError means nothing can work: the local run stops at once with exit 2 and the engine's
    message, instead of dead-lettering every shard after its retries."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_shop(tmp_path)
    path = shop_config(tmp_path, None)
    data = yaml.safe_load(path.read_text())
    data["engine"] = {"kind": "http", "model": "any", "base_url": f"http://127.0.0.1:{port}/v1", "http_retries": 0, "timeout_s": 5}
    path.write_text(yaml.safe_dump(data))
    code = cli.main(["run", str(path)])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE and "Traceback" not in err
    assert f"cannot reach http://127.0.0.1:{port}" in err and "check engine.base_url" in err
    assert not (tmp_path / "work" / "snapshots" / "LATEST").exists()
