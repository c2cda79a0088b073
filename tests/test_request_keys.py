"""Request keys derived from context rows (no rendering) and the reuse of a previous run's rows.

A key must change whenever anything that changes the prompt (or the answer's parse) changes, and two
entities with the same key must get the same prompt; the reuse path must give exactly the tables the
render-and-parse path gives.
"""

import shutil

import polars as pl
import pyarrow.parquet as pq
import pytest

from recaug.augmenters.base import AugmentInputs, Parsed, get_augmenter
from recaug.pipelines.augment import build_pending, context_keys, run_augmenter
from recaug.pipelines.cache import GenerationCache
from recaug.core.config import AugmenterConfig, EngineConfig
from recaug.pipelines.engines.fake import FakeEngine
from recaug.pipelines.runners.local import LocalRunner
from recaug.prompts import PromptTemplate
from recaug.schemas import DEAD_LETTER, GENERATED_TEXTS


@pytest.fixture
def inputs():
    items = pl.DataFrame(
        {"item_id": [f"i{n}" for n in range(12)],
         # i10 and i11 are twins of i0 and i1: same context apart from the id
         "title": [f"Movie {n}" for n in range(10)] + ["Movie 0", "Movie 1"],
         "year": [1990 + n for n in range(10)] + [1990, 1991],
         "genres": [["Comedy"], ["Drama", "War"]] * 6, "description": [None] * 11 + ["An epic."]},
        schema_overrides={"year": pl.Int32, "description": pl.String},
    )
    users = pl.DataFrame(
        {"user_id": [f"u{n}" for n in range(4)], "age": [30, 40, 30, 30], "gender": ["M", "F", "M", "M"],
         "occupation": ["x"] * 4, "region": [None] * 4},
        schema_overrides={"age": pl.Int32, "region": pl.String},
    )
    history = pl.DataFrame(
        {"user_id": [f"u{n % 4}" for n in range(24)], "item_id": [f"i{n % 12}" for n in range(24)],
         "rating": [4.0] * 24, "timestamp": list(range(24))}
    )
    return AugmentInputs(users=users, items=items, history=history, domain="movies",
                         count_tokens=lambda ts: [len(t.split()) for t in ts])


class OtherModel(FakeEngine):
    @property
    def model_id(self):
        return "another/model@1"


def keys_of(name, inputs, aug_cfg=None, engine_cfg=None, aug=None, engine_type=FakeEngine):
    aug = aug or get_augmenter(name)
    aug_cfg = aug_cfg or AugmenterConfig(name=name)
    engine_cfg = engine_cfg or EngineConfig(kind="fake")
    engine = engine_type(engine_cfg)
    ids = aug.select(inputs, {})
    from recaug.pipelines.augment import augmenter_options

    ctx = aug.build_context(inputs, ids, augmenter_options(aug, aug_cfg))
    keys = context_keys(aug, aug_cfg, inputs, engine, engine_cfg, ctx)
    return dict(zip(keys["entity_id"], keys["key"]))


@pytest.mark.parametrize("name", ["kar_item_knowledge", "kar_user_preference", "llmrec_user_profile"])
def test_equal_keys_mean_equal_prompts_and_keys_are_stable(inputs, name):
    aug = get_augmenter(name)
    pending, failed, _ = build_pending(aug, AugmenterConfig(name=name), inputs, FakeEngine(), EngineConfig(kind="fake"))
    assert not failed and pending
    by_key: dict[str, set] = {}
    for p in pending:
        by_key.setdefault(p.key, set()).add(tuple(m["content"] for m in p.messages))
    assert all(len(prompts) == 1 for prompts in by_key.values())
    assert keys_of(name, inputs) == {p.entity_id: p.key for p in pending}  # same inputs, same keys


def test_twin_items_share_a_key_and_distinct_items_do_not(inputs):
    keys = keys_of("kar_item_knowledge", inputs)
    assert keys["i10"] == keys["i0"]  # same context: one answer, as before
    assert keys["i11"] != keys["i1"]  # the description differs
    assert len(set(keys.values())) == 11


def test_key_changes_with_each_input_of_the_prompt(inputs, tmp_path, monkeypatch):
    base = keys_of("kar_user_preference", inputs)
    # a context value: one item's title changes the history line of the users who rated it
    edited = inputs.items.with_columns(
        pl.when(pl.col("item_id") == "i3").then(pl.lit("Renamed")).otherwise(pl.col("title")).alias("title"))
    changed = keys_of("kar_user_preference", AugmentInputs(**{**inputs.__dict__, "items": edited}))
    raters = set(inputs.history.filter(pl.col("item_id") == "i3")["user_id"])
    assert {u for u in base if base[u] != changed[u]} == raters
    # the history budget: a tighter one truncates, any other value is still a different request
    tight = keys_of("kar_user_preference", inputs, AugmenterConfig(name="kar_user_preference", history_token_budget=16))
    assert all(tight[u] != base[u] for u in base)
    # the answer cap, the model's sampling, the model
    assert keys_of("kar_user_preference", inputs, AugmenterConfig(name="kar_user_preference", max_new_tokens=7))["u0"] != base["u0"]
    assert keys_of("kar_user_preference", inputs, engine_cfg=EngineConfig(kind="fake", temperature=0.7))["u0"] != base["u0"]
    assert keys_of("kar_user_preference", inputs, engine_type=OtherModel)["u0"] != base["u0"]
    # an augmenter option (it is a template variable)
    other = keys_of("kar_user_preference", inputs, AugmenterConfig(name="kar_user_preference", options={"encode": "answer"}))
    assert other["u0"] != base["u0"]
    # the response schema as decoding constrains it
    aug = get_augmenter("llmrec_user_profile")
    before = keys_of("llmrec_user_profile", inputs, aug=aug)
    aug._decoding_hash["movies"] = "another schema"
    assert keys_of("llmrec_user_profile", inputs, aug=aug)["u0"] != before["u0"]
    # the template, and a template it includes
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    src = get_augmenter("kar_user_preference").prompt.path
    text = open(src).read()
    (prompts / "kar_user_preference.j2").write_text(text.replace("{% block user %}", "{% block user %}{% include 'part.j2' %}"))
    (prompts / "part.j2").write_text("Part one.\n")
    monkeypatch.setenv("RECAUG_PROMPTS_PATH", str(prompts))
    with_include = keys_of("kar_user_preference", inputs)
    assert with_include["u0"] != base["u0"]
    (prompts / "part.j2").write_text("Part two.\n")
    assert keys_of("kar_user_preference", inputs)["u0"] != with_include["u0"]


def _run(aug, inputs, engine, cache, runs=None, shard_size=3):
    return run_augmenter(aug, AugmenterConfig(name=aug.name), inputs, engine, EngineConfig(kind="fake"), cache,
                         LocalRunner(engine).execute, shard_size=shard_size, reuse_runs=runs, chunk_size=5)


def _publish(out, runs, run_id):
    for table, folder in ((out.generated, "generated"), (out.dead_letter, "dead_letter")):
        (runs / run_id / folder).mkdir(parents=True)
        pq.write_table(table, runs / run_id / folder / f"{out.augmenter.name}.parquet", row_group_size=4)


def _looping_for(*titles):
    """A fake engine whose answers for the given titles loop (a text-check dead letter)."""
    from recaug.pipelines.engines.fake import default_reply

    def reply(request):
        text = "\n".join(m["content"] for m in request.messages)
        if any(f"Title: {t}\n" in text or f"{t} (" in text for t in titles):
            return "Drama, drama, drama, drama, drama, drama."
        return default_reply(request)

    return FakeEngine(EngineConfig(kind="fake"), responder=reply)


def test_reused_dead_letters_equal_the_rechecked_ones(inputs, tmp_path, monkeypatch):
    """Answers a per-answer text check rejected are dead letters again in the next run without being
    rendered or re-checked, as long as the parser version and the text bounds are those the verdicts
    were reached with; the tables and counts equal what rendering and checking again gives."""
    aug = get_augmenter("kar_item_knowledge")
    engine = _looping_for("Movie 3", "Movie 7")
    cache = GenerationCache(tmp_path / "cache")
    runs = tmp_path / "runs"
    first = _run(aug, inputs, engine, cache)
    dead = pl.from_arrow(first.dead_letter)
    assert sorted(dead["entity_id"]) == ["i3", "i7"] and dead["reason"].str.starts_with("text check: loops").all()
    _publish(first, runs, "20260101T000000Z-aaaaaa")
    renders = []
    real_render = PromptTemplate.render
    monkeypatch.setattr(PromptTemplate, "render", lambda self, v: renders.append(v["entity_id"]) or real_render(self, v))
    reused = _run(aug, inputs, engine, cache, runs)
    assert renders == []  # the whole run, dead letters included, came from the previous run
    rechecked = _run(aug, inputs, engine, cache)
    assert sorted(renders) == sorted(set(renders)) and len(renders) == first.stats.entities
    cols = [c for c in DEAD_LETTER.names if c != "created_at"]
    assert reused.dead_letter.select(cols).equals(rechecked.dead_letter.select(cols))
    counts = ("requests", "distinct_prompts", "cache_hits", "llm_requests", "parsed", "dead_letter", "text_rejected",
              "truncated")
    assert [getattr(reused.stats, c) for c in counts] == [getattr(rechecked.stats, c) for c in counts]
    assert reused.stats.text_rejected == 2 and reused.stats.llm_requests == 0

    # other text bounds: the verdicts were not reached under them, so the dead letters are checked again
    renders.clear()
    bounded = run_augmenter(aug, AugmenterConfig(name=aug.name), inputs, engine, EngineConfig(kind="fake"), cache,
                            LocalRunner(engine).execute, shard_size=3, reuse_runs=runs, chunk_size=5, text_bounds=(1, 5000))
    assert sorted(renders) == ["i3", "i7"] and bounded.dead_letter.num_rows == 2
    # other checks code (an edit of the text checks): the same
    renders.clear()
    import recaug.pipelines.augment as augment_module

    fingerprint = augment_module.text_checks_fingerprint
    monkeypatch.setattr(augment_module, "text_checks_fingerprint", lambda: "edited checks")
    _run(aug, inputs, engine, cache, runs)
    assert sorted(renders) == ["i3", "i7"]
    monkeypatch.setattr(augment_module, "text_checks_fingerprint", fingerprint)
    # a dead-letter table without the verdicts' record (an older run): the same
    renders.clear()
    bare = runs / "20260102T000000Z-bbbbbb"
    for folder, table in (("generated", first.generated), ("dead_letter", first.dead_letter.replace_schema_metadata({}))):
        (bare / folder).mkdir(parents=True)
        pq.write_table(table, bare / folder / f"{aug.name}.parquet")
    again = _run(aug, inputs, engine, cache, runs)
    assert sorted(renders) == ["i3", "i7"] and again.dead_letter.select(cols).equals(rechecked.dead_letter.select(cols))


@pytest.mark.parametrize("name", ["kar_item_knowledge", "kar_user_preference"])
def test_reused_rows_equal_the_rendered_and_parsed_ones(inputs, tmp_path, monkeypatch, name):
    aug = get_augmenter(name)
    engine = FakeEngine(EngineConfig(kind="fake"))
    cache = GenerationCache(tmp_path / "cache")
    runs = tmp_path / "runs"
    first = _run(aug, inputs, engine, cache)
    _publish(first, runs, "20260101T000000Z-aaaaaa")
    renders = []
    real_render = PromptTemplate.render
    monkeypatch.setattr(PromptTemplate, "render", lambda self, v: renders.append(v["entity_id"]) or real_render(self, v))
    calls = engine.calls
    reused = _run(aug, inputs, engine, cache, runs)
    assert engine.calls == calls and reused.stats.llm_requests == 0 and reused.stats.cache_hit_rate == 1.0
    assert renders == []  # nothing rendered, nothing parsed: every row came from the previous run
    rendered = _run(aug, inputs, engine, cache)  # no reuse: every prompt rendered, every answer parsed
    assert len(renders) == first.stats.entities
    cols = [c for c in GENERATED_TEXTS.names if c != "created_at"]
    assert reused.generated.select(cols).equals(rendered.generated.select(cols))
    assert reused.generated.select(cols).equals(first.generated.select(cols))


def test_reuse_skips_changed_entities_other_parsers_and_uncached_keys(inputs, tmp_path, monkeypatch):
    aug = get_augmenter("kar_item_knowledge")
    engine = FakeEngine(EngineConfig(kind="fake"))
    cache = GenerationCache(tmp_path / "cache")
    runs = tmp_path / "runs"
    _publish(_run(aug, inputs, engine, cache), runs, "20260101T000000Z-aaaaaa")
    edited = inputs.items.with_columns(
        pl.when(pl.col("item_id") == "i4").then(pl.lit("Renamed")).otherwise(pl.col("title")).alias("title"))
    changed_inputs = AugmentInputs(**{**inputs.__dict__, "items": edited})
    out = _run(aug, changed_inputs, engine, cache, runs)
    assert out.stats.llm_requests == 1
    # the counts add up with reused rows too: distinct prompts = cached + LLM calls
    assert out.stats.distinct_prompts == out.stats.cache_hits + out.stats.llm_requests
    row = pl.from_arrow(out.generated).filter(pl.col("entity_id") == "i4")
    assert row["text"][0].startswith("Renamed.") and "Renamed" in row["prompt"][0]
    # a new parser version: rows are re-parsed from the cached raw text, not copied
    aug2 = get_augmenter("kar_item_knowledge")
    aug2.parse = lambda raw, ctx: Parsed(record={"k": raw}, text="v2 " + raw)
    aug2.parser_version = aug.parser_version + ".test"  # any other version
    again = _run(aug2, changed_inputs, engine, cache, runs)
    assert again.stats.llm_requests == 0 and all(t.startswith("v2 ") for t in pl.from_arrow(again.generated)["text"])
    # a cleared cache: the previous run's rows are not taken for answers the cache no longer holds
    shutil.rmtree(tmp_path / "cache")
    fresh = _run(aug, changed_inputs, engine, GenerationCache(tmp_path / "cache"), runs)
    # 12 entities, 11 distinct prompts (i10 is a twin of i0): identical prompts go to the engine once
    assert fresh.stats.llm_requests == 11 and fresh.stats.cache_hits == 0 and fresh.stats.distinct_prompts == 11


def test_cache_membership_index(tmp_path):
    import hashlib

    from recaug.pipelines.engines.base import GenerationResult

    cache = GenerationCache(tmp_path)
    stored = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(50)]
    cache.commit([GenerationResult(k, "t", 1, 1, "stop", 0.1) for k in stored[:30]], "a", "m")
    absent = [hashlib.sha256(f"x{i}".encode()).hexdigest() for i in range(20)]
    # a key sharing the first 60 bits of a stored one is not taken for it
    twin = stored[3][:15] + ("0" if stored[3][15] != "0" else "1") + stored[3][16:]
    assert cache.contains(stored[:30] + absent + [twin]).to_list() == [True] * 30 + [False] * 21
    cache.commit([GenerationResult(k, "t", 1, 1, "stop", 0.1) for k in stored[30:]], "a", "m")  # a new shard
    assert cache.contains(stored).all()
    cache.commit([GenerationResult(k, "t", 1, 1, "stop", 0.1) for k in ["plain-key", "k2"]], "a", "m")
    assert cache.contains(["plain-key", "k3", stored[0]]).to_list() == [True, False, True]
    for shard in cache.shards()[:1]:  # a vanished shard: the index is read again
        shard.unlink()
    assert cache.contains(stored[:2] + stored[30:32]).to_list() == [False, False, True, True]


def test_a_reused_row_outside_the_text_bounds_becomes_a_dead_letter(inputs, tmp_path):
    """The output gate's text bounds are config: a row the previous run published but that is out of
    today's bounds is not copied; it takes the normal path and is that entity's dead letter."""
    aug = get_augmenter("kar_item_knowledge")
    engine = FakeEngine(EngineConfig(kind="fake"))
    cache = GenerationCache(tmp_path / "cache")
    runs = tmp_path / "runs"
    first = _run(aug, inputs, engine, cache)
    _publish(first, runs, "20260101T000000Z-aaaaaa")
    lengths = pl.from_arrow(first.generated)["text"].str.len_chars()
    bounds = (0, int(lengths.min()))  # only the shortest text(s) still fit
    out = run_augmenter(aug, AugmenterConfig(name=aug.name), inputs, engine, EngineConfig(kind="fake"), cache,
                        LocalRunner(engine).execute, shard_size=3, reuse_runs=runs, chunk_size=5, text_bounds=bounds)
    gen, dead = pl.from_arrow(out.generated), pl.from_arrow(out.dead_letter)
    assert out.stats.llm_requests == 0  # everything was cached
    assert gen.height == int((lengths <= bounds[1]).sum()) and gen["text"].str.len_chars().max() <= bounds[1]
    assert dead.height == 12 - gen.height and dead["reason"].str.contains("output_gate.max_text_chars").all()


def test_cache_lookup_reads_only_the_row_groups_holding_its_keys(tmp_path, monkeypatch):
    """A lookup answers from the row groups the key index places its keys in, with the same rows a
    scan of every shard gives: the first committed row per key, duplicates across shards included,
    a key sharing the first 60 bits of a stored one not taken for it, plain (non-hex) keys, and a
    fallback to the scan when a located shard vanished after the index was read."""
    import hashlib

    import recaug.pipelines.cache as cache_module
    from recaug.pipelines.engines.base import GenerationResult

    monkeypatch.setattr(cache_module, "COMPACTED_ROWS_PER_GROUP", 4)
    cache = GenerationCache(tmp_path)
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(40)]
    for start in range(0, 40, 8):  # five shards of eight results, merged into one file of ten row groups
        cache.commit([GenerationResult(k, f"first {k[:6]}", 3, 5, "stop", 0.1) for k in keys[start:start + 8]], "a", "m")
    assert cache.compact(min_shards=4)
    merged = cache.shards()[0]
    assert pq.ParquetFile(merged).metadata.num_row_groups == 10
    cache.commit([GenerationResult(keys[5], "second answer", 3, 5, "stop", 0.1)], "a", "m")  # an overlap a crash can leave
    twin = keys[7][:15] + ("0" if keys[7][15] != "0" else "1") + keys[7][16:]  # same 60-bit prefix, not stored

    read = []
    real_read = pq.ParquetFile.read_row_groups

    def counting(self, groups, *args, **kwargs):
        read.append(sorted(groups))
        return real_read(self, groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counting)
    wanted = [keys[1], keys[5], keys[38], twin, hashlib.sha256(b"absent").hexdigest()]
    found = cache.lookup(wanted).sort("cache_key")
    scanned = (pl.scan_parquet(cache.shards()).filter(pl.col("cache_key").is_in(wanted)).collect()
               .sort("created_at", maintain_order=True).unique("cache_key", keep="first").sort("cache_key"))
    assert found.equals(scanned) and sorted(found["cache_key"]) == sorted([keys[1], keys[5], keys[38]])
    assert dict(zip(found["cache_key"], found["raw_text"]))[keys[5]] == f"first {keys[5][:6]}"  # first committed
    groups = sum(read, [])
    assert len(read) == 2 and sorted(groups) == [0, 0, 1, 9]  # keys 1 and 5 in groups 0 and 1, 38 in 9; the overlap's shard
    assert cache.lookup([twin]).height == 0

    cache.commit([GenerationResult("plain-key", "plain answer", 1, 1, "stop", 0.1)], "a", "m")  # not a hex digest
    assert cache.lookup(["plain-key", keys[2]]).sort("cache_key")["raw_text"].to_list() == [f"first {keys[2][:6]}", "plain answer"]

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", real_read)
    late = hashlib.sha256(b"late").hexdigest()
    cache.commit([GenerationResult(late, "late answer", 1, 1, "stop", 0.1)], "a", "m")
    stale = GenerationCache(tmp_path)
    stale.contains(keys)
    stale._refresh = lambda: None  # the index was read; then, before the rows are, another process
    assert GenerationCache(tmp_path).compact(min_shards=2)  # compacts the shard holding `late` away
    got = stale.lookup([late, keys[3]])
    assert dict(zip(got["cache_key"], got["raw_text"])) == {late: "late answer", keys[3]: f"first {keys[3][:6]}"}


def test_a_sparse_change_reaches_the_engine_in_full_shards(inputs, tmp_path):
    """Shards are cut over the entities the previous finished run could not supply: a change spread over
    the catalogue (one entity here and there) reaches the engine in full shards, not one per call."""
    aug = get_augmenter("kar_item_knowledge")
    engine = FakeEngine(EngineConfig(kind="fake"))
    cache = GenerationCache(tmp_path / "cache")
    runs = tmp_path / "runs"
    run = lambda items: run_augmenter(  # noqa: E731  one chunk of all 12 items, shards of 2
        aug, AugmenterConfig(name=aug.name), AugmentInputs(**{**inputs.__dict__, "items": items}), engine,
        EngineConfig(kind="fake"), cache, LocalRunner(engine).execute, shard_size=2, chunk_size=100, reuse_runs=runs)
    _publish(run(inputs.items), runs, "20260101T000000Z-aaaaaa")
    spread = ["i1", "i4", "i6", "i9", "i11"]
    # same length, so the edited items keep their places among the 12 (shards were cut by context length)
    edited = inputs.items.with_columns(
        pl.when(pl.col("item_id").is_in(spread)).then(pl.col("title").str.replace("Movie", "Filmo"))
        .otherwise(pl.col("title")).alias("title"))
    calls, seen = engine.calls, engine.requests_seen
    out = run(edited)
    assert out.stats.llm_requests == len(spread) == engine.requests_seen - seen
    assert engine.calls - calls == 3  # 2 + 2 + 1, not a call per edited item
    texts = pl.from_arrow(out.generated).filter(pl.col("entity_id").is_in(spread))["text"]
    assert len(texts) == len(spread) and all(t.startswith("Filmo") for t in texts)


def test_a_run_resumed_after_a_kill_sends_the_batches_it_would_have_sent(inputs, tmp_path):
    """Whole shards committed before a kill (in any order, as the Ray runner streams them back) are
    cache hits on the resumed run, and the other shards reach the engine as the same batches, so
    sampled answers (seeded per batch) do not depend on whether the run was interrupted."""

    class Recording(FakeEngine):
        def generate(self, requests):
            self.batches.append([r.key for r in requests])
            return super().generate(requests)

    aug = get_augmenter("kar_item_knowledge")
    runs = tmp_path / "runs"
    run = lambda inp, engine, cache: run_augmenter(  # noqa: E731  one chunk of all 12 items, shards of 2
        aug, AugmenterConfig(name=aug.name), inp, engine, EngineConfig(kind="fake"), cache,
        LocalRunner(engine).execute, shard_size=2, chunk_size=100, reuse_runs=runs)
    _publish(run(inputs, FakeEngine(EngineConfig(kind="fake")), GenerationCache(tmp_path / "cache")), runs,
             "20260101T000000Z-aaaaaa")
    spread = ["i1", "i3", "i4", "i6", "i9", "i11"]
    edited = AugmentInputs(**{**inputs.__dict__, "items": inputs.items.with_columns(
        pl.when(pl.col("item_id").is_in(spread)).then(pl.col("title").str.replace("Movie", "Filmo"))
        .otherwise(pl.col("title")).alias("title"))})
    before = set(GenerationCache(tmp_path / "cache").shards())
    shutil.copytree(tmp_path / "cache", tmp_path / "killed")

    whole = Recording(EngineConfig(kind="fake"))
    whole.batches = []
    run(edited, whole, GenerationCache(tmp_path / "cache"))
    assert [len(b) for b in whole.batches] == [2, 2, 2]
    # the killed run had committed its second shard only
    second = [p for p in GenerationCache(tmp_path / "cache").shards() if p not in before]
    committed = [p for p in second if set(pl.read_parquet(p)["cache_key"]) == set(whole.batches[1])]
    assert len(committed) == 1
    shutil.copy(committed[0], tmp_path / "killed" / "generations" / committed[0].name)
    resumed = Recording(EngineConfig(kind="fake"))
    resumed.batches = []
    run(edited, resumed, GenerationCache(tmp_path / "killed"))
    assert resumed.batches == [whole.batches[0], whole.batches[2]]
