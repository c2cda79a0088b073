"""The augmentation stage with a scripted engine: cache, resume keys, retries, dead letters.

The real model runs the same code in test_augment_real.py; here a scripted engine lets each test
say exactly what the LLM answers and count every call.
"""

import json
import shutil

import polars as pl
import pytest

from recaug.augmenters.base import AugmentInputs, get_augmenter
from recaug.pipelines.augment import run_augmenter
from recaug.pipelines.cache import GenerationCache
from recaug.core.config import AugmenterConfig, EngineConfig
from recaug.pipelines.engines.base import Engine, GenerationResult
from recaug.pipelines.runners.local import LocalRunner
from recaug.schemas import DEAD_LETTER, GENERATED_TEXTS, SYNTHETIC_INTERACTIONS


class ScriptedEngine(Engine):
    kind = "scripted"

    def __init__(self, responder):
        self.responder = responder
        self.requests_seen = 0

    @property
    def model_id(self):
        return "scripted@1"

    def sampling_key(self):
        return {"temperature": 0.0}

    def load(self):
        pass

    def generate(self, requests):
        self.requests_seen += len(requests)
        out = []
        for r in requests:
            text = self.responder(r)
            if isinstance(text, Exception):
                out.append(GenerationResult(r.key, "", 0, 0, "error", 0.0, error=str(text)))
            else:
                out.append(GenerationResult(r.key, text, 10, len(text.split()), "stop", 0.01))
        return out


@pytest.fixture
def inputs():
    items = pl.DataFrame(
        {"item_id": [f"i{n}" for n in range(20)], "title": [f"Movie {n}" for n in range(20)],
         "year": [1990 + n for n in range(20)], "genres": [["Comedy"], ["Drama"]] * 10, "description": [None] * 20},
        schema_overrides={"year": pl.Int32, "description": pl.String},
    )
    users = pl.DataFrame(
        {"user_id": [f"u{n}" for n in range(6)], "age": [30] * 6, "gender": ["M"] * 6, "occupation": ["x"] * 6,
         "region": [None] * 6},
        schema_overrides={"age": pl.Int32, "region": pl.String},
    )
    history = pl.DataFrame(
        {"user_id": [f"u{n % 6}" for n in range(30)], "item_id": [f"i{n % 20}" for n in range(30)],
         "rating": [4.0] * 30, "timestamp": list(range(30))}
    )
    return AugmentInputs(users=users, items=items, history=history, domain="movies",
                         count_tokens=lambda ts: [len(t.split()) for t in ts])


def run(aug_name, inputs, engine, cache, aug_cfg=None, max_attempts=2, aug=None):
    aug = aug or get_augmenter(aug_name)
    return run_augmenter(aug, aug_cfg or AugmenterConfig(name=aug_name), inputs, engine,
                         EngineConfig(kind="fake", parse_attempts=max_attempts), cache,
                         LocalRunner(engine).execute, shard_size=4)


def test_unchanged_rerun_makes_zero_llm_calls(tmp_path, inputs):
    engine = ScriptedEngine(lambda r: f"A fine film about things, {r.key[:8]}.")
    cache = GenerationCache(tmp_path)
    first = run("kar_item_knowledge", inputs, engine, cache)
    assert first.stats.llm_requests == 20 and engine.requests_seen == 20
    assert first.generated.schema.equals(GENERATED_TEXTS) and first.generated.num_rows == 20
    assert len(cache.shards()) == 5  # committed in shards of 4 as they completed
    second = run("kar_item_knowledge", inputs, engine, cache)
    assert engine.requests_seen == 20 and second.stats.llm_requests == 0 and second.stats.cache_hit_rate == 1.0
    cols = [c for c in GENERATED_TEXTS.names if c != "created_at"]
    assert second.generated.select(cols).equals(first.generated.select(cols))


def test_resume_redoes_only_missing_shards(tmp_path, inputs):
    engine = ScriptedEngine(lambda r: f"Knowledge {r.key[:8]}.")
    cache = GenerationCache(tmp_path)
    run("kar_item_knowledge", inputs, engine, cache)
    # a run killed after 3 of 5 shards: drop the last two shard files
    for shard in cache.shards()[3:]:
        shard.unlink()
    engine.requests_seen = 0
    again = run("kar_item_knowledge", inputs, engine, cache)
    assert engine.requests_seen == 8 and again.stats.cache_hits == 12
    assert again.generated.num_rows == 20
    assert pl.from_arrow(again.generated)["entity_id"].n_unique() == 20  # nothing duplicated


def test_template_change_invalidates_only_that_augmenter(tmp_path, inputs, monkeypatch):
    engine = ScriptedEngine(lambda r: f"Text {r.key[:8]}.")
    cache = GenerationCache(tmp_path)
    run("kar_item_knowledge", inputs, engine, cache)
    run("once_content_summary", inputs, engine, cache)
    assert engine.requests_seen == 40
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    src = get_augmenter("kar_item_knowledge").prompt.path
    shutil.copy(src, prompts / "kar_item_knowledge.j2")
    with open(prompts / "kar_item_knowledge.j2", "a") as fh:
        fh.write("{# edited #}\n")
    monkeypatch.setenv("RECAUG_PROMPTS_PATH", str(prompts))
    changed = run("kar_item_knowledge", inputs, engine, cache)
    same = run("once_content_summary", inputs, engine, cache)
    assert changed.stats.llm_requests == 20 and same.stats.llm_requests == 0
    assert engine.requests_seen == 60


def test_parser_change_reparses_cached_raw_text_without_llm(tmp_path, inputs):
    engine = ScriptedEngine(lambda r: json.dumps({"director": "Jane Doe", "country": "France", "language": "French"}))
    cache = GenerationCache(tmp_path)
    first = run("llmrec_item_attributes", inputs, engine, cache)
    assert first.stats.parsed == 20
    aug = get_augmenter("llmrec_item_attributes")
    from recaug.augmenters.base import Parsed

    aug.parse = lambda raw, ctx: Parsed(record={"upper": raw.upper()}, text=raw.upper())
    aug.parser_version = "2"
    before = engine.requests_seen
    second = run("llmrec_item_attributes", inputs, engine, cache, aug=aug)
    assert engine.requests_seen == before and second.stats.llm_requests == 0
    texts = pl.from_arrow(second.generated)["text"].to_list()
    assert all(t.startswith('{"DIRECTOR"') for t in texts)
    assert set(pl.from_arrow(second.generated)["parser_version"]) == {aug.parser_id}


def test_malformed_output_is_retried_then_dead_lettered(tmp_path, inputs):
    def responder(r):
        item = r.messages[-1]["content"] if len(r.messages) <= 2 else r.messages[1]["content"]
        if "Movie 3\"" in item or "Movie 3 " in item or "Movie 3\n" in item:
            return "I think the director is Steven"  # never valid
        if len(r.messages) > 2:  # the retry turn fixes it
            return '{"director": "D", "country": "C", "language": "L"}'
        if "Movie 5" in item:
            return '{"director": "D", "country": "C"'  # repaired? missing language -> schema error -> retry
        return '{"director": "D", "country": "C", "language": "L"}'

    engine = ScriptedEngine(responder)
    cache = GenerationCache(tmp_path)
    out = run("llmrec_item_attributes", inputs, engine, cache, max_attempts=3)
    dead = pl.from_arrow(out.dead_letter)
    assert out.dead_letter.schema.equals(DEAD_LETTER)
    assert dead["entity_id"].to_list() == ["i3"]
    assert dead["attempts"].to_list() == [3] and "no JSON object" in dead["reason"][0]
    assert dead["raw_text"][0] == "I think the director is Steven"
    gen = pl.from_arrow(out.generated)
    assert gen.height == 19 and gen.filter(pl.col("entity_id") == "i5")["attempts"].to_list() == [2]
    assert out.stats.retries == 3 and out.stats.parse_rate == pytest.approx(19 / 20)
    # retries are cached too: a re-run costs nothing
    seen = engine.requests_seen
    run("llmrec_item_attributes", inputs, engine, cache, max_attempts=3)
    assert engine.requests_seen == seen


def test_engine_errors_go_to_dead_letter_and_are_not_cached(tmp_path, inputs):
    flaky = {"fail": True}

    def responder(r):
        if flaky["fail"] and "Movie 7" in r.messages[-1]["content"]:
            return RuntimeError("HTTP 503 after 4 retries")
        return f"Fine {r.key[:8]}."

    engine = ScriptedEngine(responder)
    cache = GenerationCache(tmp_path)
    out = run("kar_item_knowledge", inputs, engine, cache)
    dead = pl.from_arrow(out.dead_letter)
    assert dead["entity_id"].to_list() == ["i7"] and "HTTP 503" in dead["reason"][0]
    flaky["fail"] = False
    again = run("kar_item_knowledge", inputs, engine, cache)
    assert again.stats.llm_requests == 1 and again.dead_letter.num_rows == 0 and again.generated.num_rows == 20


def test_implicit_feedback_writes_synthetic_edges(tmp_path, inputs):
    engine = ScriptedEngine(lambda r: '{"liked": 0, "disliked": 1}')
    out = run("llmrec_implicit_feedback", inputs, engine, GenerationCache(tmp_path),
              AugmenterConfig(name="llmrec_implicit_feedback", options={"n_candidates": 3}))
    syn = pl.from_arrow(out.synthetic_interactions)
    assert out.synthetic_interactions.schema.equals(SYNTHETIC_INTERACTIONS)
    assert syn.height == 12 and sorted(syn["label"].unique().to_list()) == [0, 1]
    assert set(syn["source"]) == {"llmrec_implicit_feedback"}


def test_max_entities_is_a_stable_sample(tmp_path, inputs):
    engine = ScriptedEngine(lambda r: f"x y {r.key[:8]}")
    cfg = AugmenterConfig(name="kar_item_knowledge", max_entities=7)
    a = run("kar_item_knowledge", inputs, engine, GenerationCache(tmp_path / "a"), cfg)
    b = run("kar_item_knowledge", inputs, engine, GenerationCache(tmp_path / "b"), cfg)
    assert a.expected_entities == b.expected_entities and len(a.expected_entities) == 7


def test_budget_defers_changed_entities_and_carries_their_previous_answer(tmp_path, inputs):
    from recaug.pipelines.augment import Budget

    engine = ScriptedEngine(lambda r: "About " + r.messages[-1]["content"].split("Title: ")[1].split("\n")[0])
    cache = GenerationCache(tmp_path)
    first = run("kar_item_knowledge", inputs, engine, cache)
    # five items change (a new year is known), three new items arrive
    changed = inputs.items.with_columns(
        pl.when(pl.col("item_id").is_in([f"i{n}" for n in range(5)])).then(pl.col("year") + 1).otherwise(pl.col("year")).alias("year")
    )
    new = pl.DataFrame({"item_id": ["n1", "n2", "n3"], "title": ["New A", "New B", "New C"], "year": [2000] * 3,
                        "genres": [["Drama"]] * 3, "description": [None] * 3}, schema=changed.schema)
    inputs.items = pl.concat([changed, new])
    engine.requests_seen = 0
    before = tmp_path.parent / f"{tmp_path.name}-cache-before"  # the cache as this run finds it, for a second run
    shutil.copytree(tmp_path, before)
    aug = get_augmenter("kar_item_knowledge")
    out = run_augmenter(aug, AugmenterConfig(name="kar_item_knowledge"), inputs, engine, EngineConfig(kind="fake"), cache,
                        LocalRunner(engine).execute, shard_size=4, budget=Budget(max_entities=4), carry_over=first.generated)
    assert engine.requests_seen == 4 and out.stats.deferred == 4 and out.stats.carried_over == 4
    gen = pl.from_arrow(out.generated)
    assert gen.height == 23 and gen["entity_id"].n_unique() == 23  # nothing lost, nothing duplicated
    fresh_ids = set(gen.filter(pl.col("attempts") > 0).join(pl.from_arrow(first.generated).select("entity_id", "cache_key"),
                                                            on=["entity_id", "cache_key"], how="anti")["entity_id"])
    assert {"n1", "n2", "n3"} <= fresh_ids and len(fresh_ids) == 4  # new entities first, then one changed
    # the same run with its tables spilled to disk (as the long job runs it; the carried rows come last,
    # out of entity order, and are sorted in blocks there): the same table
    other = ScriptedEngine(engine.responder)
    spilled = run_augmenter(aug, AugmenterConfig(name="kar_item_knowledge"), inputs, other, EngineConfig(kind="fake"),
                            GenerationCache(before), LocalRunner(other).execute, shard_size=4,
                            budget=Budget(max_entities=4), carry_over=first.generated, spill_dir=tmp_path / "spill")
    assert other.requests_seen == 4 and spilled.stats.carried_over == 4
    cols = [c for c in out.generated.column_names if c not in ("created_at", "latency_s")]
    assert spilled.generated.select(cols).equals(out.generated.select(cols))
    next_run = run_augmenter(aug, AugmenterConfig(name="kar_item_knowledge"), inputs, engine, EngineConfig(kind="fake"),
                             cache, LocalRunner(engine).execute, shard_size=4, budget=Budget(max_entities=4),
                             carry_over=out.generated)
    assert next_run.stats.deferred == 0 and engine.requests_seen == 8


class ConstrainingEngine(ScriptedEngine):
    """A scripted engine that says it constrains decoding, with a switch like the real ones."""

    def __init__(self, responder, constrained: bool):
        super().__init__(responder)
        self.supports_json_schema = constrained
        self.schemas = []

    def sampling_key(self):
        return {"temperature": 0.0, "json_constrained": self.supports_json_schema}

    def generate(self, requests):
        self.schemas += [r.json_schema for r in requests]
        return super().generate(requests)


def test_constrained_decoding_rekeys_json_augmenters_only_and_sends_the_domain_schema(tmp_path, inputs):
    cache = GenerationCache(tmp_path)
    answer = lambda r: '{"director": "A. Director", "country": "USA", "language": "English"}'  # noqa: E731
    for constrained in (False, True):
        engine = ConstrainingEngine(answer, constrained)
        free = run("kar_item_knowledge", inputs, engine, cache)
        json_out = run("llmrec_item_attributes", inputs, engine, cache)
        if not constrained:
            assert free.stats.llm_requests == 20 and json_out.stats.llm_requests == 20
        else:
            # switching the constraint on cannot change a free-text answer: all cache hits
            assert free.stats.llm_requests == 0
            # a JSON answer can change: re-generated, with the schema as the engine constrains it
            assert json_out.stats.llm_requests == 20
            expected = get_augmenter("llmrec_item_attributes").decoding_schema("movies")
            assert engine.schemas == [expected] * 20 and expected["additionalProperties"] is False


@pytest.mark.parametrize("name", ["kar_item_knowledge", "llmrec_implicit_feedback", "llmrec_item_attributes"])
def test_chunked_stage_gives_the_tables_of_one_chunk(tmp_path, inputs, name):
    """The stage streams chunks of entities; chunk boundaries change nothing in what it returns."""
    def answer(r):
        text = r.messages[-1]["content"]
        if name == "llmrec_implicit_feedback":
            return '{"liked": 0, "disliked": 1}'
        if name == "llmrec_item_attributes":  # a placeholder for every third title: dead letters too
            return '{"director": "...", "country": "X", "language": "Y"}' if len(text) % 3 == 0 else \
                '{"director": "D", "country": "X", "language": "Y"}'
        return "About " + text[:20]

    outs = {}
    # one chunk in memory, small chunks in memory, small chunks spilled to disk (what the long job does)
    for variant, chunk_size, spill in (("one", 10_000, None), ("many", 3, None), ("spilled", 3, tmp_path / "spill")):
        engine = ScriptedEngine(answer)
        aug = get_augmenter(name)
        outs[variant] = run_augmenter(aug, AugmenterConfig(name=name), inputs, engine, EngineConfig(kind="fake"),
                                      GenerationCache(tmp_path / variant), LocalRunner(engine).execute,
                                      shard_size=4, chunk_size=chunk_size, spill_dir=spill)
    one, many = outs["one"], outs["many"]
    for table in ("generated", "dead_letter", "synthetic_items", "synthetic_interactions"):
        a = getattr(one, table)
        cols = [c for c in a.column_names if c != "created_at"]
        for other in ("many", "spilled"):
            assert a.select(cols).equals(getattr(outs[other], table).select(cols)), (table, other)
    assert not any((tmp_path / "spill").glob("*"))  # spill files are anonymous
    assert one.generated.num_rows + one.dead_letter.num_rows == len(one.expected_entities) > 0
    s1, s2 = one.stats.as_dict(), many.stats.as_dict()
    for k in ("entities", "requests", "llm_requests", "parsed", "dead_letter", "retries", "cache_hits"):
        assert s1[k] == s2[k], k


def test_budget_ranks_misses_across_chunks(tmp_path, inputs):
    from recaug.pipelines.augment import Budget

    engine = ScriptedEngine(lambda r: "About " + r.messages[-1]["content"].split("Title: ")[1][:30])
    aug = get_augmenter("kar_item_knowledge")
    picked = {}
    for chunk_size in (10_000, 3):
        out = run_augmenter(aug, AugmenterConfig(name="kar_item_knowledge"), inputs, engine, EngineConfig(kind="fake"),
                            GenerationCache(tmp_path / str(chunk_size)), LocalRunner(engine).execute, shard_size=4,
                            budget=Budget(max_entities=7), chunk_size=chunk_size)
        assert out.stats.llm_requests == 7 and out.stats.deferred == 13
        picked[chunk_size] = sorted(pl.from_arrow(out.generated)["entity_id"].to_list())
    assert picked[10_000] == picked[3]  # the same entities, whichever chunks they fell in


def test_compaction_merges_only_what_came_since_the_last_one(tmp_path):
    cache = GenerationCache(tmp_path)

    def commit(keys):
        for k in keys:  # one shard per result, as a run with tiny shards would
            cache.commit([GenerationResult(k, f"text {k}", 1, 2, "stop", 0.0)], "a", "m")

    commit([f"k{n}" for n in range(4)])
    assert cache.compact(min_shards=4) and len(cache.shards()) == 1
    first = cache.shards()[0]
    commit([f"k{n}" for n in range(3, 8)])  # k3 again: an overlap a crash could leave
    assert cache.compact(min_shards=4)
    assert first in cache.shards() and len(cache.shards()) == 2  # the earlier merge is left as it is
    found = cache.lookup([f"k{n}" for n in range(8)])
    assert sorted(found["cache_key"].to_list()) == [f"k{n}" for n in range(8)]  # one row per key
    assert not cache.compact(min_shards=2)  # nothing new to merge
