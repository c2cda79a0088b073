"""The local runner: the engine runs in this process, one shard at a time (the embedded default).

A shard whose `generate` call raises (or breaks the one-result-per-request contract) becomes
per-request error results, as on Ray and Beam: those requests end in the dead-letter table and the
run goes on; they are not cached, so the next run asks again. `EngineError` is the exception: the
engine says nothing can work (a server that cannot be reached at all), so the run stops there with
that message instead of trying, and failing, every remaining shard; finished shards stay cached.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from recaug.pipelines.cache import CacheSink
from recaug.pipelines.engines.base import Engine, EngineError, GenerationRequest, GenerationResult
from recaug.pipelines.runners import check_shard, error_results

log = logging.getLogger(__name__)


class LocalRunner:
    kind = "local"

    def __init__(self, engine: Engine):
        self.engine = engine

    def execute(
        self,
        shards: list[list[GenerationRequest]],
        on_shard: Callable[[list[GenerationResult]], None],
        sink: CacheSink | None = None,
    ) -> None:
        self.engine.load()
        for index, shard in enumerate(shards):
            try:
                results = self.engine.generate(shard)
                check_shard(index, shard, results)
            except EngineError:
                raise  # nothing can work: stop now (the CLI exits 2 with the engine's message)
            except Exception as exc:  # the shard fails, the run goes on (same as the Ray and Beam runners)
                log.warning("shard %s failed in the engine: %r", index, exc)
                results = error_results(shard, f"shard failed in the engine: {type(exc).__name__}: {exc}")
            on_shard(results)

    def encode(self, texts: list[str], encoder, scratch: str | None = None) -> np.ndarray:
        return encoder.encode(texts)

    def close(self) -> None:
        pass
