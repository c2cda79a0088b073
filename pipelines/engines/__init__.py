"""LLM engines behind one seam: load() and generate(batch).

`make_engine(cfg)` picks the engine named by `engine.kind`; each engine module is imported only when
chosen, so a run on the HTTP or fake engine never imports torch, and the vLLM engine imports vLLM only
when it loads.
"""

from __future__ import annotations

from recaug.core.config import EngineConfig
from recaug.pipelines.engines.base import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Engine,
    EngineError,
    GenerationRequest,
    GenerationResult,
)

ENGINE_KINDS = ("transformers", "vllm", "http", "fake")

__all__ = [
    "ENGINE_KINDS", "FINISH_ERROR", "FINISH_LENGTH", "FINISH_STOP", "Engine", "EngineError",
    "GenerationRequest", "GenerationResult", "make_engine",
]


def make_engine(cfg: EngineConfig) -> Engine:
    """A not-yet-loaded engine for `cfg` (cheap: no model is read until load() or count_tokens()),
    wrapped in a failure injector when `engine.chaos` is set."""
    engine = _make_inner(cfg)
    if cfg.chaos is not None:
        from recaug.pipelines.engines.chaos import ChaosEngine

        engine = ChaosEngine(engine, cfg.chaos.shares(), seed=cfg.chaos.seed)
    return engine


def _make_inner(cfg: EngineConfig) -> Engine:
    if cfg.kind == "transformers":
        from recaug.pipelines.engines.transformers_engine import TransformersEngine

        return TransformersEngine(cfg)
    if cfg.kind == "vllm":
        from recaug.pipelines.engines.vllm_engine import VLLMEngine

        return VLLMEngine(cfg)
    if cfg.kind == "http":
        from recaug.pipelines.engines.http_engine import HTTPEngine

        return HTTPEngine(cfg)
    if cfg.kind == "fake":
        from recaug.pipelines.engines.fake import FakeEngine

        return FakeEngine(cfg)
    raise EngineError(f"engine.kind {cfg.kind!r} is not one of {', '.join(ENGINE_KINDS)}")
