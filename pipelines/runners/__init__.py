"""Runners execute augmenter requests through an engine: local, Ray Data, Beam.

Every runner has `.kind`, `.execute(shards, on_shard, sink)` and `.close()`. `execute` calls
`on_shard(results, committed)` exactly once per shard with the results of exactly that shard
(shards are cut by the caller and never regrouped, so every runner feeds the engine the same
batches); `committed=True` means the runner already wrote the shard to the cache through `sink`.
Ray and Beam are imported only when chosen: the local runner needs neither installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from recaug.pipelines.config import EngineConfig, RunnerConfig
from recaug.pipelines.engines.base import FINISH_ERROR, Engine, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from recaug.pipelines.cache import CacheSink


class RunnerError(RuntimeError):
    """A runner that cannot deliver every shard exactly once (the message says what to check)."""


def error_results(requests: list[GenerationRequest], reason: str) -> list[GenerationResult]:
    """A whole shard that failed, as per-request error results (never cached: the next run retries)."""
    return [GenerationResult(r.key, "", 0, 0, FINISH_ERROR, 0.0, error=reason) for r in requests]


def check_shard(index: int, requests: list[GenerationRequest], results: list[GenerationResult]) -> None:
    """The engine contract: one result per request, same keys, same order."""
    want = [r.key for r in requests]
    got = [r.key for r in results]
    if got != want:
        raise RunnerError(
            f"shard {index}: the engine returned {len(got)} result(s) for {len(want)} request(s) "
            "or changed their keys/order; Engine.generate must return one result per request, in order"
        )


class Runner(Protocol):
    kind: str

    def execute(
        self, shards: list[list[GenerationRequest]], on_shard: Callable[..., None], sink: "CacheSink | None" = None
    ) -> None: ...

    def close(self) -> None: ...


def make_runner(cfg: RunnerConfig, engine: Engine, engine_cfg: EngineConfig | None = None) -> Runner:
    """The runner named by `runner.kind`, wrapping an engine that has not been loaded yet (Ray and
    Beam ship it to their workers, which call `engine.load()` once each)."""
    if cfg.kind == "local":
        from recaug.pipelines.runners.local import LocalRunner

        return LocalRunner(engine)
    if cfg.kind == "ray":
        try:
            from recaug.pipelines.runners.ray_runner import RayRunner
        except ImportError as exc:
            raise ImportError(f"runner.kind 'ray' needs Ray Data: pip install 'recaug[ray]' ({exc})") from None
        return RayRunner(cfg, engine, engine_cfg)
    if cfg.kind == "beam":
        try:
            from recaug.pipelines.runners.beam_runner import BeamRunner
        except ImportError as exc:
            raise ImportError(f"runner.kind 'beam' needs Apache Beam: pip install 'recaug[beam]' ({exc})") from None
        return BeamRunner(cfg, engine, engine_cfg)
    raise ValueError(f"unknown runner.kind {cfg.kind!r}; expected local, ray or beam")
