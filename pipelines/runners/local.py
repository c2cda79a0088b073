"""The local runner: the model runs in this process, one shard at a time (the embedded default).

Same policy as on Ray and Beam (recaug.core.batch_model.run_shard / deliver): a shard whose run
raises (or breaks the one-result-per-request contract) becomes per-request error results, which end
in the dead-letter table while the run goes on; they are not cached, so the next run asks again. An
EngineError stops the run with its message instead of trying, and failing, every remaining shard;
finished shards stay cached. The engine's model object is loaded on the first run and kept until
`close()`, so the chunks and augmenters of one job load the model once.
"""

from __future__ import annotations

import time
from typing import Any

from recaug.core.batch_model import BatchModel, OnShard, deliver, run_shard
from recaug.pipelines.runners import BaseRunner


class LocalRunner(BaseRunner):
    kind = "local"

    def __init__(self, engine):
        super().__init__(engine)
        self._engine_model: Any = None
        self.engine_load_seconds: float | None = None  # loading the engine's model, for the run report

    def _model(self, handler: BatchModel) -> Any:
        if handler is not self.engine:
            return handler.load_model()
        if self._engine_model is None:
            started = time.perf_counter()
            self._engine_model = handler.load_model()
            self.engine_load_seconds = (self.engine_load_seconds or 0.0) + time.perf_counter() - started
        return self._engine_model

    def run(self, handler: BatchModel, shards: list[list[Any]], on_shard: OnShard, sink=None, scratch=None) -> None:
        if not shards:
            return
        model = self._model(handler)
        try:
            # lazily, shard by shard: each shard is delivered (and committed by the caller) before the next runs
            deliver(handler, shards, (run_shard(handler, model, i, shard) for i, shard in enumerate(shards)), on_shard)
        finally:
            if handler is not self.engine:
                handler.close_model(model)

    def encode(self, texts: list[str], encoder, scratch: str | None = None):
        # in this process the planned batches are the encoder's own: one call plans (tokenises) once,
        # where the shard path would plan here and again inside each batch's encode
        return encoder.encode(list(texts))

    def close(self) -> None:
        if self._engine_model is not None:
            model, self._engine_model = self._engine_model, None
            self.engine.close_model(model)
