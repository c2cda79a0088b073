"""Adding an engine is one module (the engine class plus its config class), and no runner changes.

The scripted engine below lives only in this test file: its config class registers the new kind
`scripted` for `engine:` in a pipeline config (validated, documented field, errors for foreign keys),
`make_engine` builds it from the config, and the local, Ray and Beam runners run it through the
batch-model seam without knowing it: no runner module names an engine kind. Its `load_model()`
returns a model object of its own (the engine itself is never loaded), as a real engine's would.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from pydantic import Field

from recaug.pipelines.cache import GenerationCache
from recaug.core.config import ConfigError, EngineConfig, RunnerConfig, parse_config
from recaug.pipelines.engines import make_engine
from recaug.pipelines.engines.base import FINISH_ERROR, FINISH_STOP, Engine, GenerationRequest, GenerationResult
from recaug.pipelines.runners import make_runner


# --- the new engine: one class and its config class ---------------------------------------------------


class ScriptedModel:
    """The model object: what a worker builds once and generates with."""

    def __init__(self, script: dict[str, str], pid: int):
        self.script = script
        self.pid = pid

    def answer(self, request: GenerationRequest) -> GenerationResult:
        prompt = request.messages[-1]["content"]
        reply = next((text for start, text in self.script.items() if prompt.startswith(start)), None)
        if reply is None:
            return GenerationResult(request.key, "", 0, 0, FINISH_ERROR, 0.0, error=f"no script line for {prompt!r}")
        return GenerationResult(request.key, reply, len(prompt.split()), len(reply.split()), FINISH_STOP, 0.0,
                                extra={"pid": self.pid})


class ScriptedEngine(Engine):
    kind = "scripted"

    def __init__(self, cfg: "ScriptedConfig"):
        self.cfg = cfg

    @property
    def model_id(self) -> str:
        return f"scripted@{self.cfg.revision}"

    def sampling_key(self) -> dict[str, Any]:
        return {"temperature": 0.0}

    def load(self) -> None:  # nothing to load in place: the model object is built by load_model()
        pass

    def load_model(self) -> ScriptedModel:
        return ScriptedModel(dict(self.cfg.script), os.getpid())

    def run_batch(self, model: ScriptedModel, batch: list[GenerationRequest]) -> list[GenerationResult]:
        return [model.answer(r) for r in batch]

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return self.run_batch(self.load_model(), requests)


class ScriptedConfig(EngineConfig):
    engine_class: ClassVar[Any] = ScriptedEngine
    kind: Literal["scripted"] = Field("scripted", description="replies from a script (a test engine)")
    script: dict[str, str] = Field(default_factory=dict, description="prompt prefix -> reply")


# --- tests ---------------------------------------------------------------------------------------------

SCRIPT = {"Describe item 1": "a quiet film", "Describe item 2": "a loud film", "Describe item 3": "a long film"}


def scripted_config() -> EngineConfig:
    return parse_config({"name": "x", "engine": {"kind": "scripted", "script": SCRIPT, "revision": "v1"}}).engine


def shards() -> list[list[GenerationRequest]]:
    prompts = ["Describe item 1", "Describe item 2", "Describe item 9", "Describe item 3"]
    requests = [GenerationRequest(f"k{i}", ({"role": "user", "content": p},), 8) for i, p in enumerate(prompts)]
    return [requests[:3], requests[3:]]


def run(runner, sink=None) -> dict[str, tuple]:
    got: dict[str, tuple] = {}
    runner.execute(shards(), lambda results, committed=False: got.update(
        {r.key: (r.text, r.finish_reason, r.error) for r in results}), sink)
    return got


EXPECTED = {"k0": ("a quiet film", FINISH_STOP, None), "k1": ("a loud film", FINISH_STOP, None),
            "k2": ("", FINISH_ERROR, "no script line for 'Describe item 9'"), "k3": ("a long film", FINISH_STOP, None)}


def test_a_new_engine_kind_is_one_config_class_away():
    cfg = scripted_config()
    assert type(cfg) is ScriptedConfig and cfg.script == SCRIPT and cfg.parse_attempts == 2  # common keys too
    assert type(EngineConfig(kind="scripted")) is ScriptedConfig
    engine = make_engine(cfg)
    assert isinstance(engine, ScriptedEngine) and engine.model_id == "scripted@v1"
    # its keys are checked like a built-in engine's, both ways
    with pytest.raises(ConfigError, match="batch_size is a key of engine kind transformers, not of kind 'scripted'"):
        parse_config({"name": "x", "engine": {"kind": "scripted", "batch_size": 4}})
    with pytest.raises(ConfigError, match="script is a key of engine kind scripted, not of kind 'transformers'"):
        parse_config({"name": "x", "engine": {"script": {}}})
    # chaos wrapping works around it as around any engine
    chaotic = make_engine(parse_config({"name": "x", "engine": {"kind": "scripted", "chaos": {"error": 1.0}}}).engine)
    assert chaotic.kind == "scripted+chaos" and chaotic.model_id == "scripted@packaged+chaos"


def test_the_local_runner_runs_it_through_the_seam():
    engine = make_engine(scripted_config())
    assert run(make_runner(RunnerConfig(kind="local"), engine)) == EXPECTED


def test_no_runner_module_knows_an_engine_kind():
    runners = Path(__file__).resolve().parent.parent / "pipelines" / "runners"
    for path in sorted(runners.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        for needle in ("engine.kind", "engine_cfg", "EngineConfig", '"vllm"', '"transformers"', "TextEncoder("):
            assert needle not in source, f"{path.name} mentions {needle}"


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    import ray.cloudpickle

    from recaug.pipelines.runners.ray_runner import RayRunner

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    starter = RayRunner(RunnerConfig(kind="ray"), make_engine(scripted_config()))
    starter.start()
    yield
    starter.close()


@pytest.mark.slow
def test_ray_and_beam_run_it_unchanged(ray_session, tmp_path):
    pytest.importorskip("apache_beam")
    local = run(make_runner(RunnerConfig(kind="local"), make_engine(scripted_config())))
    for kind in ("ray", "beam"):
        engine = make_engine(scripted_config())
        runner = make_runner(RunnerConfig(kind=kind, num_actors=1), engine)
        got = run(runner, GenerationCache(tmp_path / kind).sink("test", engine.model_id))
        runner.close()
        assert got == local == EXPECTED, kind
