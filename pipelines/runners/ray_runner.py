"""The Ray Data runner: a pool of engine actors, one per GPU (or per CPU slot), one shard per call.

The dataset holds one row per shard (the request lists of that shard as pyarrow list columns, text and
ints only) and `map_batches(batch_size=1)` hands each actor call exactly one row, so the engine sees
the very batches the local runner would send it and greedy outputs match. Results stream back to the
driver as shards finish; the driver commits each one to the cache (the stage does that when
`committed=False`), so a killed run resumes from the last finished shard like a local one.

The encode stage runs the same way: one row per planned encoder batch, `map_batches` into a pool of
encoder actors, vectors back as `fixed_size_list<float32>[d]` (plain Arrow, never Ray's tensor type).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from recaug.pipelines.cache import CacheSink
from recaug.core.config import EncoderConfig, EngineConfig, RunnerConfig
from recaug.pipelines.engines.base import Engine, EngineError, GenerationRequest, GenerationResult
from recaug.pipelines.runners import (
    EncodeBatch,
    RunnerError,
    assemble_vectors,
    check_shard,
    encode_batches,
    encode_one_batch,
    engine_error_results,
    error_results,
    raise_engine_error,
    worker_encoder,
)

log = logging.getLogger(__name__)

# A local Ray session on this machine gets this many CPUs unless told otherwise.
LOCAL_NUM_CPUS = 2

# One row = one shard. Per-request values sit in aligned lists; messages and the JSON schema are
# JSON text so nothing becomes a numpy/tensor extension column on the way through Ray.
SHARD_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int64(), nullable=False),
        pa.field("keys", pa.list_(pa.string()), nullable=False),
        pa.field("messages_json", pa.list_(pa.string()), nullable=False),
        pa.field("max_new_tokens", pa.list_(pa.int64()), nullable=False),
        pa.field("json_schema", pa.list_(pa.string()), nullable=False),  # null item = no schema
    ]
)
RESULT_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int64(), nullable=False),
        pa.field("keys", pa.list_(pa.string()), nullable=False),
        pa.field("text", pa.list_(pa.string()), nullable=False),
        pa.field("input_tokens", pa.list_(pa.int64()), nullable=False),
        pa.field("output_tokens", pa.list_(pa.int64()), nullable=False),
        pa.field("finish_reason", pa.list_(pa.string()), nullable=False),
        pa.field("latency_s", pa.list_(pa.float64()), nullable=False),
        pa.field("error", pa.list_(pa.string()), nullable=False),
        pa.field("extra_json", pa.list_(pa.string()), nullable=False),
    ]
)


# One row = one planned encoder batch (row positions in the input, and their texts).
ENCODE_BATCH_SCHEMA = pa.schema(
    [
        pa.field("batch", pa.int64(), nullable=False),
        pa.field("positions", pa.list_(pa.int64()), nullable=False),
        pa.field("texts", pa.list_(pa.string()), nullable=False),
    ]
)


def vectors_schema(dim: int) -> pa.Schema:
    """What encoder actors return: one row per text."""
    return pa.schema([pa.field("position", pa.int64(), nullable=False),
                      pa.field("vector", pa.list_(pa.float32(), dim), nullable=False)])


def engine_wants_gpu(engine_cfg: EngineConfig | None) -> bool:
    return engine_cfg is not None and (engine_cfg.kind == "vllm" or engine_cfg.device.startswith("cuda"))


def actor_resources(cfg: RunnerConfig, engine_cfg: EngineConfig | None = None) -> dict[str, float]:
    """What each engine actor asks Ray for. CPUs may be fractional (0.5 by default) so a 2-core
    machine never deadlocks between the actors and Ray Data's own tasks; a GPU engine with
    `gpus_per_actor: 0` gets one whole GPU per actor (one engine actor per GPU)."""
    gpus = cfg.gpus_per_actor
    if gpus == 0 and engine_wants_gpu(engine_cfg):
        gpus = 1.0
    return {"num_cpus": float(cfg.cpus_per_actor), "num_gpus": float(gpus)}


def encoder_actor_resources(cfg: RunnerConfig, encoder_cfg: EncoderConfig) -> dict[str, float]:
    """What each encoder actor asks Ray for: the same fractional CPU share as an engine actor, and a
    GPU share only when the encoder runs on CUDA."""
    gpus = (cfg.gpus_per_actor or 1.0) if encoder_cfg.device.startswith("cuda") else 0.0
    return {"num_cpus": float(cfg.cpus_per_actor), "num_gpus": float(gpus)}


def pool_size(cfg: RunnerConfig, resources: dict[str, float], cluster: dict[str, float], num_shards: int) -> int:
    """num_actors from the config, else one actor per GPU (GPU engines) or per whole CPU; never more
    actors than shards. Refuses a pool the cluster can never place instead of waiting forever."""
    gpus = resources["num_gpus"]
    if cfg.num_actors is not None:
        wanted = cfg.num_actors
    elif gpus > 0:
        wanted = int(cluster.get("GPU", 0.0) // gpus)
    else:
        wanted = max(1, int(cluster.get("CPU", 1.0)))
    if gpus > 0 and gpus * max(1, wanted) > cluster.get("GPU", 0.0) + 1e-9:
        raise RunnerError(
            f"runner.gpus_per_actor={gpus} x {max(1, wanted)} actor(s) needs more GPUs than the Ray cluster has "
            f"({cluster.get('GPU', 0.0):g}); lower runner.num_actors / runner.gpus_per_actor or add GPU nodes"
        )
    return max(1, min(wanted, num_shards))


def shards_to_tables(shards: list[list[GenerationRequest]]) -> list[pa.Table]:
    """One single-row table per shard: Ray makes one block of each, so shards spread over actors."""
    tables = []
    for index, shard in enumerate(shards):
        row = {
            "shard": [index],
            "keys": [[r.key for r in shard]],
            "messages_json": [[json.dumps(list(r.messages), ensure_ascii=False) for r in shard]],
            "max_new_tokens": [[r.max_new_tokens for r in shard]],
            "json_schema": [[None if r.json_schema is None else json.dumps(r.json_schema) for r in shard]],
        }
        tables.append(pa.table(row, schema=SHARD_SCHEMA))
    return tables


def requests_from_row(row: dict[str, Any]) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            key=key,
            messages=tuple(json.loads(messages)),
            max_new_tokens=int(max_new),
            json_schema=None if schema is None else json.loads(schema),
        )
        for key, messages, max_new, schema in zip(
            row["keys"], row["messages_json"], row["max_new_tokens"], row["json_schema"], strict=True
        )
    ]


def results_to_table(shard_results: list[tuple[int, list[GenerationResult]]]) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in RESULT_SCHEMA.names}
    for index, results in shard_results:
        cols["shard"].append(index)
        cols["keys"].append([r.key for r in results])
        cols["text"].append([r.text for r in results])
        cols["input_tokens"].append([int(r.input_tokens) for r in results])
        cols["output_tokens"].append([int(r.output_tokens) for r in results])
        cols["finish_reason"].append([r.finish_reason for r in results])
        cols["latency_s"].append([float(r.latency_s) for r in results])
        cols["error"].append([r.error for r in results])
        cols["extra_json"].append([json.dumps(r.extra, ensure_ascii=False, default=str) for r in results])
    return pa.table(cols, schema=RESULT_SCHEMA)


def results_from_table(table: pa.Table) -> list[tuple[int, list[GenerationResult]]]:
    out = []
    for row in table.to_pylist():
        results = [
            GenerationResult(key=k, text=t, input_tokens=i, output_tokens=o, finish_reason=f, latency_s=lat,
                             error=e, extra=json.loads(x))
            for k, t, i, o, f, lat, e, x in zip(
                row["keys"], row["text"], row["input_tokens"], row["output_tokens"], row["finish_reason"],
                row["latency_s"], row["error"], row["extra_json"], strict=True,
            )
        ]
        out.append((int(row["shard"]), results))
    return out


class ShardGenerator:
    """The engine actor: loads the engine once, then generates one shard per call."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.engine.load()

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():  # batch_size=1: exactly one shard
            requests = requests_from_row(row)
            try:
                results = self.engine.generate(requests)
                check_shard(row["shard"], requests, results)
            except EngineError as exc:  # nothing can work: the driver stops the run (as the local runner does)
                results = engine_error_results(requests, exc)
            except Exception as exc:  # the shard fails, the run goes on (same as Beam's dead letters)
                log.warning("shard %s failed in the engine: %r", row["shard"], exc)
                results = error_results(requests, f"shard failed in the engine: {type(exc).__name__}: {exc}")
            out.append((row["shard"], results))
        return results_to_table(out)


def encode_batches_to_tables(batches: list[EncodeBatch]) -> list[pa.Table]:
    """One single-row table per encoder batch, so batches spread over actors and are never regrouped."""
    return [pa.table({"batch": [i], "positions": [positions], "texts": [texts]}, schema=ENCODE_BATCH_SCHEMA)
            for i, positions, texts in batches]


class BatchEncoder:
    """The encoder actor: builds the encoder once, then encodes one planned batch per call."""

    def __init__(self, cfg: EncoderConfig, encoder_id: str):
        self.encoder = worker_encoder(cfg, encoder_id)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from recaug.schemas.vectors import fixed_size_vectors

        positions, vectors = [], []
        for row in batch.to_pylist():  # batch_size=1: exactly one encoder batch
            positions.extend(row["positions"])
            vectors.append(encode_one_batch(self.encoder, row["texts"]))
        stacked = np.concatenate(vectors) if vectors else np.zeros((0, self.encoder.dim), dtype=np.float32)
        return pa.Table.from_arrays([pa.array(positions, pa.int64()), fixed_size_vectors(stacked)],
                                    schema=vectors_schema(self.encoder.dim))


def _not_progress_bar_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")


def quiet_ray_data_console() -> None:
    """Ray Data prints INFO lines per dataset ("execution finished in ...") and a notice that we turned
    its progress bars off; keep warnings and errors on the console. Its full log still goes to
    the session's ray-data.log."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
            if _not_progress_bar_notice not in handler.filters:
                handler.addFilter(_not_progress_bar_notice)


class RayRunner:
    kind = "ray"

    def __init__(
        self,
        cfg: RunnerConfig,
        engine: Engine,
        engine_cfg: EngineConfig | None = None,
        *,
        address: str | None = None,
        local_num_cpus: int = LOCAL_NUM_CPUS,
        local_num_gpus: int | None = None,
    ):
        """`address` (or RAY_ADDRESS) joins an existing cluster; otherwise a local session starts on
        first use with `local_num_cpus` (and `local_num_gpus` logical GPUs, for tests). A Ray
        session already initialised in this process is reused and left running."""
        self.cfg = cfg
        self.engine = engine
        self.engine_cfg = engine_cfg
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.local_num_cpus = local_num_cpus
        self.local_num_gpus = local_num_gpus
        self.resources = actor_resources(cfg, engine_cfg)
        self._started_ray = False

    def start(self) -> None:
        """Join or start the Ray session (done on first use; idempotent)."""
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        if ray.is_initialized():
            return
        quiet = not log.isEnabledFor(logging.DEBUG)
        common = dict(
            include_dashboard=False,
            logging_level=logging.WARNING if quiet else logging.INFO,
            log_to_driver=not quiet,
            # workers inherit these: no usage reporting, no hub look-ups from engine actors
            runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                                      "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
        if self.address:
            ray.init(address=self.address, **common)
        else:
            ray.init(num_cpus=self.local_num_cpus, num_gpus=self.local_num_gpus, _node_ip_address="127.0.0.1",
                     **common)
        self._started_ray = True

    def _start_quietly(self) -> None:
        import ray

        self.start()
        ctx = ray.data.DataContext.get_current()  # the driver's: progress goes through the stage's own bar
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.enable_auto_log_stats = False
        if not log.isEnabledFor(logging.DEBUG):
            quiet_ray_data_console()

    def dataset(self, shards: list[list[GenerationRequest]]):
        """The lazy Ray dataset of shard results (nothing runs until it is iterated)."""
        import ray

        self._start_quietly()
        size = pool_size(self.cfg, self.resources, ray.cluster_resources(), len(shards))
        gpus = {"num_gpus": self.resources["num_gpus"]} if self.resources["num_gpus"] > 0 else {}
        return ray.data.from_arrow(shards_to_tables(shards)).map_batches(
            ShardGenerator,
            fn_constructor_kwargs={"engine": self.engine},
            batch_size=1,  # one row = one whole shard per engine call
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=self.resources["num_cpus"],
            **gpus,
        )

    def execute(
        self,
        shards: list[list[GenerationRequest]],
        on_shard: Callable[..., None],
        sink: CacheSink | None = None,
    ) -> None:
        if not shards:
            return
        delivered: set[int] = set()
        for batch in self.dataset(shards).iter_batches(batch_size=None, batch_format="pyarrow"):
            for index, results in results_from_table(batch):
                if index in delivered:  # a retried task after an actor restart: the first copy counts
                    log.warning("shard %d came back twice; the duplicate is ignored", index)
                    continue
                check_shard(index, shards[index], results)
                raise_engine_error(results[0].error if results else None)
                delivered.add(index)
                on_shard(results, False)  # the driver commits it (resume point)
        missing = sorted(set(range(len(shards))) - delivered)
        if missing:
            raise RunnerError(f"Ray returned no result for shard(s) {missing[:10]} of {len(shards)}")

    def encode_dataset(self, batches: list[EncodeBatch], encoder):
        """The lazy Ray dataset of (position, vector) rows for the planned encoder batches."""
        import ray

        self._start_quietly()
        resources = encoder_actor_resources(self.cfg, encoder.cfg)
        size = pool_size(self.cfg, resources, ray.cluster_resources(), len(batches))
        gpus = {"num_gpus": resources["num_gpus"]} if resources["num_gpus"] > 0 else {}
        return ray.data.from_arrow(encode_batches_to_tables(batches)).map_batches(
            BatchEncoder,
            fn_constructor_kwargs={"cfg": encoder.cfg, "encoder_id": encoder.encoder_id},
            batch_size=1,  # one row = one whole encoder batch
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=resources["num_cpus"],
            **gpus,
        )

    def encode(self, texts: list[str], encoder, scratch: str | None = None) -> np.ndarray:
        """Vectors of `texts` (rows in order), encoded by a pool of encoder actors."""
        if not texts:
            return np.zeros((0, encoder.dim), dtype=np.float32)
        batches = encode_batches(list(texts), encoder)
        tables = self.encode_dataset(batches, encoder).iter_batches(batch_size=None, batch_format="pyarrow")
        return assemble_vectors(len(texts), encoder.dim, _vector_pieces(tables))

    def close(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False


def _vector_pieces(tables):
    from recaug.schemas.vectors import vectors_numpy

    for table in tables:
        if table.num_rows:
            yield table.column("position").to_pylist(), vectors_numpy(table)
