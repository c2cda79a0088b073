"""Every built-in augmenter with the REAL packaged SmolLM2-135M on a small ML-100K sample.

A 135M model writes weak JSON unconstrained; with constrained decoding (the default) the answers are
JSON of the schema, and what these tests prove is the plumbing on real model output: every
entity ends in exactly one of the schema'd tables (generated or dead-letter, with the reason),
structured outputs are validated, synthetic rows go to the synthetic tables, and nothing crashes.
"""

import polars as pl
import pytest

from recaug.augmenters.base import AugmentInputs, get_augmenter, known_augmenters
from recaug.pipelines.augment import run_augmenter
from recaug.pipelines.cache import GenerationCache
from recaug.core.config import AugmenterConfig, EngineConfig, SplitConfig
from recaug.pipelines.datasets import load_ml100k
from recaug.pipelines.runners.local import LocalRunner
from recaug.ctr_models.splits import prompt_context, split_interactions
from recaug.schemas.output_gate import TEXT_REASON_PREFIX
from recaug.schemas import DEAD_LETTER, GENERATED_TEXTS, INTERACTIONS, ITEMS, SYNTHETIC_INTERACTIONS, SYNTHETIC_ITEMS, USERS, conform

pytestmark = pytest.mark.slow

ENGINE_CFG = EngineConfig(kind="transformers", model="smollm2", batch_size=8, max_new_tokens=48, parse_attempts=2)


@pytest.fixture(scope="module")
def engine():
    from recaug.pipelines.engines import make_engine

    eng = make_engine(ENGINE_CFG)
    eng.load()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def inputs(engine):
    raw = load_ml100k().tables
    items = pl.from_arrow(raw["items"]).with_columns(pl.col("genres").str.split(" "))
    inter = conform(raw["interactions"], INTERACTIONS)
    split, _ = split_interactions(inter, SplitConfig())
    return AugmentInputs(
        users=pl.from_arrow(conform(pl.from_arrow(raw["users"]).to_arrow(), USERS)),
        items=pl.from_arrow(conform(items.to_arrow(), ITEMS)),
        history=prompt_context(split),
        domain="movies",
        count_tokens=engine.count_tokens,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return GenerationCache(tmp_path_factory.mktemp("cache"))


OPTIONS = {"once_cold_item_generator": {"cold_max_interactions": 11}, "llmrec_implicit_feedback": {"n_candidates": 5}}


@pytest.mark.parametrize("name", sorted(known_augmenters()))
def test_each_augmenter_runs_on_the_real_model(name, engine, inputs, cache):
    aug = get_augmenter(name)
    cfg = AugmenterConfig(name=name, max_entities=3, history_token_budget=160, options=OPTIONS.get(name, {}))
    out = run_augmenter(aug, cfg, inputs, engine, ENGINE_CFG, cache, LocalRunner(engine).execute, shard_size=4)
    assert out.generated.schema.equals(GENERATED_TEXTS) and out.dead_letter.schema.equals(DEAD_LETTER)
    assert out.synthetic_items.schema.equals(SYNTHETIC_ITEMS)
    assert out.synthetic_interactions.schema.equals(SYNTHETIC_INTERACTIONS)
    gen, dead = pl.from_arrow(out.generated), pl.from_arrow(out.dead_letter)
    # every selected entity lands in exactly one table
    assert sorted(gen["entity_id"].to_list() + dead["entity_id"].to_list()) == sorted(out.expected_entities)
    assert len(out.expected_entities) == 3
    assert out.stats.llm_requests >= 3 and out.stats.output_tokens > 0
    if gen.height:
        assert (gen["model"] == engine.model_id).all() and (gen["output_tokens"] > 0).all()
        assert (gen["raw_text"].str.len_chars() > 0).all() and (gen["text"].str.len_chars() > 0).all()
        assert set(gen["finish_reason"]) <= {"stop", "length"}
        assert (gen["template_hash"] == aug.prompt.content_hash).all()
    if dead.height:
        assert (dead["reason"].str.len_chars() > 0).all()
    if aug.json_schema is not None:
        assert engine.supports_json_schema  # constrained decoding (llguidance) is on by default
        # so an answer that ended by itself is JSON of the schema: what is left to fail is content
        # (an index out of range, a genre off the vocabulary) or a budget cut
        finished = dead.filter(pl.col("finish_reason") == "stop")
        assert not finished["reason"].str.contains("JSON|schema violation").any(), finished["reason"].to_list()
    if aug.response_model is None:
        # free text always parses unless empty; what a text check rejects (an echoed prompt, a year
        # the record contradicts) is a dead letter that says so
        assert (dead["reason"].str.starts_with(TEXT_REASON_PREFIX)).all(), dead["reason"].to_list()
        assert gen.height + dead.height == 3 and out.stats.text_rejected == dead.height
        print(name, "text check rejections:", dead["reason"].to_list())
    # the synthetic tables only ever hold rows of entities that parsed
    syn = pl.from_arrow(out.synthetic_interactions)
    if syn.height:
        assert set(syn["user_id"]) <= set(gen["entity_id"])
        assert set(syn["source"]) == {name}
    # an unchanged re-run is all cache hits
    again = run_augmenter(aug, cfg, inputs, engine, ENGINE_CFG, cache, LocalRunner(engine).execute, shard_size=4)
    assert again.stats.llm_requests == 0
    assert pl.from_arrow(again.generated)["raw_text"].to_list() == gen["raw_text"].to_list()


def test_batched_shards_equal_one_by_one_generation(engine, inputs, cache, tmp_path):
    """The engine's batching must not change greedy answers: the runners' parity rests on it."""
    aug = get_augmenter("kar_item_knowledge")
    cfg = AugmenterConfig(name="kar_item_knowledge", max_entities=4)
    batched = run_augmenter(aug, cfg, inputs, engine, ENGINE_CFG, GenerationCache(tmp_path / "a"),
                            LocalRunner(engine).execute, shard_size=4)
    single = run_augmenter(aug, cfg, inputs, engine, ENGINE_CFG, GenerationCache(tmp_path / "b"),
                           LocalRunner(engine).execute, shard_size=1)
    assert pl.from_arrow(batched.generated)["raw_text"].to_list() == pl.from_arrow(single.generated)["raw_text"].to_list()
