"""The batch-model seam: one contract for everything a runner runs on its workers (LLM engines and
text encoders alike), in the style of Beam's ModelHandler.

A *handler* is a small picklable object (a config, an identity) that a runner ships to its workers.
It declares what one worker needs (`resources()`), builds the heavy *model object* once per worker
(`load_model()`, which returns it and leaves the handler as it was), and runs one batch at a time
(`run_batch(model, batch)`). How a batch and its results cross a process boundary is the handler's
business too (`dump_batch` / `load_batch`, `dump_results` / `load_results`): a runner moves bytes and
text, never a class it knows.

What a runner does with a batch that fails is written here, once, for every runner:

- `run_shard` (worker side): the handler's exception of "nothing can work" (`ModelCannotWork`, e.g. an
  engine's EngineError) makes the outcome *fatal*; any other exception makes the shard *failed*: its
  results are the handler's per-item error results carrying the reason (a handler without such
  results, like an encoder, makes it fatal instead). A result list that breaks the contract (one
  result per item, in order) counts as a raise.
- `deliver` (driver side): hands each shard's results to `on_shard` exactly once, raises the fatal
  one (the run stops with the model's message), and refuses a run that lost a shard.

Runners never ask which model they run: local, Ray and Beam differ only in where `run_shard` is
called and how outcomes travel back (docs/engines.md, "Seams").

This module imports nothing from recaug, so any layer may use it.
"""

from __future__ import annotations

import abc
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Results = TypeVar("Results")


class ModelCannotWork(RuntimeError):
    """Nothing can work (model missing, server unreachable): the run stops instead of failing shard
    after shard. An engine's EngineError is one."""


class RunnerError(RuntimeError):
    """A runner that cannot deliver every shard exactly once (the message says what to check)."""


@dataclass(frozen=True)
class Resources:
    """What one worker of a handler needs.

    `gpus`: GPUs (or a share of one) per worker when the runner does not set its own share
    (`runner.gpus_per_actor`); `cpu_only`: the model never uses a GPU, so it gets no GPU share even
    when the runner sets one; `cpus`: CPUs per worker, None = the runner's share (`runner.cpus_per_actor`).
    """

    gpus: float = 0.0
    cpu_only: bool = False
    cpus: float | None = None

    def for_worker(self, cpus_per_worker: float, gpus_per_worker: float) -> dict[str, float]:
        """Ray-style `num_cpus` / `num_gpus` of one worker, given the runner's configured shares."""
        gpus = 0.0 if self.cpu_only else (gpus_per_worker or self.gpus)
        return {"num_cpus": float(self.cpus if self.cpus is not None else cpus_per_worker), "num_gpus": float(gpus)}


class BatchModel(abc.ABC, Generic[Item, Results]):
    """The seam. Subclasses implement `load_model` and `run_batch`, and the wire format."""

    # what the model is called in messages ("shard failed in the engine: ...")
    noun: str = "model"

    def resources(self) -> Resources:
        return Resources()

    @abc.abstractmethod
    def load_model(self) -> Any:
        """Build the model object (weights, connections) and return it; called once per worker.
        The handler itself is not changed, so it stays cheap to pickle."""

    @abc.abstractmethod
    def run_batch(self, model: Any, batch: list[Item]) -> Results:
        """The results of one batch (one result per item, in order)."""

    def close_model(self, model: Any) -> None:
        """Free what load_model built (the runner calls it when the worker is done)."""

    def check(self, index: int, batch: list[Item], results: Results) -> None:
        """Refuse results that break the contract (one per item, in order); raise RunnerError."""
        if len(results) != len(batch):
            raise RunnerError(f"shard {index}: the {self.noun} returned {len(results)} result(s) for {len(batch)} item(s)")

    def failed_results(self, batch: list[Item], reason: str) -> Results | None:
        """Per-item error results for a batch whose run raised; None = this model has no error
        results, so a failed batch stops the run."""
        return None

    def fatal_error(self, reason: str) -> BaseException:
        """The exception the driver raises for a worker's fatal outcome."""
        return ModelCannotWork(reason)

    # --- wire format (the one place batches and results are serialised) ---------------------------

    @abc.abstractmethod
    def dump_batch(self, batch: list[Item]) -> str:
        """One batch as one line of text (no newline)."""

    @abc.abstractmethod
    def load_batch(self, text: str) -> list[Item]: ...

    @abc.abstractmethod
    def dump_results(self, results: Results) -> bytes: ...

    @abc.abstractmethod
    def load_results(self, data: bytes) -> Results: ...


@dataclass
class ShardOutcome:
    """What running one shard came to: results, or (fatal) the reason the run must stop.
    `failed` is the reason when `results` are error results of a shard that raised; `committed` says
    a worker already wrote the results to the cache (Beam)."""

    index: int
    results: Any = None
    failed: str | None = None
    fatal: str | None = None
    committed: bool = False
    exception: BaseException | None = field(default=None, repr=False, compare=False)  # in-process only


def run_shard(handler: BatchModel, model: Any, index: int, batch: list) -> ShardOutcome:
    """Run one shard under the shared failure policy (see the module docstring). Never raises."""
    try:
        results = handler.run_batch(model, batch)
        handler.check(index, batch, results)
        return ShardOutcome(index, results)
    except ModelCannotWork as exc:
        return ShardOutcome(index, fatal=str(exc), exception=exc)
    except Exception as exc:
        reason = f"shard failed in the {handler.noun}: {type(exc).__name__}: {exc}"
        errors = handler.failed_results(batch, reason)
        if errors is None:
            return ShardOutcome(index, fatal=reason, exception=exc)
        log.warning("shard %s failed in the %s: %r", index, handler.noun, exc)
        return ShardOutcome(index, errors, failed=reason)


def dump_outcome(handler: BatchModel, outcome: ShardOutcome) -> bytes:
    """One outcome as bytes: a JSON header line, then the handler's results."""
    head = {"index": outcome.index, "failed": outcome.failed, "fatal": outcome.fatal, "committed": outcome.committed}
    body = handler.dump_results(outcome.results) if outcome.fatal is None else b""
    return json.dumps(head).encode("utf-8") + b"\n" + body


def load_outcome(handler: BatchModel, data: bytes) -> ShardOutcome:
    head, _, body = data.partition(b"\n")
    h = json.loads(head)
    results = handler.load_results(body) if h["fatal"] is None else None
    return ShardOutcome(int(h["index"]), results, failed=h["failed"], fatal=h["fatal"], committed=bool(h["committed"]))


OnShard = Callable[[int, Any, bool], None]  # (shard index, its results, committed by a worker)


def deliver(handler: BatchModel, shards: list[list], outcomes: Iterable[ShardOutcome], on_shard: OnShard) -> None:
    """Driver side: every shard's results to `on_shard` exactly once (a retried shard's second copy
    is dropped), the run stopped at a fatal outcome, and no shard missing."""
    delivered: set[int] = set()
    for outcome in outcomes:
        if outcome.index in delivered:  # a retried task after a worker restart: the first copy counts
            log.warning("shard %d came back twice; the duplicate is ignored", outcome.index)
            continue
        if outcome.fatal is not None:
            raise outcome.exception if outcome.exception is not None else handler.fatal_error(outcome.fatal)
        handler.check(outcome.index, shards[outcome.index], outcome.results)
        delivered.add(outcome.index)
        on_shard(outcome.index, outcome.results, outcome.committed)
    missing = sorted(set(range(len(shards))) - delivered)
    if missing:
        raise RunnerError(f"the runner returned no result for shard(s) {missing[:10]} of {len(shards)}")
