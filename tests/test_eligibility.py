"""User augmenters never prompt a user without prompt history, and the counts add up.

Issue 14 point 1 / issue 16 (silently wrong): a user with no interactions, one interaction when the
template needs more, all rows quarantined, or whose rows all belong to someone else, used to get a
prompt with an empty history and a profile the model invented. Such users are counted apart
(`no_history`), never sent to the engine, and not expected by the output gate.
Issue 14 point 9: identical prompts go to the engine once; distinct prompts = cached + LLM calls.
"""

import json

import polars as pl
import pytest

from recaug.augmenters.base import AugmentInputs, get_augmenter
from recaug.pipelines.augment import run_augmenter
from recaug.pipelines.cache import GenerationCache
from recaug.core.config import AugmenterConfig, EngineConfig
from recaug.pipelines.engines.base import Engine, GenerationResult
from recaug.pipelines.runners.local import LocalRunner

USER_AUGMENTERS = ["kar_user_preference", "llmrec_user_profile", "once_user_profiler", "llmrec_implicit_feedback"]


class RecordingEngine(Engine):
    """Answers every prompt with a fixed text and keeps what it was sent."""

    kind = "recording"

    def __init__(self, answer):
        self.answer = answer
        self.prompts: list[str] = []

    @property
    def model_id(self):
        return "recording@1"

    def sampling_key(self):
        return {"temperature": 0.0}

    def load(self):
        pass

    def generate(self, requests):
        self.prompts += ["\n".join(m["content"] for m in r.messages) for r in requests]
        return [GenerationResult(r.key, self.answer, 10, 5, "stop", 0.01) for r in requests]


ANSWERS = {
    "kar_user_preference": "They like light comedies and dislike long dramas.",
    "llmrec_user_profile": '{"age": null, "gender": "unknown", "liked_genres": ["Comedy"], "disliked_genres": [], '
                           '"liked_directors": [], "country": "unknown", "language": "unknown"}',
    "once_user_profiler": '{"topics": ["Comedy"], "regions": []}',
    "llmrec_implicit_feedback": '{"liked": 0, "disliked": 1}',
}


@pytest.fixture
def inputs():
    items = pl.DataFrame(
        {"item_id": [f"i{n}" for n in range(12)], "title": [f"Movie {n}" for n in range(12)],
         "year": [1990 + n for n in range(12)], "genres": [["Comedy"], ["Drama"]] * 6, "description": [None] * 12},
        schema_overrides={"year": pl.Int32, "description": pl.String},
    )
    users = pl.DataFrame(
        {"user_id": ["u_full", "u_two", "u_one", "u_none", "u_quarantined", "u_elsewhere"], "age": [30] * 6,
         "gender": ["M"] * 6, "occupation": ["x"] * 6, "region": [None] * 6},
        schema_overrides={"age": pl.Int32, "region": pl.String},
    )
    # u_none has no row; u_quarantined's rows were all quarantined upstream (so none reach the
    # history); u_elsewhere's rows were all filed under another id (here: "U_ELSEWHERE " - not theirs)
    rows = [("u_full", f"i{n}") for n in range(5)] + [("u_two", "i1"), ("u_two", "i2"), ("u_one", "i3")]
    rows += [("U_ELSEWHERE ", "i4"), ("U_ELSEWHERE ", "i5")]
    history = pl.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                            "rating": [4.0] * len(rows), "timestamp": list(range(len(rows)))})
    return AugmentInputs(users=users, items=items, history=history, domain="movies",
                         count_tokens=lambda ts: [len(t.split()) for t in ts])


def _run(name, inputs, engine, cache, **cfg):
    return run_augmenter(get_augmenter(name), AugmenterConfig(name=name, **cfg), inputs, engine,
                         EngineConfig(kind="fake", parse_attempts=1), cache, LocalRunner(engine).execute, shard_size=4)


@pytest.mark.parametrize("name", USER_AUGMENTERS)
def test_users_without_prompt_history_are_never_prompted(tmp_path, inputs, name):
    engine = RecordingEngine(ANSWERS[name])
    out = _run(name, inputs, engine, GenerationCache(tmp_path))
    need = get_augmenter(name).default_options["min_history"]
    eligible = {"u_full", "u_two"} | ({"u_one"} if need <= 1 else set())
    assert set(out.expected_entities) == eligible
    assert out.stats.no_history == 6 - len(eligible) and out.stats.entities == len(eligible)
    answered = set(out.generated.column("entity_id").to_pylist()) | set(out.dead_letter.column("entity_id").to_pylist())
    assert answered == eligible
    assert len(engine.prompts) == len(eligible)
    # every prompt lists at least one history line
    assert all("\n- Movie" in p for p in engine.prompts), engine.prompts


def test_min_history_is_an_option_and_one_row_is_enough_when_asked(tmp_path, inputs):
    engine = RecordingEngine(ANSWERS["kar_user_preference"])
    out = _run("kar_user_preference", inputs, engine, GenerationCache(tmp_path), options={"min_history": 1})
    assert set(out.expected_entities) == {"u_full", "u_two", "u_one"} and out.stats.no_history == 3


def test_explicit_entity_ids_are_filtered_too(tmp_path, inputs):
    engine = RecordingEngine(ANSWERS["kar_user_preference"])
    aug = get_augmenter("kar_user_preference")
    out = run_augmenter(aug, AugmenterConfig(name=aug.name), inputs, engine, EngineConfig(kind="fake", parse_attempts=1),
                        GenerationCache(tmp_path), LocalRunner(engine).execute, shard_size=4,
                        entity_ids=["u_full", "u_none"])
    assert out.expected_entities == ["u_full"] and out.stats.no_history == 1 and len(engine.prompts) == 1


def test_identical_prompts_go_to_the_engine_once_and_counts_add_up(tmp_path, inputs):
    # 12 items, but only 3 distinct records: identical prompts share one key
    items = inputs.items.with_columns(pl.lit("Same title").alias("title"), pl.lit(2000, pl.Int32).alias("year"),
                                      (pl.int_range(pl.len()) % 3).cast(pl.String).map_elements(lambda g: [g], return_dtype=pl.List(pl.String)).alias("genres"))
    inputs.items = items
    engine = RecordingEngine("A film from 2000 about many things.")
    cache = GenerationCache(tmp_path)
    first = _run("kar_item_knowledge", inputs, engine, cache).stats
    assert first.entities == 12 and first.distinct_prompts == 3
    assert first.llm_requests == 3 and first.cache_hits == 0 and len(engine.prompts) == 3
    assert first.distinct_prompts == first.cache_hits + first.llm_requests
    assert first.parsed == 12  # every entity got its prompt's answer
    second = _run("kar_item_knowledge", inputs, engine, cache).stats
    assert (second.entities, second.distinct_prompts, second.cache_hits, second.llm_requests) == (12, 3, 3, 0)
    line = second.summary_line()
    assert "12 entities" in line and "3 distinct prompts = 3 cached + 0 LLM calls" in line


def test_cli_run_leaves_users_without_history_out_and_reports_them(tmp_path, write_config, capsys):
    """The real pipeline (input gate, split, run, gate, publish) on a shop catalogue where some users
    never interacted and one user's every row is quarantined; the fake engine answers."""
    from recaug.pipelines import cli
    from recaug.core.config import load_config
    from tests.test_cli_end_to_end import shop_config, write_shop

    write_shop(tmp_path, n_users=40)
    users = pl.read_csv(tmp_path / "customers.csv", infer_schema=False)
    extra = pl.DataFrame({"customer": ["lonely1", "lonely2", "badrows"], "age_years": ["30"] * 3, "sex": ["M"] * 3})
    pl.concat([users, extra]).write_csv(tmp_path / "customers.csv")
    events = pl.read_csv(tmp_path / "events.csv", infer_schema=False)
    bad = pl.DataFrame({"customer": ["badrows"] * 3, "sku": ["s1", "s2", "s3"], "stars": ["lots"] * 3,
                        "when": ["1998-01-01 00:00:00"] * 3})
    pl.concat([events, bad]).write_csv(tmp_path / "events.csv")
    path = shop_config(write_config, input_gate={"max_quarantine_share": 0.05},
                       augmenters=[{"name": "kar_user_preference"}, {"name": "kar_item_knowledge"}])
    assert cli.main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 users without prompt history not prompted" in out
    assert "40 entities (+3 without prompt history, not prompted)" in out
    cfg = load_config(path)
    run_dir = sorted((cfg.workdir_path() / "runs").iterdir())[-1]
    report = json.loads((run_dir / "report.json").read_text())
    for name in ("kar_user_preference",):
        assert report["augmenters"][name]["no_history"] == 3
        generated = pl.read_parquet(run_dir / "generated" / f"{name}.parquet")
        assert not {"lonely1", "lonely2", "badrows"} & set(generated["entity_id"].to_list())
        assert generated.height == 40
        assert "- " in generated["prompt"][0]


@pytest.mark.slow
def test_real_model_prompts_only_users_with_history(tmp_path, inputs):
    from recaug.pipelines.engines import make_engine

    cfg = EngineConfig(kind="transformers", model="smollm2", batch_size=4, max_new_tokens=24)
    engine = make_engine(cfg)
    engine.load()
    try:
        inputs.count_tokens = engine.count_tokens
        aug = get_augmenter("kar_user_preference")
        out = run_augmenter(aug, AugmenterConfig(name=aug.name), inputs, engine, cfg, GenerationCache(tmp_path),
                            LocalRunner(engine).execute, shard_size=4)
    finally:
        engine.close()
    assert out.stats.no_history == 4 and out.stats.llm_requests == 2
    generated = out.generated.to_pydict()
    assert sorted(generated["entity_id"]) == ["u_full", "u_two"]
    assert all(t.strip() for t in generated["raw_text"])
    assert all("- Movie" in p for p in generated["prompt"])
