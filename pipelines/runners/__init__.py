"""Runners execute augmenter requests through an engine: local, Ray Data, Beam.

Every runner has `.kind`, `.execute(shards, on_shard, sink)` and `.close()`. `execute` calls
`on_shard(results, committed)` exactly once per shard with the results of exactly that shard
(shards are cut by the caller and never regrouped, so every runner feeds the engine the same
batches); `committed=True` means the runner already wrote the shard to the cache through `sink`.
Ray and Beam are imported only when chosen: the local runner needs neither installed.

Runners also encode: `.encode(texts, encoder, scratch)` returns the vectors of `texts` (rows in
order). The caller hands over only the encoding-cache misses and commits the vectors itself, so the
encoding cache works the same on every runner. The texts are cut into the very batches
`TextEncoder.encode` would run in-process (`encode_batches`), and a worker encodes each batch whole,
so the model sees the same tensors on every runner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Protocol

import numpy as np

from recaug.core.config import EncoderConfig, EngineConfig, RunnerConfig
from recaug.pipelines.engines.base import FINISH_ERROR, Engine, EngineError, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from recaug.encoders.text_encoder import TextEncoder
    from recaug.pipelines.cache import CacheSink


class RunnerError(RuntimeError):
    """A runner that cannot deliver every shard exactly once (the message says what to check)."""


def error_results(requests: list[GenerationRequest], reason: str) -> list[GenerationResult]:
    """A whole shard that failed, as per-request error results (never cached: the next run retries)."""
    return [GenerationResult(r.key, "", 0, 0, FINISH_ERROR, 0.0, error=reason) for r in requests]


# An engine that says nothing can work (EngineError) in a Ray or Beam worker comes back to the
# driver as error results carrying this mark; the driver raises it there, so every runner stops the
# run the same way the local runner does instead of failing every remaining shard.
ENGINE_ERROR_MARK = "engine cannot work: "


def engine_error_results(requests: list[GenerationRequest], exc: Exception) -> list[GenerationResult]:
    return error_results(requests, f"{ENGINE_ERROR_MARK}{exc}")


def raise_engine_error(reason: str | None) -> None:
    """Raise the worker's EngineError in the driver when a shard's error carries the mark."""
    if reason and reason.startswith(ENGINE_ERROR_MARK):
        raise EngineError(reason[len(ENGINE_ERROR_MARK):])


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

    def encode(self, texts: list[str], encoder: "TextEncoder", scratch: str | None = None) -> np.ndarray: ...

    def close(self) -> None: ...


# --- the encode stage ------------------------------------------------------------------------------

EncodeBatch = tuple[int, list[int], list[str]]  # (batch index, row positions in the input, their texts)


def encode_batches(texts: list[str], encoder: "TextEncoder") -> list[EncodeBatch]:
    """The batches `encoder.encode(texts)` would run in-process (tokeniser only), as work items."""
    return [(i, [int(p) for p in idx], [texts[p] for p in idx]) for i, idx in enumerate(encoder.plan_batches(texts))]


def worker_encoder(cfg: EncoderConfig, expected_id: str) -> "TextEncoder":
    """A worker's encoder, loaded once; refuses a model that is not the driver's (the cache key)."""
    from recaug.encoders.text_encoder import TextEncoder

    encoder = TextEncoder(cfg, progress=False)
    if encoder.encoder_id != expected_id:
        raise RunnerError(
            f"the worker's encoder is {encoder.encoder_id!r} but the driver's is {expected_id!r}; "
            "every worker needs the same encoder model files as the driver"
        )
    encoder.model  # load now: once per worker, not on the first batch
    return encoder


def encode_one_batch(encoder: "TextEncoder", texts: list[str]) -> np.ndarray:
    """One planned batch, whole: the same padded tensor as the in-process run."""
    return encoder.encode(texts, batch_size=max(1, len(texts)), progress=False)


def assemble_vectors(n: int, dim: int, pieces: Iterable[tuple[list[int], np.ndarray]]) -> np.ndarray:
    """Put each batch's vectors back at its rows; every row exactly once (a retried batch's second
    copy is ignored: it holds the same vectors)."""
    out = np.empty((n, dim), dtype=np.float32)
    seen = np.zeros(n, dtype=bool)
    for positions, vectors in pieces:
        pos = np.asarray(positions, dtype=np.int64)
        if vectors.shape != (len(pos), dim):
            raise RunnerError(f"an encode batch came back with shape {vectors.shape}, expected {(len(pos), dim)}")
        fresh = ~seen[pos]
        out[pos[fresh]] = vectors[fresh]
        seen[pos] = True
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise RunnerError(f"the runner returned no vector for {len(missing)} of {n} text(s) (first row {int(missing[0])})")
    return out


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
