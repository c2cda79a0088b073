"""Runners run batch-model handlers (recaug.core.batch_model) on shards: local, Ray Data, Beam.

Every runner has `.kind`, one execution path `.run(handler, shards, on_shard, sink=None, scratch=None)`
and `.close()`. `run` calls `on_shard(index, results, committed)` exactly once per shard with the
results of exactly that shard (shards are cut by the caller and never regrouped, so every runner feeds
the model the same batches); `committed=True` means a worker already wrote the shard to the cache
through `sink`. The failure policy (a shard that raises becomes error results with the reason; a
model that cannot work stops the run) is batch_model.run_shard / deliver, shared by every runner.
A runner never asks which engine or encoder it runs: what a worker needs comes from
`handler.resources()`. Ray and Beam are imported only when chosen: the local runner needs neither.

The two stages are thin wrappers over `run`, written once here (`BaseRunner`):

- `.execute(shards, on_shard, sink)` runs the runner's engine on request shards and calls
  `on_shard(results, committed)`.
- `.encode(texts, encoder, scratch)` returns the vectors of `texts` (rows in order). The caller hands
  over only the encoding-cache misses and commits the vectors itself, so the encoding cache works the
  same on every runner. The texts are cut into the very batches `TextEncoder.encode` would run
  in-process (`encode_batches`), and a worker encodes each batch whole, so the model sees the same
  tensors on every runner.
"""

from __future__ import annotations

import abc
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from recaug.core.batch_model import BatchModel, OnShard, RunnerError
from recaug.core.config import RunnerConfig
from recaug.pipelines.engines.base import Engine, GenerationRequest

if TYPE_CHECKING:
    from recaug.encoders.text_encoder import TextEncoder
    from recaug.pipelines.cache import CacheSink

__all__ = ["BaseRunner", "RunnerError", "assemble_vectors", "encode_batches", "make_runner"]


# --- the encode stage ------------------------------------------------------------------------------

EncodeBatch = tuple[list[int], list[str]]  # (row positions in the input, their texts): one planned batch


def encode_batches(texts: list[str], encoder: "TextEncoder") -> list[EncodeBatch]:
    """The batches `encoder.encode(texts)` would run in-process (tokeniser only), as work items."""
    return [([int(p) for p in idx], [texts[p] for p in idx]) for idx in encoder.plan_batches(texts)]


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


class BaseRunner(abc.ABC):
    """One execution path (`run`) per runner; generation and encoding are written once on top of it."""

    kind: str = "abstract"

    def __init__(self, engine: Engine):
        self.engine = engine

    @abc.abstractmethod
    def run(
        self,
        handler: BatchModel,
        shards: list[list[Any]],
        on_shard: OnShard,
        sink: "CacheSink | None" = None,
        scratch: str | None = None,
    ) -> None:
        """Run `handler` over `shards`; `on_shard(index, results, committed)` once per shard.
        `sink`: where workers may commit results themselves; `scratch`: a folder every worker and the
        driver share (a runner that moves data through files needs one of the two)."""

    def execute(
        self, shards: list[list[GenerationRequest]], on_shard: Callable[..., None], sink: "CacheSink | None" = None
    ) -> None:
        """The augmentation stage: the engine over request shards; `on_shard(results, committed)`."""
        if shards:
            self.run(self.engine, shards, lambda _index, results, committed: on_shard(results, committed), sink)

    def encoder_handler(self, encoder: "TextEncoder") -> BatchModel:
        """The handler the encode stage runs: the encoder's config and identity, built on the workers."""
        from recaug.encoders.text_encoder import TextEncoderHandler

        return TextEncoderHandler(encoder.cfg, encoder.encoder_id)

    def encode(self, texts: list[str], encoder: "TextEncoder", scratch: str | None = None) -> np.ndarray:
        """Vectors of `texts` (rows in order): the planned batches through `run`, put back in order."""
        from recaug.core.progress import progress_wanted
        from recaug.encoders.text_encoder import PROGRESS_MIN_BATCHES

        texts = list(texts)
        if not texts:
            return np.zeros((0, encoder.dim), dtype=np.float32)
        batches = encode_batches(texts, encoder)
        shards = [list(zip(positions, batch_texts)) for positions, batch_texts in batches]
        pieces: list[tuple[list[int], np.ndarray]] = []
        bar = None
        if progress_wanted(encoder.progress) and len(batches) >= PROGRESS_MIN_BATCHES:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), desc="encode", unit="text", file=sys.stderr, dynamic_ncols=True)

        def on_batch(index: int, vectors: np.ndarray, _committed: bool) -> None:
            pieces.append((batches[index][0], vectors))
            if bar is not None:
                bar.update(len(vectors))

        try:
            self.run(self.encoder_handler(encoder), shards, on_batch, scratch=scratch)
        finally:
            if bar is not None:
                bar.close()
        return assemble_vectors(len(texts), encoder.dim, pieces)

    def close(self) -> None:
        pass


def make_runner(cfg: RunnerConfig, engine: Engine) -> BaseRunner:
    """The runner named by `runner.kind`, wrapping an engine that has not been loaded yet (Ray and
    Beam ship it to their workers, which load their own model object once each)."""
    if cfg.kind == "local":
        from recaug.pipelines.runners.local import LocalRunner

        return LocalRunner(engine)
    if cfg.kind == "ray":
        try:
            from recaug.pipelines.runners.ray_runner import RayRunner
        except ImportError as exc:
            raise ImportError(f"runner.kind 'ray' needs Ray Data: pip install 'recaug[ray]' ({exc})") from None
        return RayRunner(cfg, engine)
    if cfg.kind == "beam":
        try:
            from recaug.pipelines.runners.beam_runner import BeamRunner
        except ImportError as exc:
            raise ImportError(f"runner.kind 'beam' needs Apache Beam: pip install 'recaug[beam]' ({exc})") from None
        return BeamRunner(cfg, engine)
    raise ValueError(f"unknown runner.kind {cfg.kind!r}; expected local, ray or beam")
