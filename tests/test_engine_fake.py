"""Engines testable without a model: the fake engine, the factory, and the vLLM engine's own logic.

vLLM is not installed in the main environment (it runs in a venv of its own, tested there). Here the
vLLM engine is checked for its clear error without vLLM, and its request/response mapping against a
stub `vllm` module that records what it is given (a fake for a unit test of this one layer).
"""

from __future__ import annotations

import json
import pickle
import sys
import types
from types import SimpleNamespace

import pytest

from recaug.core.config import EngineConfig
from recaug.pipelines.engines import make_engine
from recaug.pipelines.engines.base import EngineError, GenerationRequest, GenerationResult
from recaug.pipelines.engines.fake import FakeEngine
from recaug.pipelines.engines.http_engine import HTTPEngine
from recaug.pipelines.engines.transformers_engine import TransformersEngine, plan_micro_batches
from recaug.pipelines.engines.vllm_engine import VLLMEngine


def req(key: str, text: str, max_new_tokens: int = 32, schema: dict | None = None) -> GenerationRequest:
    return GenerationRequest(key, ({"role": "user", "content": text},), max_new_tokens, schema)


def json_responder(request: GenerationRequest):
    """Module-level, so an engine holding it still pickles: valid JSON when a schema is asked for."""
    if request.json_schema is not None:
        return json.dumps({name: "x" for name in request.json_schema.get("required", [])})
    if "fail" in request.messages[-1]["content"]:
        return RuntimeError("scripted failure")
    return "free text"


# --- FakeEngine ----------------------------------------------------------------------------------


def test_fake_reply_depends_only_on_the_messages():
    engine = make_engine(EngineConfig(kind="fake"))
    assert isinstance(engine, FakeEngine) and engine.model_id == "fake/echo"
    first = engine.generate([req("a", "Toy Story"), req("b", "Heat"), req("c", "Toy Story")])
    again = FakeEngine().generate([req("z", "Toy Story")])
    assert first[0].text == first[2].text == again[0].text  # same prompt, same text, any key or engine
    assert first[0].text != first[1].text
    assert [r.key for r in first] == ["a", "b", "c"]
    assert all(r.finish_reason == "stop" and r.output_tokens == len(r.text.split()) for r in first)


def test_fake_counts_calls_and_requests():
    engine = FakeEngine()
    assert (engine.calls, engine.requests_seen) == (0, 0)
    engine.generate([req("a", "x"), req("b", "y")])
    engine.generate([req("c", "z")])
    assert (engine.calls, engine.requests_seen) == (2, 3)
    assert engine.generate([]) == [] and engine.calls == 3 and engine.requests_seen == 3


def test_fake_responder_scripts_replies_failures_and_cutoffs():
    schema = {"type": "object", "required": ["genre", "era"]}
    engine = FakeEngine(responder=json_responder)
    as_json, free, failed, cut = engine.generate(
        [req("a", "x", schema=schema), req("b", "y"), req("c", "please fail"), req("d", "long", max_new_tokens=1)]
    )
    assert json.loads(as_json.text) == {"genre": "x", "era": "x"}
    assert free.text == "free text" and free.finish_reason == "stop"
    assert failed.finish_reason == "error" and failed.error == "RuntimeError: scripted failure" and failed.text == ""
    assert cut.text == "free" and cut.finish_reason == "length" and cut.output_tokens == 1
    scripted = GenerationResult("k", "t", 1, 1, "length", 0.5)
    assert FakeEngine(responder=lambda r: scripted).generate([req("k", "x")]) == [scripted]


def test_fake_engine_pickles_with_its_responder_and_counters():
    engine = FakeEngine(EngineConfig(kind="fake", seed=3), responder=json_responder)
    engine.generate([req("a", "x")])
    clone = pickle.loads(pickle.dumps(engine))
    assert clone.calls == 1 and clone.cfg.seed == 3
    assert clone.generate([req("b", "y")])[0].text == "free text"
    assert clone.sampling_key() == engine.sampling_key()


# --- factory and pickling before load -------------------------------------------------------------


def test_factory_builds_each_kind_lazily_and_engines_pickle_before_load():
    for kind, cls in [("fake", FakeEngine), ("transformers", TransformersEngine), ("vllm", VLLMEngine)]:
        engine = make_engine(EngineConfig(kind=kind))
        assert isinstance(engine, cls) and engine.kind == kind
        clone = pickle.loads(pickle.dumps(engine))
        assert type(clone) is cls and clone.cfg == engine.cfg and clone.model_id == engine.model_id
    http = make_engine(EngineConfig(kind="http", base_url="http://127.0.0.1:9/v1"))
    assert isinstance(http, HTTPEngine)
    # the packaged model is named without converting or loading anything
    assert make_engine(EngineConfig()).model_id == "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-q4_1"


def test_local_folder_model_id_follows_content_or_declared_revision(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights-v1")
    engine = TransformersEngine(EngineConfig(model=str(folder)))
    first = engine.model_id
    (folder / "model.safetensors").write_bytes(b"weights-v2")
    assert first.startswith("my-model@") and TransformersEngine(EngineConfig(model=str(folder))).model_id != first
    assert TransformersEngine(EngineConfig(model=str(folder), revision="v7")).model_id == "my-model@v7"
    with pytest.raises(EngineError, match=r"neither a packaged model \('smollm2', 'qwen2.5-coder-0.5b'"):
        _ = TransformersEngine(EngineConfig(model=str(tmp_path / "missing"))).model_id


def test_greedy_sampling_key_ignores_seed_and_top_p():
    greedy = [make_engine(EngineConfig(kind=k, seed=s, top_p=p)).sampling_key()
              for k in ("transformers", "vllm") for s, p in ((0, 1.0), (5, 0.9))]
    assert greedy[0] == greedy[1] and greedy[2] == greedy[3]
    sampled = make_engine(EngineConfig(temperature=0.7, seed=5)).sampling_key()
    assert sampled["seed"] == 5 and sampled["temperature"] == 0.7


def test_micro_batches_group_by_budget_and_sort_by_length():
    requests = [req("a", "", 8), req("b", "", 4), req("c", "", 8), req("d", "", 8), req("e", "", 4)]
    lengths = [30, 10, 5, 20, 40]
    assert plan_micro_batches(requests, lengths, 2) == [[1, 4], [2, 3], [0]]


# --- VLLMEngine without vLLM, and against a stub vllm module -----------------------------------------


def local_model(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (folder / "model.safetensors").write_bytes(b"w")
    return folder


def test_vllm_load_without_vllm_says_to_install_the_gpu_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    engine = VLLMEngine(EngineConfig(kind="vllm", model=str(local_model(tmp_path))))
    with pytest.raises(EngineError, match=r"install the `gpu` extra"):
        engine.load()


class StubLLM:
    """Records its construction and chat calls; answers with RequestOutput-shaped objects."""

    instances: list["StubLLM"] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.chats: list[tuple] = []
        self.shut_down = False
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))
        StubLLM.instances.append(self)

    def _shutdown(self):
        self.shut_down = True

    def get_tokenizer(self):
        return SimpleNamespace(eos_token_id=2)

    def chat(self, conversations, sampling_params, use_tqdm, add_generation_prompt):
        self.chats.append((conversations, sampling_params))
        outputs = []
        for conv, params in zip(conversations, sampling_params):
            text = conv[-1]["content"]
            if text == "eos":  # stopped on the tokenizer's EOS, which vLLM leaves in token_ids
                out = SimpleNamespace(text="done", token_ids=[11, 12, 2], finish_reason="stop", stop_reason=None)
            elif text == "eos2":  # stopped on generation_config's second EOS id
                out = SimpleNamespace(text="ok", token_ids=[11, 7], finish_reason="stop", stop_reason=7)
            elif text == "long":
                out = SimpleNamespace(text="a b c", token_ids=[1, 1, 1], finish_reason="length", stop_reason=None)
            else:
                out = SimpleNamespace(text="", token_ids=[], finish_reason="abort", stop_reason=None)
            outputs.append(SimpleNamespace(prompt_token_ids=[5] * len(text), outputs=[out]))
        return outputs


def stub_vllm(monkeypatch, new_api: bool = True):
    vllm = types.ModuleType("vllm")
    sampling = types.ModuleType("vllm.sampling_params")
    vllm.LLM = StubLLM
    vllm.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    if new_api:
        sampling.StructuredOutputsParams = lambda json: SimpleNamespace(api="structured_outputs", json=json)
    else:
        sampling.GuidedDecodingParams = lambda json: SimpleNamespace(api="guided_decoding", json=json)
    vllm.sampling_params = sampling
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    StubLLM.instances.clear()


def test_vllm_engine_maps_requests_and_outputs(tmp_path, monkeypatch):
    stub_vllm(monkeypatch)
    folder = local_model(tmp_path)
    engine = make_engine(EngineConfig(kind="vllm", model=str(folder), gpu_memory_utilization=0.6))
    schema = {"type": "object", "required": ["genre"]}
    results = engine.generate([req("a", "eos", 16, schema), req("b", "long", 3), req("c", "eos2", 8), req("d", "??", 8)])
    [llm] = StubLLM.instances
    assert llm.kwargs["enable_prefix_caching"] is True and llm.kwargs["gpu_memory_utilization"] == 0.6
    assert llm.kwargs["model"] == str(folder)
    conversations, params = llm.chats[0]
    assert conversations[0] == [{"role": "user", "content": "eos"}]
    assert [p.max_tokens for p in params] == [16, 3, 8, 8]
    assert params[0].structured_outputs.json == schema and not hasattr(params[1], "structured_outputs")
    assert not hasattr(params[0], "seed")  # greedy: no per-request seed
    assert [r.key for r in results] == ["a", "b", "c", "d"]
    a, b, c, d = results
    assert (a.text, a.finish_reason, a.output_tokens, a.input_tokens) == ("done", "stop", 2, 3)  # EOS not counted
    assert (b.finish_reason, b.output_tokens) == ("length", 3)
    assert (c.finish_reason, c.output_tokens) == ("stop", 1)
    assert d.finish_reason == "error" and "abort" in d.error


def test_vllm_engine_falls_back_to_guided_decoding_and_seeds_per_request(tmp_path, monkeypatch):
    stub_vllm(monkeypatch, new_api=False)
    engine = VLLMEngine(EngineConfig(kind="vllm", model=str(local_model(tmp_path)), temperature=0.8, seed=4))
    schema = {"type": "object"}
    engine.generate([req("a", "eos", schema=schema), req("b", "eos")])
    engine.generate([req("b", "eos")])
    first, second = StubLLM.instances[0].chats
    assert first[1][0].guided_decoding.json == schema and first[1][0].guided_decoding.api == "guided_decoding"
    assert first[1][1].seed == second[1][0].seed != first[1][0].seed  # same key, same seed, any batch


def test_vllm_args_reach_vllm_and_close_stops_its_engine_core(tmp_path, monkeypatch):
    stub_vllm(monkeypatch)
    args = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, "tensor_parallel_size": 2}
    engine = VLLMEngine(EngineConfig(kind="vllm", model=str(local_model(tmp_path)), seed=3, vllm_args=args))
    engine.load()
    [llm] = StubLLM.instances
    assert {k: llm.kwargs[k] for k in args} == args
    assert llm.kwargs["seed"] == 3 and llm.kwargs["enable_prefix_caching"] is True
    engine.close()
    assert llm.shut_down  # the engine-core processes stop with the engine, not at interpreter exit
    engine.close()  # idempotent
    # the keys the engine sets from other config keys cannot be overridden through vllm_args
    with pytest.raises(ValueError, match=r"vllm_args may not set model \(set engine.model\), seed \(set engine.seed\)"):
        EngineConfig(kind="vllm", vllm_args={"seed": 1, "model": "/elsewhere", "dtype": "half"})
