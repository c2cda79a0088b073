"""TransformersEngine on the real packaged SmolLM2-135M-Instruct, and the once-per-machine conversion.

The converted model lives in the real cache_home(), so CI converts once and every later test (and
run) reuses it. Generation budgets are tiny (<= 12 new tokens) to keep this file fast on 2 cores.
"""

from __future__ import annotations

import json
import pickle
import threading

import pytest

from recaug.core import packaged
from recaug.core.config import EngineConfig
from recaug.core.sentences import cut_after_sentences
from recaug.pipelines.engines import make_engine
from recaug.pipelines.engines.base import GenerationRequest
from recaug.pipelines.engines.transformers_engine import TransformersEngine


def req(key: str, text: str, max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(key, ({"role": "user", "content": text},), max_new_tokens)


# different prompt lengths and budgets in one call: exercises grouping, sorting and left padding
REQUESTS = [
    req("toy", "Describe the movie Toy Story (1995) in one sentence.", 12),
    req("hi", "Hi", 12),
    req("genre", "What genre is the film GoldenEye (1995)? Answer with one word.", 3),
    req("factors", "Name three factors that make a film a classic: consider direction, acting and music.", 12),
]


@pytest.fixture(scope="session")
def smollm2_dir():
    return packaged.ensure_smollm2_dir()


@pytest.fixture(scope="session")
def engine(smollm2_dir):
    engine = make_engine(EngineConfig(kind="transformers", batch_size=4))
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def batched(engine):
    return engine.generate(REQUESTS)


@pytest.mark.slow
def test_batched_results_equal_one_at_a_time_in_request_order(engine, batched):
    assert [r.key for r in batched] == [r.key for r in REQUESTS]
    singles = [engine.generate([r])[0] for r in REQUESTS]
    for b, s in zip(batched, singles):
        assert (b.key, b.text, b.input_tokens, b.output_tokens, b.finish_reason) == (
            s.key, s.text, s.input_tokens, s.output_tokens, s.finish_reason)
    assert all(r.text.strip() and r.latency_s > 0 for r in batched)


@pytest.mark.slow
def test_finish_reason_length_and_stop(batched):
    by_key = {r.key: r for r in batched}
    assert by_key["genre"].finish_reason == "length" and by_key["genre"].output_tokens == 3
    # a greeting is answered in fewer than 12 tokens and ends on <|im_end|>
    assert by_key["hi"].finish_reason == "stop" and 0 < by_key["hi"].output_tokens < 12
    assert all(r.output_tokens <= next(q.max_new_tokens for q in REQUESTS if q.key == r.key) for r in batched)


@pytest.mark.slow
def test_token_counts_agree_with_the_tokenizer(engine, batched):
    tok = engine.tokenizer
    for request, result in zip(REQUESTS, batched):
        prompt = tok.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False)
        assert result.input_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert result.input_tokens == engine.count_tokens([prompt])[0]
        # the stop token and the padding after it are not output; re-encoding the text gives the count
        assert result.output_tokens == len(tok(result.text, add_special_tokens=False)["input_ids"])
        assert "<|im_end|>" not in result.text


@pytest.mark.slow
def test_sampling_is_reproducible_for_the_same_batch(smollm2_dir):
    cfg = EngineConfig(kind="transformers", temperature=1.0, seed=11, batch_size=2)
    engine = TransformersEngine(cfg)
    pair = [req("s1", "Invent a movie title.", 6), req("s2", "Invent a band name.", 6)]
    first, again = engine.generate(pair), engine.generate(pair)
    assert [r.text for r in first] == [r.text for r in again]
    assert engine.sampling_key()["seed"] == 11


@pytest.mark.slow
def test_count_tokens_needs_no_model(smollm2_dir):
    engine = TransformersEngine(EngineConfig(kind="transformers"))
    counts = engine.count_tokens(["Toy Story (1995)", ""])
    assert counts[0] > 0 and counts[1] == 0
    assert engine._model is None  # budgeting before a run loads the tokenizer only


@pytest.mark.slow
def test_converted_model_is_reused_not_converted_again(smollm2_dir, monkeypatch):
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns

    def must_not_run(gguf, out_dir):
        raise AssertionError("the packaged model was converted a second time")

    monkeypatch.setattr(packaged, "_convert_gguf", must_not_run)
    assert packaged.ensure_smollm2_dir() == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert smollm2_dir.parent == packaged.cache_home() / "models"
    assert smollm2_dir.name == f"smollm2-135m-instruct-{packaged.file_content_id(packaged.smollm2_gguf())}"


def test_concurrent_conversions_convert_once_and_publish_atomically(tmp_path, monkeypatch, capsys):
    """Two converters at once (separate lock file descriptions, like two processes): one converts, the
    other waits and reuses its folder; nobody sees the target before it is complete."""
    monkeypatch.setenv("RECAUG_CACHE_HOME", str(tmp_path / "cache"))
    conversions = []
    started = threading.Event()
    release = threading.Event()
    partial_seen = []

    def slow_convert(gguf, out_dir):
        conversions.append(out_dir)
        (out_dir / "model.safetensors").write_bytes(b"w")
        started.set()
        release.wait(10)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(packaged, "_convert_gguf", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(packaged.ensure_smollm2_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    assert started.wait(10)
    target = tmp_path / "cache" / "models" / f"smollm2-135m-instruct-{packaged.file_content_id(packaged.smollm2_gguf())}"
    partial_seen.append(target.exists())  # mid-conversion: the target must not exist yet
    release.set()
    for t in threads:
        t.join(10)
    assert partial_seen == [False]
    assert len(conversions) == 1 and results == [target, target]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(target.parent.glob(".*.tmp-*"))  # the temp folder was renamed, not copied
    assert capsys.readouterr().err.count("converting the packaged SmolLM2") == 1


# --- JSON-schema-constrained decoding (llguidance) -----------------------------------------------

FILM_SCHEMA = {
    "type": "object",
    "properties": {
        "genre": {"enum": ["Animation", "Comedy", "Drama", "Horror"]},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "tagline": {"type": "string", "maxLength": 40},
    },
    "required": ["genre", "year", "tagline"],
    "additionalProperties": False,
}
# prompts that, left free, a 135M model answers in prose
FILM_PROMPTS = {
    "toy": "Tell me about the movie Toy Story (1995).",
    "jaws": "What do you think of Jaws?",
    "hi": "Hi",
}


@pytest.mark.slow
def test_constrained_answers_are_json_of_the_schema_and_end_when_complete(engine):
    assert engine.supports_json_schema
    free = engine.generate([req(k, p, 40) for k, p in FILM_PROMPTS.items()])
    constrained = engine.generate([
        GenerationRequest(k, ({"role": "user", "content": p},), 40, FILM_SCHEMA) for k, p in FILM_PROMPTS.items()
    ])
    # without the constraint at least one answer is not JSON at all: the constraint is what makes it so
    assert any(not r.text.lstrip().startswith("{") for r in free)
    for r in constrained:
        obj = json.loads(r.text)  # the whole text, nothing before or after the object
        assert list(obj) == ["genre", "year", "tagline"]  # the schema's order
        assert obj["genre"] in FILM_SCHEMA["properties"]["genre"]["enum"]
        assert 1900 <= obj["year"] <= 2030 and len(obj["tagline"]) <= 40
        # a complete object ends generation, well inside the budget
        assert r.finish_reason == "stop" and r.output_tokens < 40


@pytest.mark.slow
def test_a_batch_mixes_constrained_and_free_rows(engine):
    mixed = engine.generate([
        GenerationRequest("toy", ({"role": "user", "content": FILM_PROMPTS["toy"]},), 40, FILM_SCHEMA),
        req("hi", "Hi", 40),
    ])
    assert set(json.loads(mixed[0].text)) == {"genre", "year", "tagline"}
    assert not mixed[1].text.lstrip().startswith("{") and mixed[1].output_tokens > 0


def test_constrained_decoding_can_be_switched_off_and_enters_the_sampling_key():
    on = TransformersEngine(EngineConfig(kind="transformers"))
    off = TransformersEngine(EngineConfig(kind="transformers", constrained_decoding=False))
    assert on.supports_json_schema and not off.supports_json_schema
    assert on.sampling_key()["json_constrained"] is True and off.sampling_key()["json_constrained"] is False
    # pickled to a Ray/Beam worker, the engine keeps its setting
    assert not pickle.loads(pickle.dumps(off)).supports_json_schema


# prompts sharing a long constant start (system text and instructions), then entity data last
_SYSTEM = {"role": "system", "content": "You are an expert in movies. You state facts concisely."}
_INSTRUCTIONS = ("Describe the item along these factors: genre, director and actors, era and country, "
                 "mood and tone, critical acclaim. Answer in one short factual sentence.\n")
PREFIXED = [
    GenerationRequest(f"p{i}", (_SYSTEM, {"role": "user", "content": _INSTRUCTIONS + f'Item: "{t}"'}), 10)
    for i, t in enumerate(["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)",
                           "Twelve Monkeys (1995)", "Babe (1995)", "Usual Suspects, The (1995)"])
]


@pytest.mark.slow
def test_shared_prefix_is_computed_once_and_greedy_outputs_are_unchanged(engine):
    engine.reuse_prefix = False
    try:
        plain = engine.generate(PREFIXED)
    finally:
        engine.reuse_prefix = True
    engine._prefix_ids, engine._prefix_kv = [], []
    reused = engine.generate(PREFIXED)
    assert [r.text for r in reused] == [r.text for r in plain]
    assert [(r.output_tokens, r.finish_reason, r.input_tokens) for r in reused] == [
        (r.output_tokens, r.finish_reason, r.input_tokens) for r in plain]
    rendered = sum(r.input_tokens for r in reused)
    computed = sum(r.extra["prompt_tokens_computed"] for r in reused)
    assert sum(r.extra["prompt_tokens_computed"] for r in plain) == rendered
    # two micro-batches of 4 and 3: the prefix is computed once for the call, not once per batch
    prefix = engine._prefix_ids
    assert len(prefix) >= 40
    assert computed == rendered - len(PREFIXED) * len(prefix) + len(prefix)
    # the next call reuses the kept prefix: no prefix token is computed again
    again = engine.generate(PREFIXED[:3])
    assert [r.text for r in again] == [r.text for r in plain[:3]]
    assert sum(r.extra["prompt_tokens_computed"] for r in again) == sum(r.input_tokens for r in again) - 3 * len(prefix)


@pytest.mark.slow
def test_a_sentence_limit_stops_generation_at_the_sentence_the_full_answer_has_there(engine):
    """Greedy decoding: the answer stopped after two sentences is the unlimited answer cut after its
    second sentence, and the tokens after it were never generated."""
    prompt = "Describe the movie Toy Story (1995): its story, director, cast and music, in five sentences."
    full = engine.generate([req("full", prompt, 96)])[0]
    assert cut_after_sentences(full.text, 2) is not None, full.text  # the model wrote at least two sentences
    limited = engine.generate([GenerationRequest("two", ({"role": "user", "content": prompt},), 96, None, 2)])[0]
    assert limited.text == cut_after_sentences(full.text, 2)
    assert limited.finish_reason == "stop" and limited.extra["sentence_limit"] == 2
    assert limited.output_tokens < full.output_tokens


def test_the_sentence_stop_ends_a_row_at_its_limit_or_at_a_loop_and_leaves_the_others_running():
    """The stopping criterion alone, over a word-per-token stand-in for the tokenizer."""
    import torch

    from recaug.pipelines.engines.transformers_engine import SentenceStop

    words = ["<p>", "Heat", "is", "good.", "Fine.", "Horror,", "More"]

    class Words:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(words[i] for i in ids.tolist())

    stop = SentenceStop(Words(), prompt_width=1, limits=[1, 2, 2, None])
    rows = [[0, 1, 2, 3, 6], [0, 1, 2, 3, 6], [0, 5, 5, 5, 5, 6], [0, 5, 5, 5, 5, 6]]
    width = max(len(r) for r in rows)
    done = stop(torch.tensor([r + [6] * (width - len(r)) for r in rows]), None)
    # row 0: one sentence complete; row 1 needs two; row 2 loops; row 3 has no limit, so no loop stop either
    assert done.tolist() == [True, False, True, False]
    assert stop.looped == [False, False, True, False] and stop.stopped_at[0] == width - 1


@pytest.mark.slow
def test_int8_weights_are_another_model_id_and_stay_close_to_fp32(smollm2_dir, engine, batched):
    import torch

    int8 = make_engine(EngineConfig(kind="transformers", batch_size=4, quantize="int8"))
    assert int8.model_id == engine.model_id + "+int8-dynamic"  # never the fp32 answers' cache entries
    int8.load()
    try:
        assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8._model.modules())
        out = int8.generate(REQUESTS)
        assert [r.key for r in out] == [r.key for r in REQUESTS]
        assert all(r.text.strip() and r.output_tokens <= q.max_new_tokens for r, q in zip(out, REQUESTS))
        # teacher-forced on fp32's answers, int8 mostly predicts the same next token: close, not equal
        tok, same, total = engine.tokenizer, 0, 0
        for request, answer in zip(REQUESTS, batched):
            prompt = engine.render(request.messages)
            ids = tok(prompt + answer.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            start = len(tok(prompt, add_special_tokens=False)["input_ids"])
            with torch.inference_mode():
                preds = [m(input_ids=ids).logits[0, start - 1:-1].argmax(-1) for m in (engine._model, int8._model)]
            same += int((preds[0] == preds[1]).sum())
            total += len(preds[0])
    finally:
        int8.close()
    print(f"int8 agrees with fp32 on {same} of {total} next tokens")
    assert same / total >= 0.6, (same, total)


def test_int8_on_a_gpu_device_is_refused_with_what_to_do():
    from recaug.pipelines.engines.base import EngineError

    eng = make_engine(EngineConfig(kind="transformers", device="cuda", quantize="int8"))
    with pytest.raises(EngineError, match="quantize"):
        eng.load()
