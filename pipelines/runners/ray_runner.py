"""The Ray Data runner: a pool of worker actors, one per GPU (or per CPU slot), one shard per call.

The dataset holds one row per shard (its index and the handler's text form of the shard) and
`map_batches(batch_size=1)` hands each actor call exactly one row, so the model sees the very
batches the local runner would send it and greedy outputs match. One actor class serves every
handler (an LLM engine, a text encoder): it loads the handler's model object once, runs each shard
under the shared failure policy (batch_model.run_shard) and returns the outcome as bytes. Outcomes
stream back to the driver as shards finish and batch_model.deliver hands them on; for the
augmentation stage the driver commits each one to the cache (`committed=False`), so a killed run
resumes from the last finished shard like a local one. What an actor asks Ray for comes from
`handler.resources()` under `runner.cpus_per_actor` / `gpus_per_actor`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow as pa

from recaug.core.offline import OFFLINE_ENV, go_offline
from recaug.core.batch_model import (
    BatchModel,
    OnShard,
    Resources,
    RunnerError,
    deliver,
    dump_outcome,
    load_outcome,
    run_shard,
)
from recaug.core.config import RunnerConfig
from recaug.pipelines.engines.base import Engine
from recaug.pipelines.runners import BaseRunner

log = logging.getLogger(__name__)

# A local Ray session on this machine gets this many CPUs unless told otherwise.
LOCAL_NUM_CPUS = 2

# One row = one shard, in the handler's own text form (plain Arrow: nothing becomes a numpy/tensor
# extension column on the way through Ray); one outcome row = the shard's outcome as bytes.
SHARD_SCHEMA = pa.schema([pa.field("shard", pa.int64(), nullable=False), pa.field("batch", pa.large_string(), nullable=False)])
OUTCOME_SCHEMA = pa.schema([pa.field("shard", pa.int64(), nullable=False),
                            pa.field("outcome", pa.large_binary(), nullable=False)])


def actor_resources(cfg: RunnerConfig, needs: Resources | None = None) -> dict[str, float]:
    """What one worker actor asks Ray for: the handler's needs under the runner's shares. CPUs may be
    fractional (0.5 by default) so a 2-core machine never deadlocks between the workers and Ray Data's
    own tasks; a GPU model with `gpus_per_actor: 0` gets one whole GPU per worker; a CPU-only model
    (an encoder on the CPU) gets no GPU share."""
    return (needs or Resources()).for_worker(cfg.cpus_per_actor, cfg.gpus_per_actor)


def pool_size(cfg: RunnerConfig, resources: dict[str, float], cluster: dict[str, float], num_shards: int) -> int:
    """num_actors from the config, else one actor per GPU (GPU models) or per whole CPU; never more
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


def shards_to_tables(handler: BatchModel, shards: list[list[Any]]) -> list[pa.Table]:
    """One single-row table per shard: Ray makes one block of each, so shards spread over actors."""
    return [pa.table({"shard": [i], "batch": [handler.dump_batch(shard)]}, schema=SHARD_SCHEMA)
            for i, shard in enumerate(shards)]


class ShardWorker:
    """The worker actor, for any handler: loads its model object once, then runs one shard per call."""

    def __init__(self, handler: BatchModel):
        self.handler = handler
        self.model = handler.load_model()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()  # batch_size=1: exactly one shard
        outcomes = [dump_outcome(self.handler, run_shard(self.handler, self.model, row["shard"],
                                                         self.handler.load_batch(row["batch"])))
                    for row in rows]
        return pa.table({"shard": [row["shard"] for row in rows], "outcome": outcomes}, schema=OUTCOME_SCHEMA)


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


class RayRunner(BaseRunner):
    kind = "ray"

    def __init__(
        self,
        cfg: RunnerConfig,
        engine: Engine,
        *,
        address: str | None = None,
        local_num_cpus: int = LOCAL_NUM_CPUS,
        local_num_gpus: int | None = None,
    ):
        """`address` (or RAY_ADDRESS) joins an existing cluster; otherwise a local session starts on
        first use with `local_num_cpus` (and `local_num_gpus` logical GPUs, for tests). A Ray
        session already initialised in this process is reused and left running."""
        super().__init__(engine)
        self.cfg = cfg
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.local_num_cpus = local_num_cpus
        self.local_num_gpus = local_num_gpus
        self.resources = actor_resources(cfg, engine.resources())  # the engine actors'
        self._started_ray = False

    def start(self) -> None:
        """Join or start the Ray session (done on first use; idempotent)."""
        go_offline()
        import ray

        if ray.is_initialized():
            return
        quiet = not log.isEnabledFor(logging.DEBUG)
        common = dict(
            include_dashboard=False,
            logging_level=logging.WARNING if quiet else logging.INFO,
            log_to_driver=not quiet,
            # workers inherit these: no usage reporting, no hub look-ups from engine actors
            runtime_env={"env_vars": dict(OFFLINE_ENV)},
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

    def dataset(self, handler: BatchModel, shards: list[list[Any]]):
        """The lazy Ray dataset of shard outcomes (nothing runs until it is iterated)."""
        import ray

        self._start_quietly()
        resources = actor_resources(self.cfg, handler.resources())
        size = pool_size(self.cfg, resources, ray.cluster_resources(), len(shards))
        gpus = {"num_gpus": resources["num_gpus"]} if resources["num_gpus"] > 0 else {}
        return ray.data.from_arrow(shards_to_tables(handler, shards)).map_batches(
            ShardWorker,
            fn_constructor_kwargs={"handler": handler},
            batch_size=1,  # one row = one whole shard per model call
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=resources["num_cpus"],
            **gpus,
        )

    def run(self, handler: BatchModel, shards: list[list[Any]], on_shard: OnShard, sink=None, scratch=None) -> None:
        if not shards:
            return
        tables = self.dataset(handler, shards).iter_batches(batch_size=None, batch_format="pyarrow")
        outcomes = (load_outcome(handler, data) for table in tables for data in table.column("outcome").to_pylist())
        deliver(handler, shards, outcomes, on_shard)

    def close(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

