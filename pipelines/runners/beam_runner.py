"""The Beam runner: read shards -> RunInference(the handler) -> one outcome file per shard.

One Beam ModelHandler (`SeamModelHandler`) serves every batch-model handler (an LLM engine, a text
encoder): `load_model()` is the handler's, and one inference call is one shard (RunInference batches
exactly one element per call), run under the shared failure policy (batch_model.run_shard), so the
model sees the same batches as under the local runner and greedy outputs match. With a cache sink
(the augmentation stage) workers commit each finished shard to the cache themselves through the
picklable `CacheSink`; a shard that raised is not committed (its error results are not cached: the
next run asks again).

The shards go in as a text file (one line per shard) and every outcome comes out as a file of its
own (batch_model.dump_outcome), in a run folder on storage every worker and the driver share: next
to the cache (the sink's root) or in the caller's scratch folder (the encoding cache's). After the
pipeline finishes the driver reads the outcomes back in shard order and batch_model.deliver hands
every shard to `on_shard` exactly once; the run folder is removed whatever happened (`_run_folder`,
the one run-then-clean-up).

`runner.beam_options` are passed verbatim to `PipelineOptions`, so `--runner=DataflowRunner ...`,
`--runner=FlinkRunner ...` or `--runner=SparkRunner ...` run the same pipeline there. Without a
`--runner` option the pipeline runs in this process on the FnApiRunner: no job server, no
download (the DirectRunner may hand pipelines to Prism, which fetches a Go binary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

# Importing Beam logs a warning about optional GCP client libraries through the root logger, which
# would install a root handler (logging.basicConfig) and turn on every library's INFO output in
# the CLI. A temporary null handler keeps this process's logging set-up as it was.
_root_logger = logging.getLogger()
_import_guard = logging.NullHandler() if not _root_logger.handlers else None
if _import_guard is not None:
    _root_logger.addHandler(_import_guard)
try:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.ml.inference.base import ModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
finally:
    if _import_guard is not None:
        _root_logger.removeHandler(_import_guard)

from recaug.core.batch_model import (
    BatchModel,
    OnShard,
    RunnerError,
    ShardOutcome,
    deliver,
    dump_outcome,
    load_outcome,
    run_shard,
)
from recaug.pipelines.cache import CacheSink, GenerationCache
from recaug.core.config import RunnerConfig
from recaug.pipelines.engines.base import FINISH_ERROR, Engine
from recaug.pipelines.runners import BaseRunner

log = logging.getLogger(__name__)

Element = tuple[int, list]  # (shard index, its items): one pipeline element


class SeamModelHandler(ModelHandler[Element, ShardOutcome, Any]):
    """Beam's model seam over ours: load_model() = the handler's; one inference call = one shard."""

    def __init__(self, handler: BatchModel):
        # exactly one element (one shard) per batch: RunInference must never merge or split shards
        super().__init__(min_batch_size=1, max_batch_size=1)
        self.handler = handler

    def load_model(self) -> Any:
        return self.handler.load_model()

    def run_inference(
        self, batch: Sequence[Element], model: Any, inference_args: dict[str, Any] | None = None
    ) -> Iterable[ShardOutcome]:
        return [run_shard(self.handler, model, index, items) for index, items in batch]

    def get_num_bytes(self, batch: Sequence[Element]) -> int:
        return sum(len(self.handler.dump_batch(items)) for _, items in batch)

    def get_metrics_namespace(self) -> str:
        return "recaug"


def outcome_path(run_dir: str, index: int) -> str:
    return FileSystems.join(run_dir, f"outcome-{index:08d}.bin")


class WriteOutcome(beam.DoFn):
    """Commits a finished shard through the sink (when there is one), then writes its outcome file; a
    retried bundle rewrites the same file with the same outcome."""

    def __init__(self, handler: BatchModel, run_dir: str, sink: CacheSink | None):
        self.handler = handler
        self.run_dir = run_dir
        self.sink = sink

    def process(self, outcome: ShardOutcome):
        if self.sink is not None and outcome.fatal is None and outcome.failed is None:
            self.sink.commit(outcome.results)  # error results are not cached: the next run retries them
            outcome = dataclasses.replace(outcome, committed=True)
        with FileSystems.create(outcome_path(self.run_dir, outcome.index)) as fh:
            fh.write(dump_outcome(self.handler, outcome))
        yield outcome.index


def element_from_line(line: str, handler: BatchModel) -> Element:
    index, _, batch = line.partition("\t")
    return int(index), handler.load_batch(batch)


def write_shards(handler: BatchModel, shards: list[list], path: str) -> None:
    """One line per shard: its index, a tab, the handler's one-line text form of the shard."""
    with FileSystems.create(path) as fh:
        for index, shard in enumerate(shards):
            line = handler.dump_batch(shard)
            if "\n" in line or "\r" in line:
                raise RunnerError(f"{type(handler).__name__}.dump_batch wrote a line break; a shard must be one line")
            fh.write(f"{index}\t{line}\n".encode("utf-8"))


def pipeline_options(cfg: RunnerConfig) -> PipelineOptions:
    return PipelineOptions(list(cfg.beam_options))


def uses_in_process_runner(options: PipelineOptions) -> bool:
    return options.view_as(StandardOptions).runner is None


class BeamRunner(BaseRunner):
    kind = "beam"

    def __init__(self, cfg: RunnerConfig, engine: Engine):
        super().__init__(engine)
        self.cfg = cfg
        self.options = pipeline_options(cfg)

    def _pipeline(self) -> beam.Pipeline:
        if uses_in_process_runner(self.options):
            from apache_beam.runners.portability.fn_api_runner import FnApiRunner

            return beam.Pipeline(runner=FnApiRunner(), options=self.options)
        return beam.Pipeline(options=self.options)

    def build(self, pipeline: beam.Pipeline, handler: BatchModel, shards_path: str, run_dir: str,
              sink: CacheSink | None) -> None:
        _ = (
            pipeline
            # shards come from a file, not Create: a large run would not fit in the job graph (Dataflow
            # caps its size); one line = one shard, and the reshuffle spreads shards over workers
            | "ReadShards" >> beam.io.ReadFromText(shards_path)
            | "ParseShards" >> beam.Map(element_from_line, handler)
            | "SpreadShards" >> beam.Reshuffle()
            | "Run" >> RunInference(SeamModelHandler(handler))
            | "WriteOutcomes" >> beam.ParDo(WriteOutcome(handler, run_dir, sink))
        )

    def run(self, handler: BatchModel, shards: list[list[Any]], on_shard: OnShard,
            sink: CacheSink | None = None, scratch: str | None = None) -> None:
        if not shards:
            return
        root = scratch if scratch is not None else (sink.root if sink is not None else None)
        if root is None:
            raise ValueError(
                "the Beam runner works through files every worker and the driver share: it needs the cache sink "
                "(execute(..., sink)) or a shared scratch folder (encode(..., scratch))"
            )
        with _run_folder(root) as run_dir:
            shards_path = FileSystems.join(run_dir, "shards.txt")
            write_shards(handler, shards, shards_path)
            pipeline = self._pipeline()
            self.build(pipeline, handler, shards_path, run_dir, sink)
            state = pipeline.run().wait_until_finish()
            if state != "DONE":
                raise RunnerError(f"the Beam pipeline ended in state {state}; see the runner's logs")
            outcomes = [read_outcome(handler, run_dir, index) for index in range(len(shards))]
            if sink is not None:
                check_committed(sink, outcomes)
            deliver(handler, shards, outcomes, on_shard)


def read_outcome(handler: BatchModel, run_dir: str, index: int) -> ShardOutcome:
    path = outcome_path(run_dir, index)
    if not FileSystems.exists(path):
        raise RunnerError(
            f"shard {index} has no outcome file in {run_dir}; the cache / encoding-cache folder must be on storage "
            "every worker writes and the driver reads (see docs/scaling.md)"
        )
    with FileSystems.open(path) as fh:
        return load_outcome(handler, fh.read())


def check_committed(sink: CacheSink, outcomes: list[ShardOutcome]) -> None:
    """The rows workers committed must be readable here, or the next run would miss them."""
    stored = {o.index: [r.key for r in o.results if r.finish_reason != FINISH_ERROR] for o in outcomes if o.committed}
    found = set(GenerationCache(Path(sink.root)).lookup([k for keys in stored.values() for k in keys])["cache_key"].to_list())
    for index, keys in stored.items():
        if any(k not in found for k in keys):
            raise RunnerError(
                f"shard {index} was committed by a Beam worker but its rows are not in the cache at "
                f"{sink.root}; the cache root must be on storage every worker writes and the driver reads "
                "(see docs/scaling.md)"
            )


@contextlib.contextmanager
def _run_folder(root: str) -> Iterator[str]:
    """A fresh run folder under `root`, removed afterwards whatever happened."""
    run_dir = FileSystems.join(root, "beam-runs", uuid.uuid4().hex)
    try:
        yield run_dir
    finally:
        try:
            if FileSystems.exists(run_dir):
                FileSystems.delete([run_dir])
        except Exception as exc:  # leftover outcome files are harmless; say so rather than fail the run
            log.warning("could not remove the Beam run folder %s: %s", run_dir, exc)
