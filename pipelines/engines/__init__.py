"""LLM engines behind one seam: load_model() and run_batch(model, batch).

`make_engine(cfg)` builds the engine its config class names (`engine_class`; each config class is
one engine kind, recaug.core.config). An engine module is imported only when chosen, so a run on
the HTTP or fake engine never imports torch, and the vLLM engine imports vLLM only when it loads.
Adding an engine is one module with the engine class plus its config class; nothing here or in the
runners changes (docs/engines.md, "Adding an engine").
"""

from __future__ import annotations

import importlib

from recaug.core.config import EngineConfig
from recaug.pipelines.engines.base import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Engine, EngineError, GenerationRequest, GenerationResult

__all__ = [
    "FINISH_ERROR", "FINISH_LENGTH", "FINISH_STOP", "Engine", "EngineError", "GenerationRequest", "GenerationResult",
    "make_engine",
]


def make_engine(cfg: EngineConfig) -> Engine:
    """A not-yet-loaded engine for `cfg` (cheap: no model is read until load_model() or count_tokens()),
    wrapped in a failure injector when `engine.chaos` is set."""
    engine = engine_class(cfg)(cfg)
    if cfg.chaos is not None:
        from recaug.pipelines.engines.chaos import ChaosEngine

        engine = ChaosEngine(engine, cfg.chaos.shares(), seed=cfg.chaos.seed)
    return engine


def engine_class(cfg: EngineConfig) -> type[Engine]:
    """The engine class a config names: `engine_class` is the class or "module.path:ClassName"."""
    target = type(cfg).engine_class
    if target is None:
        raise EngineError(f"the config class {type(cfg).__name__} (engine.kind {cfg.kind!r}) names no engine_class")
    if isinstance(target, str):
        module, _, name = target.partition(":")
        target = getattr(importlib.import_module(module), name)
    return target
