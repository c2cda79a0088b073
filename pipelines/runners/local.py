"""The local runner: the engine runs in this process, one shard at a time (the embedded default)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from recaug.pipelines.cache import CacheSink
from recaug.pipelines.engines.base import Engine, GenerationRequest, GenerationResult


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
        for shard in shards:
            on_shard(self.engine.generate(shard))

    def encode(self, texts: list[str], encoder, scratch: str | None = None) -> np.ndarray:
        return encoder.encode(texts)

    def close(self) -> None:
        pass
