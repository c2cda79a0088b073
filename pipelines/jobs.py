"""What the CLI verbs do, as functions: a manual long job (lock, inputs, run, close, record) and a
preview of one augmenter on a few entities. The CLI only parses arguments and prints; cron, Airflow
or a notebook can call these directly with the same behaviour."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from recaug.augmenters.base import Augmenter, ParseError, Parsed, check_contract, get_augmenter
from recaug.core.config import AugmenterConfig, PipelineConfig
from recaug.core.errors import ensure_writable
from recaug.core.locking import RunLock
from recaug.core.timeparse import format_utc
from recaug.pipelines.augment import Budget, Pending, augmenter_options, build_pending, sentence_limit
from recaug.pipelines.engines import make_engine
from recaug.pipelines.engines.base import GenerationRequest, GenerationResult, error_results
from recaug.pipelines.inputs import prepare_inputs
from recaug.pipelines.long_job import LongJobResult, augment_inputs, run_long_job
from recaug.pipelines.runners import make_runner
from recaug.pipelines.scheduler import LONG, SHORT, record_manual


def _warn(message: str) -> None:
    print(f"recaug: warning: {message}", file=sys.stderr)


def run_long_job_locked(
    cfg: PipelineConfig,
    runner_kind: str | None = None,
    as_of: int | None = None,
    wait: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
    only: list[str] | None = None,
    progress: bool | None = None,
    budget: Budget | None = None,
    manual: bool = True,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = _warn,
) -> LongJobResult:
    """`recaug run` and the schedule's long job: the engine config is checked before anything is
    written, then under the workdir's run lock the input gate and the long job (augment, encode, gate,
    publish). A `manual` run of every augmenter is recorded as the schedule's last long job."""
    if runner_kind:
        cfg = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"kind": runner_kind})})
    engine = make_engine(cfg.engine)  # a bad engine config is refused before the workdir exists
    runner = make_runner(cfg.runner, engine)
    try:
        workdir = ensure_writable(cfg.workdir_path())
        with RunLock(workdir / "run.lock", wait=wait, on_wait=on_wait):
            log(f"recaug run {cfg.name}: workdir {workdir}")
            prep = prepare_inputs(cfg, as_of=as_of, quarantine_path=workdir / "quarantine" / "latest.parquet")
            c = prep.gate.counts
            log(
                f"input: {c['users']['rows_ok']:,} users, {c['items']['rows_ok']:,} items, "
                f"{c['interactions']['rows_ok']:,} interactions ({prep.gate.quarantine.num_rows:,} quarantined); "
                f"data cutoff {prep.describe_time(prep.data_cutoff, format_utc)}"
            )
            for warning in prep.warnings:
                warn(warning)
            log(f"augment: engine {engine.kind} ({engine.model_id}), runner {runner.kind}")
            result = run_long_job(cfg, prep, engine, runner, only=only, progress=progress, budget=budget)
            if manual and not only:  # a whole run is what the schedule's long job does: the next tick counts it
                record_manual(cfg, LONG, snapshot=result.snapshot_id)
            return result
    finally:
        runner.close()


@dataclass
class PreviewRow:
    """One entity of a preview: the request as rendered, the engine's answer, and the parse."""

    pending: Pending
    result: GenerationResult
    parsed: Parsed | None
    parse_error: str | None


@dataclass
class Preview:
    augmenter: Augmenter
    rows: list[PreviewRow]
    render_failures: list[dict[str, Any]]


def preview_augmenter(cfg: PipelineConfig, name: str, n: int, as_of: int | None = None) -> Preview:
    """`recaug preview`: the augmenter's first `n` entities rendered, answered by the configured
    engine in this process and parsed, without caching or publishing anything. An engine that raises
    gives error results, as a run would dead-letter them."""
    engine = make_engine(cfg.engine)
    cfg.import_augmenter_modules()
    aug = get_augmenter(name)
    aug_cfg = next((a for a in cfg.augmenters if a.name == name), AugmenterConfig(name=name))
    aug_cfg = aug_cfg.model_copy(update={"max_entities": n})
    prep = prepare_inputs(cfg, as_of=as_of)
    inputs = augment_inputs(cfg, prep, engine)
    check_contract(aug, inputs, augmenter_options(aug, aug_cfg))  # a template typo: one clear error, exit 2
    pending, failed, _ = build_pending(aug, aug_cfg, inputs, engine, cfg.engine)
    if not pending:
        return Preview(aug, [], failed)
    schema = aug.decoding_schema(cfg.dataset.domain)
    max_sentences = sentence_limit(aug, aug_cfg)
    requests = [GenerationRequest(p.key, p.messages, p.max_new_tokens, schema, max_sentences) for p in pending]
    model = engine.load_model()
    try:
        results = engine.run_batch(model, requests)
    except Exception as exc:  # show the prompts and the failure
        results = error_results(requests, f"the engine raised: {type(exc).__name__}: {exc}")
    finally:
        engine.close_model(model)
    rows = []
    for p, r in zip(pending, results):
        try:
            rows.append(PreviewRow(p, r, aug.parse(r.text, p.context), None))
        except ParseError as exc:
            rows.append(PreviewRow(p, r, None, str(exc)))
    return Preview(aug, rows, failed)


def train_manual(cfg: PipelineConfig, snapshot: str, model: str, seed: int, adaptor: str | None = None,
                 warm_start: str | None = None):
    """`recaug train`: one CTR model on a snapshot, recorded as the schedule's last short job."""
    from recaug.pipelines.experiment import train_model

    ensure_writable(cfg.workdir_path())
    _, result = train_model(cfg, snapshot, model, seed, adaptor=adaptor, warm_start=warm_start)
    record_manual(cfg, SHORT, checkpoint=str(result.checkpoint_path) if result.checkpoint_path else None)
    return result
