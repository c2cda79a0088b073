"""The Beam runner: read shards -> RunInference(engine seam) -> commit each shard to the cache.

A shard is one pipeline element from start to end (RunInference batches exactly one element per
call), so the engine sees the same batches as under the local runner and greedy outputs match.
Workers commit finished shards to the cache themselves through the picklable `CacheSink`; a shard
whose engine call raises goes to RunInference's dead-letter output instead of failing the job.
The shards go in, and both outcomes come out, as JSON-lines files in a run folder next to the cache;
after the pipeline finishes the driver reads the outcomes and the committed rows back and hands every
shard to `on_shard` exactly once.

The encode stage is a second pipeline of the same shape: read the planned encoder batches ->
RunInference(EncoderModelHandler, one batch per call) -> one Parquet file of vectors per batch in the
run folder, which the driver reads back (and commits to the encoding cache, as on every runner).

`runner.beam_options` are passed verbatim to `PipelineOptions`, so `--runner=DataflowRunner ...`,
`--runner=FlinkRunner ...` or `--runner=SparkRunner ...` run the same pipeline there. Without a
`--runner` option the pipeline runs in this process on the FnApiRunner: no job server, no
download (the DirectRunner may hand pipelines to Prism, which fetches a Go binary).
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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

from recaug.pipelines.cache import CacheSink, GenerationCache
from recaug.core.config import EncoderConfig, EngineConfig, RunnerConfig
from recaug.pipelines.engines.base import FINISH_ERROR, Engine, EngineError, GenerationRequest, GenerationResult
from recaug.pipelines.runners import (
    EncodeBatch,
    RunnerError,
    assemble_vectors,
    check_shard,
    encode_batches,
    encode_one_batch,
    error_results,
    worker_encoder,
)

log = logging.getLogger(__name__)

Shard = tuple[int, list[GenerationRequest]]  # (shard index, its requests): one pipeline element


class EngineModelHandler(ModelHandler[Shard, tuple[int, list[GenerationResult]], Engine]):
    """Beam's model seam over ours: load_model() = engine.load(); one inference call = one shard."""

    def __init__(self, engine: Engine):
        # exactly one element (one shard) per batch: RunInference must never merge or split shards
        super().__init__(min_batch_size=1, max_batch_size=1)
        self.engine = engine

    def load_model(self) -> Engine:
        self.engine.load()
        return self.engine

    def run_inference(
        self, batch: Sequence[Shard], model: Engine, inference_args: dict[str, Any] | None = None
    ) -> Iterable[tuple[int, list[GenerationResult]]]:
        out = []
        for index, requests in batch:
            results = model.generate(list(requests))
            check_shard(index, requests, results)
            out.append((index, results))
        return out

    def get_num_bytes(self, batch: Sequence[Shard]) -> int:
        return sum(len(m["content"]) for _, requests in batch for r in requests for m in r.messages)

    def get_metrics_namespace(self) -> str:
        return "recaug"


class EncoderModelHandler(ModelHandler[EncodeBatch, tuple[int, list[int], np.ndarray], Any]):
    """RunInference over our encoder: load_model() builds the TextEncoder once per worker; one
    inference call = one planned encoder batch, encoded whole (same tensors as in-process)."""

    def __init__(self, cfg: EncoderConfig, encoder_id: str):
        super().__init__(min_batch_size=1, max_batch_size=1)
        self.cfg = cfg
        self.encoder_id = encoder_id

    def load_model(self):
        return worker_encoder(self.cfg, self.encoder_id)

    def run_inference(
        self, batch: Sequence[EncodeBatch], model, inference_args: dict[str, Any] | None = None
    ) -> Iterable[tuple[int, list[int], np.ndarray]]:
        return [(index, positions, encode_one_batch(model, texts)) for index, positions, texts in batch]

    def get_num_bytes(self, batch: Sequence[EncodeBatch]) -> int:
        return sum(len(t) for _, _, texts in batch for t in texts)

    def get_metrics_namespace(self) -> str:
        return "recaug"


def vectors_path(run_dir: str, index: int) -> str:
    return FileSystems.join(run_dir, f"vectors-{index:08d}.parquet")


class WriteVectors(beam.DoFn):
    """One encoded batch -> one Parquet file (position, vector: fixed_size_list<float32>[d]); a retried
    bundle rewrites the same file with the same vectors."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def process(self, element: tuple[int, list[int], np.ndarray]):
        from recaug.schemas.vectors import fixed_size_vectors

        index, positions, vectors = element
        table = pa.Table.from_arrays([pa.array(positions, pa.int64()), fixed_size_vectors(vectors)],
                                     names=["position", "vector"])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        with FileSystems.create(vectors_path(self.run_dir, index)) as fh:
            fh.write(sink.getvalue().to_pybytes())
        yield index


def encode_batch_to_json(batch: EncodeBatch) -> str:
    index, positions, texts = batch
    return json.dumps({"batch": index, "positions": positions, "texts": texts})  # ASCII: one batch = one line


def encode_batch_from_json(line: str) -> EncodeBatch:
    record = json.loads(line)
    return int(record["batch"]), [int(p) for p in record["positions"]], list(record["texts"])


def result_to_record(r: GenerationResult) -> dict[str, Any]:
    return {"key": r.key, "text": r.text, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
            "finish_reason": r.finish_reason, "latency_s": r.latency_s, "error": r.error,
            "extra": json.loads(json.dumps(r.extra, default=str))}


def result_from_record(d: dict[str, Any]) -> GenerationResult:
    return GenerationResult(d["key"], d["text"], int(d["input_tokens"]), int(d["output_tokens"]), d["finish_reason"],
                            float(d["latency_s"]), error=d["error"], extra=d["extra"])


class CommitShard(beam.DoFn):
    """Writes one finished shard to the cache; emits its outcome with every result as the engine
    returned it (the cache keeps only part of a result: no `extra`, no errors, latency as float32)."""

    def __init__(self, sink: CacheSink):
        self.sink = sink

    def process(self, element: tuple[int, list[GenerationResult]]):
        index, results = element
        stored = self.sink.commit(results)  # engine errors are not cached: the next run retries them
        # ASCII JSON: one outcome = one line, whatever characters the model wrote
        yield json.dumps({"shard": index, "stored": stored, "results": [result_to_record(r) for r in results]})


def dead_letter_records(failed: tuple[Sequence[Shard], tuple[type, str, list[str]]]) -> Iterable[str]:
    """RunInference's dead letter (failed batch, (exception type, repr, traceback)) -> one record per shard."""
    batch, (exc_type, exc_repr, _traceback) = failed
    fatal = isinstance(exc_type, type) and issubclass(exc_type, EngineError)
    for index, _requests in batch:
        yield json.dumps({"shard": index, "dead_letter": exc_repr, "engine_error": fatal})


def shard_to_json(index: int, shard: list[GenerationRequest]) -> str:
    requests = [{"key": r.key, "messages": list(r.messages), "max_new_tokens": r.max_new_tokens,
                 "json_schema": r.json_schema} for r in shard]
    return json.dumps({"shard": index, "requests": requests}, ensure_ascii=False)


def shard_from_json(line: str) -> Shard:
    record = json.loads(line)
    requests = [GenerationRequest(r["key"], tuple(r["messages"]), int(r["max_new_tokens"]), r["json_schema"])
                for r in record["requests"]]
    return int(record["shard"]), requests


def write_shards(shards: list[list[GenerationRequest]], path: str) -> None:
    with FileSystems.create(path) as fh:
        for index, shard in enumerate(shards):
            fh.write((shard_to_json(index, shard) + "\n").encode("utf-8"))


def pipeline_options(cfg: RunnerConfig) -> PipelineOptions:
    return PipelineOptions(list(cfg.beam_options))


def uses_in_process_runner(options: PipelineOptions) -> bool:
    return options.view_as(StandardOptions).runner is None


class BeamRunner:
    kind = "beam"

    def __init__(self, cfg: RunnerConfig, engine: Engine, engine_cfg: EngineConfig | None = None):
        self.cfg = cfg
        self.engine = engine
        self.engine_cfg = engine_cfg
        self.options = pipeline_options(cfg)

    def _pipeline(self) -> beam.Pipeline:
        if uses_in_process_runner(self.options):
            from apache_beam.runners.portability.fn_api_runner import FnApiRunner

            return beam.Pipeline(runner=FnApiRunner(), options=self.options)
        return beam.Pipeline(options=self.options)

    def build(self, pipeline: beam.Pipeline, shards_path: str, sink: CacheSink, outcome_prefix: str) -> None:
        inferred, dead = (
            pipeline
            # shards come from a file, not Create: a large run would not fit in the job graph (Dataflow
            # caps its size); one line = one shard, and the reshuffle spreads shards over workers
            | "ReadShards" >> beam.io.ReadFromText(shards_path)
            | "ParseShards" >> beam.Map(shard_from_json)
            | "SpreadShards" >> beam.Reshuffle()
            | "Generate" >> RunInference(EngineModelHandler(self.engine)).with_exception_handling()
        )
        committed = inferred | "Commit" >> beam.ParDo(CommitShard(sink))
        dead_lettered = dead.failed_inferences | "DeadLetter" >> beam.FlatMap(dead_letter_records)
        _ = (
            (committed, dead_lettered)
            | "Outcomes" >> beam.Flatten()
            | "WriteOutcomes" >> beam.io.WriteToText(outcome_prefix, file_name_suffix=".jsonl")
        )

    def execute(
        self,
        shards: list[list[GenerationRequest]],
        on_shard: Callable[..., None],
        sink: CacheSink | None = None,
    ) -> None:
        if not shards:
            return
        if sink is None:
            raise ValueError("the Beam runner commits shards on its workers and needs the cache sink (execute(..., sink))")
        # the run's shards and outcomes live next to the cache: storage every worker and the driver share
        run_dir = FileSystems.join(sink.root, "beam-runs", uuid.uuid4().hex)
        shards_path = FileSystems.join(run_dir, "shards.jsonl")
        outcome_prefix = FileSystems.join(run_dir, "outcome")
        try:
            write_shards(shards, shards_path)
            pipeline = self._pipeline()
            self.build(pipeline, shards_path, sink, outcome_prefix)
            state = pipeline.run().wait_until_finish()
            if state != "DONE":
                raise RunnerError(f"the Beam pipeline ended in state {state}; see the runner's logs")
            self._deliver(shards, read_outcomes(outcome_prefix), sink, on_shard)
        finally:
            _remove_run_dir(run_dir)

    def _deliver(self, shards, outcomes: dict[int, dict], sink: CacheSink, on_shard) -> None:
        missing = sorted(set(range(len(shards))) - set(outcomes))
        if missing:
            raise RunnerError(f"the Beam pipeline reported no outcome for shard(s) {missing[:10]} of {len(shards)}")
        delivered = {}
        for index, shard in enumerate(shards):
            outcome = outcomes[index]
            if "dead_letter" not in outcome:
                delivered[index] = [result_from_record(d) for d in outcome["results"]]
                check_shard(index, shard, delivered[index])
        # the results travel in the outcome files; the committed rows must also be readable here
        stored_keys = [r.key for results in delivered.values() for r in results if r.finish_reason != FINISH_ERROR]
        found = set(GenerationCache(Path(sink.root)).lookup(stored_keys)["cache_key"].to_list())
        for index, shard in enumerate(shards):
            outcome = outcomes[index]
            if outcome.get("engine_error"):  # nothing can work: stop as the local runner does
                raise EngineError(f"the engine failed on a Beam worker: {outcome['dead_letter']}")
            if "dead_letter" in outcome:
                reason = f"shard dead-lettered by the Beam runner: {outcome['dead_letter']}"
                on_shard(error_results(shard, reason), False)
                continue
            lost = [r.key for r in delivered[index] if r.finish_reason != FINISH_ERROR and r.key not in found]
            if lost:
                raise RunnerError(
                    f"shard {index} was committed by a Beam worker but its rows are not in the cache at "
                    f"{sink.root}; the cache root must be on storage every worker writes and the driver reads "
                    "(see docs/scaling.md)"
                )
            on_shard(delivered[index], True)

    def build_encode(self, pipeline: beam.Pipeline, batches_path: str, encoder, run_dir: str) -> None:
        _ = (
            pipeline
            | "ReadBatches" >> beam.io.ReadFromText(batches_path)
            | "ParseBatches" >> beam.Map(encode_batch_from_json)
            | "SpreadBatches" >> beam.Reshuffle()
            | "Encode" >> RunInference(EncoderModelHandler(encoder.cfg, encoder.encoder_id))
            | "WriteVectors" >> beam.ParDo(WriteVectors(run_dir))
        )

    def encode(self, texts: list[str], encoder, scratch: str | None = None) -> np.ndarray:
        """Vectors of `texts` (rows in order). `scratch` is a folder every worker and the driver share
        (the encoding cache's): the batches go in and the vectors come out there."""
        from recaug.schemas.vectors import vectors_numpy

        if not texts:
            return np.zeros((0, encoder.dim), dtype=np.float32)
        if scratch is None:
            raise ValueError("the Beam runner encodes on its workers and needs a shared scratch folder (encode(..., scratch))")
        batches = encode_batches(list(texts), encoder)
        run_dir = FileSystems.join(scratch, "beam-runs", uuid.uuid4().hex)
        batches_path = FileSystems.join(run_dir, "batches.jsonl")
        try:
            with FileSystems.create(batches_path) as fh:
                for batch in batches:
                    fh.write((encode_batch_to_json(batch) + "\n").encode("utf-8"))
            pipeline = self._pipeline()
            self.build_encode(pipeline, batches_path, encoder, run_dir)
            state = pipeline.run().wait_until_finish()
            if state != "DONE":
                raise RunnerError(f"the Beam encode pipeline ended in state {state}; see the runner's logs")
            pieces = []
            for index, positions, _texts in batches:
                path = vectors_path(run_dir, index)
                if not FileSystems.exists(path):
                    raise RunnerError(
                        f"encoder batch {index} has no vectors file in {run_dir}; the encoding cache folder must be on "
                        "storage every worker writes and the driver reads (see docs/scaling.md)"
                    )
                with FileSystems.open(path) as fh:
                    table = pq.read_table(pa.BufferReader(fh.read()))
                if table.column("position").to_pylist() != positions:
                    raise RunnerError(f"encoder batch {index} came back with other rows than were sent")
                pieces.append((positions, vectors_numpy(table)))
            return assemble_vectors(len(texts), encoder.dim, pieces)
        finally:
            _remove_run_dir(run_dir)

    def close(self) -> None:
        pass


def read_outcomes(prefix: str) -> dict[int, dict]:
    """Outcome records by shard index. A shard both committed and dead-lettered cannot happen in one
    attempt; if a retried bundle produced both, the committed one wins (its rows are in the cache)."""
    outcomes: dict[int, dict] = {}
    matches = FileSystems.match([prefix + "*"])[0].metadata_list
    for meta in sorted(matches, key=lambda m: m.path):
        with FileSystems.open(meta.path) as fh:
            for line in fh.read().decode("utf-8").splitlines():
                if not line.strip():
                    continue
                record = json.loads(line)
                index = int(record["shard"])
                if index in outcomes and "dead_letter" in record:
                    continue
                outcomes[index] = record
    return outcomes


def _remove_run_dir(run_dir: str) -> None:
    try:
        if FileSystems.exists(run_dir):
            FileSystems.delete([run_dir])
    except Exception as exc:  # leftover outcome files are harmless; say so rather than fail the run
        log.warning("could not remove the Beam outcome folder %s: %s", run_dir, exc)
