"""The long job: validate input -> augment -> (encode -> gate -> publish).

Every table of a run is written into a private run folder that is renamed into place only when the
whole stage succeeded, so no partial output is ever visible. While the job runs, the generated-text
and embedding tables it builds live in anonymous files under `<workdir>/tmp` (memory-mapped, see
core/spill.py), so its heap does not hold them (with `encoder.pca_dim`, the PCA fit and the
projected vectors are in memory).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from recaug.augmenters.base import AugmentInputs, check_contract, get_augmenter
from recaug.core.config import AugmenterConfig, PipelineConfig
from recaug.core.crashpoints import crash_point
from recaug.core.memory import release_memory
from recaug.core.progress import progress_wanted
from recaug.core.spill import spill_folder
from recaug.core.storage import remove_stale_temporaries, write_parquet_atomic
from recaug.ctr_models.splits import prompt_context
from recaug.pipelines.augment import AugmenterOutput, augmenter_options, run_augmenter
from recaug.pipelines.cache import GenerationCache
from recaug.core.errors import NothingPublished, UsageError, writing_into
from recaug.pipelines.engines.base import Engine
from recaug.pipelines.inputs import PreparedInputs
from recaug.schemas.output_gate import TextChecks


@dataclass
class AugmentationResult:
    run_id: str
    run_dir: Path
    outputs: dict[str, AugmenterOutput]
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)


class UnknownAugmenterChoice(UsageError, ValueError):
    """`--only` names an augmenter the config does not list."""


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def augment_inputs(cfg: PipelineConfig, prep: PreparedInputs, engine: Engine) -> AugmentInputs:
    return AugmentInputs(
        users=pl.from_arrow(prep.users),
        items=pl.from_arrow(prep.items),
        history=prompt_context(prep.split),
        domain=cfg.dataset.domain,
        count_tokens=engine.count_tokens,
        seed=cfg.engine.seed,
        # the scale ratings are shown on in prompts (augmenters/context.py)
        extras={"rating_scale": (cfg.input_gate.rating_min, cfg.input_gate.rating_max)},
    )


def enabled_augmenters(cfg: PipelineConfig, only: list[str] | None = None) -> list[AugmenterConfig]:
    cfg.import_augmenter_modules()
    chosen = [a for a in cfg.augmenters if a.enabled]
    if only:
        names = {a.name for a in cfg.augmenters}
        unknown = sorted(set(only) - names)
        if unknown:
            raise UnknownAugmenterChoice(f"augmenter(s) {unknown} are not in the config; configured: {sorted(names)}")
        chosen = [a for a in chosen if a.name in only]
    for a in chosen:
        get_augmenter(a.name)  # fail before any work on a misspelt name
    return chosen


class _Progress:
    """rows/s and tokens/s on long work; quiet when stderr is not a terminal unless forced."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.bar = label, enabled, None
        self.tokens, self.started = 0, time.perf_counter()

    def __call__(self, rows: int, tokens: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="row", file=sys.stderr, dynamic_ncols=True)
            self.started = time.perf_counter()
        elif rows == 0 and total:  # a retry pass starts: its rows are more work on the same bar
            self.bar.total += total
            self.bar.refresh()
        self.tokens += tokens
        self.bar.update(rows)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:.0f} tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_augmentation(
    cfg: PipelineConfig,
    prep: PreparedInputs,
    engine: Engine,
    runner,
    only: list[str] | None = None,
    progress: bool | None = None,
    log=print,
    budget=None,
    carry_over: dict[str, pa.Table] | None = None,
) -> AugmentationResult:
    workdir = cfg.workdir_path()
    with writing_into(workdir, f"the generation cache under {workdir / 'cache'}"):
        cache = GenerationCache(workdir / "cache")
    inputs = augment_inputs(cfg, prep, engine)
    run_id = new_run_id()
    started = time.perf_counter()
    show = progress_wanted(progress)
    outputs: dict[str, AugmenterOutput] = {}
    chosen = [(aug_cfg, get_augmenter(aug_cfg.name)) for aug_cfg in enabled_augmenters(cfg, only)]
    for aug_cfg, aug in chosen:  # every template against its context before any entity runs
        check_contract(aug, inputs, augmenter_options(aug, aug_cfg))
    for aug_cfg, aug in chosen:
        bar = _Progress(aug.name, show)
        try:
            with writing_into(workdir, f"{aug.name}: the generation cache under {cache.dir} or the temporary tables "
                                       f"under {spill_folder(workdir)}"):
                out = run_augmenter(
                    aug, aug_cfg, inputs, engine, cfg.engine, cache, runner.execute, cfg.runner.shard_size, bar,
                    budget=budget, carry_over=(carry_over or {}).get(aug.name), chunk_size=cfg.runner.chunk_entities,
                    spill_dir=spill_folder(workdir), text_checks=TextChecks.from_config(cfg.output_gate),
                    reuse_runs=workdir / "runs",
                    text_bounds=(cfg.output_gate.min_text_chars, cfg.output_gate.max_text_chars),
                )
        finally:
            bar.close()
        outputs[aug.name] = out
        s = out.stats
        log(s.summary_line())
    with writing_into(workdir, f"the generation cache under {cache.dir} (compaction)"):
        cache.compact()
    release_memory()
    result = AugmentationResult(run_id, workdir / "runs" / run_id, outputs, time.perf_counter() - started)
    result.report = augmentation_report(cfg, engine, result, getattr(runner, "engine_load_seconds", None))
    with writing_into(workdir, f"the run folder {result.run_dir}"):
        write_run(result)
    crash_point("generate.run_written")
    return result


def augmentation_report(
    cfg: PipelineConfig, engine: Engine, result: AugmentationResult, engine_load_seconds: float | None = None
) -> dict[str, Any]:
    per = {name: out.stats.as_dict() for name, out in result.outputs.items()}
    tot = {k: sum(p[k] for p in per.values()) for k in (
        "entities", "no_history", "requests", "distinct_prompts", "cache_hits", "llm_requests", "engine_errors",
        "input_tokens", "prompt_tokens_computed", "output_tokens", "parsed", "dead_letter", "truncated", "retries",
        "generate_seconds",
    )}
    tot["cache_hit_rate"] = tot["cache_hits"] / tot["distinct_prompts"] if tot["distinct_prompts"] else 1.0
    answered = tot["parsed"] + tot["dead_letter"]
    tot["truncated_share"] = tot["truncated"] / answered if answered else 0.0
    tot["parse_rate"] = tot["parsed"] / answered if answered else 1.0
    tot["tokens_per_s"] = tot["output_tokens"] / tot["generate_seconds"] if tot["generate_seconds"] else 0.0
    return {
        "run_id": result.run_id,
        "pipeline": cfg.name,
        "model": engine.model_id,
        "engine": engine.kind,
        "sampling": engine.sampling_key(),
        "runner": cfg.runner.kind,
        "wall_seconds": result.seconds,
        # starting the engine's model in this process (vLLM: minutes on a CPU), part of the first LLM
        # calls' time; None where workers load it (Ray, Beam) or no call needed it
        "engine_load_seconds": engine_load_seconds,
        "augmenters": per,
        "templates": {name: out.augmenter.prompt.content_hash for name, out in result.outputs.items()},
        "totals": tot,
    }


def write_run(result: AugmentationResult) -> None:
    """Write every table into a hidden folder, then rename it into place (all or nothing)."""
    final = result.run_dir
    tmp = final.parent / f".{final.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    remove_stale_temporaries(final.parent)  # the hidden folders of runs killed while writing
    try:
        synth_items, synth_inter = [], []
        for name, out in result.outputs.items():
            write_parquet_atomic(out.generated, tmp / "generated" / f"{name}.parquet")
            write_parquet_atomic(out.dead_letter, tmp / "dead_letter" / f"{name}.parquet")
            synth_items.append(out.synthetic_items)
            synth_inter.append(out.synthetic_interactions)
            exp = pa.table({"entity_id": pa.array(out.expected_entities, pa.string())})
            write_parquet_atomic(exp, tmp / "expected" / f"{name}.parquet")
        if result.outputs:
            write_parquet_atomic(pa.concat_tables(synth_items), tmp / "synthetic_items.parquet")
            write_parquet_atomic(pa.concat_tables(synth_inter), tmp / "synthetic_interactions.parquet")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "report.json").write_text(json.dumps(result.report, indent=2, default=str))
        (tmp / "report.md").write_text(report_markdown(result.report))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (full disk) leaves no half run folder
        raise


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Augmentation run {report['run_id']}",
        "",
        f"pipeline `{report['pipeline']}` · model `{report['model']}` ({report['engine']}) · runner {report['runner']}"
        f" · {report['wall_seconds']:.1f} s"
        + (f" (engine load {report['engine_load_seconds']:.1f} s)" if report.get("engine_load_seconds") else ""),
        "",
        "| augmenter | entities | without history | distinct prompts | cached | LLM calls | in tok | in tok computed "
        "| out tok | tok/s | parse rate | dead-letter | truncated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(report["augmenters"].items()) + [("**total**", report["totals"])]
    for name, s in rows:
        lines.append(
            f"| {name} | {s['entities']:,} | {s.get('no_history', 0):,} | {s.get('distinct_prompts', 0):,} | "
            f"{s['cache_hits']:,} | {s['llm_requests']:,} | {s['input_tokens']:,} | "
            f"{s.get('prompt_tokens_computed', s['input_tokens']):,} | {s['output_tokens']:,} | "
            f"{s['tokens_per_s']:.1f} | {s['parse_rate']:.1%} | {s['dead_letter']:,} | "
            f"{s['truncated']:,} ({s.get('truncated_share', 0.0):.0%}) |"
        )
    return "\n".join(lines) + "\n"


# --- the whole long job ---------------------------------------------------------------------------


class OutputGateBlocked(NothingPublished, RuntimeError):
    """The output gate failed: nothing was published. The message is the gate's summary."""

    def __init__(self, summary: str, run_dir: Path):
        super().__init__(summary)
        self.run_dir = run_dir


@dataclass
class LongJobResult:
    augmentation: AugmentationResult
    snapshot_id: str
    snapshot_path: Path
    encoding: dict[str, Any]
    gate_summary: str
    removed_by_retention: tuple[str, ...] = ()


def code_version() -> str:
    """The package version plus the git commit when running from a checkout (lineage)."""
    import subprocess

    from recaug import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def previous_generated(cfg: PipelineConfig) -> dict[str, pa.Table]:
    """The generated-text tables of the latest snapshot: what a budgeted run carries over."""
    from recaug.pipelines.snapshots import SnapshotNotFound, read_table, resolve_snapshot, snapshot_root

    try:
        info = resolve_snapshot(snapshot_root(cfg), "latest")
    except SnapshotNotFound:
        return {}
    out = {}
    for name in info.manifest.get("tables", {}):
        if name.startswith("generated/"):
            out[name.split("/", 1)[1]] = read_table(snapshot_root(cfg), info.snapshot_id, name)
    return out


def run_long_job(
    cfg: PipelineConfig,
    prep: PreparedInputs,
    engine: Engine,
    runner,
    only: list[str] | None = None,
    progress: bool | None = None,
    budget=None,
    log=print,
) -> LongJobResult:
    """augment -> encode -> output gate -> publish. Raises OutputGateBlocked (nothing published)."""
    from recaug.encoders import encode_outputs
    from recaug.encoders.text_encoder import TextEncoder
    from recaug.pipelines.snapshots import publish_snapshot, snapshot_root
    from recaug.schemas.output_gate import GateInput, run_output_gate

    carry = previous_generated(cfg) if budget is not None else {}
    aug = run_augmentation(cfg, prep, engine, runner, only=only, progress=progress, log=log, budget=budget, carry_over=carry)
    del carry  # the previous snapshot's generated tables, read whole for the deferred entities' rows
    encoded = {name: out.generated for name, out in aug.outputs.items() if out.augmenter.encodes}
    encoder = TextEncoder(cfg.encoder, progress=progress)
    log(f"encode: {encoder.model_id} ({cfg.encoder.pooling} pooling, {'L2-normalised' if cfg.encoder.normalize else 'raw'}) "
        f"over {sum(t.num_rows for t in encoded.values()):,} texts")
    workdir = cfg.workdir_path()
    enc_dir = workdir / "cache" / "encodings"
    # the runner encodes the cache misses (local: in this process; Ray / Beam: on their workers)
    encode = getattr(runner, "encode", None)
    with writing_into(workdir, f"the encoding cache under {enc_dir} or the temporary tables under {spill_folder(workdir)}"):
        enc = encode_outputs(encoded, encoder, enc_dir,
                             encode=None if encode is None else (lambda texts: encode(texts, encoder, str(enc_dir))),
                             spill_dir=spill_folder(workdir))
    log(f"  {enc.cache_misses:,} encoded, {enc.cache_hits:,} from the encoding cache, {enc.seconds:.1f} s")

    gate_inputs = [
        GateInput(
            augmenter=name,
            embeddings=enc.embeddings[name],
            generated=aug.outputs[name].generated,
            dead_letter=aug.outputs[name].dead_letter,
            expected_entities=aug.outputs[name].expected_entities,
            expected_dim=cfg.encoder.pca_dim or encoder.dim,
        )
        for name in encoded
    ]
    gate = run_output_gate(gate_inputs, cfg.output_gate)
    reports = {"output_gate.txt": gate.summary() + "\n", "output_gate.json": json.dumps(gate.as_dict(), indent=2, default=str)}
    with writing_into(workdir, f"the output gate report in {aug.run_dir}"):
        try:
            for name, text in reports.items():
                (aug.run_dir / name).write_text(text)
        except BaseException:
            for name in reports:  # no half-written report
                (aug.run_dir / name).unlink(missing_ok=True)
            raise
    if not gate.success:
        raise OutputGateBlocked(gate.summary(), aug.run_dir)
    log(gate.summary().splitlines()[0])
    crash_point("gate.passed")

    tables: dict[str, pa.Table] = dict(enc.snapshot_tables())
    for name, out in aug.outputs.items():
        tables[f"generated/{name}"] = out.generated
        tables[f"dead_letter/{name}"] = out.dead_letter
    tables["synthetic/items"] = pa.concat_tables([o.synthetic_items for o in aug.outputs.values()])
    tables["synthetic/interactions"] = pa.concat_tables([o.synthetic_interactions for o in aug.outputs.values()])
    gate_counts = prep.gate.counts
    manifest = {
        "pipeline": cfg.name,
        "data_cutoff": prep.data_cutoff,
        "run_id": aug.run_id,
        "code_version": code_version(),
        "config": cfg.hash_view(),
        "model": {"engine": engine.kind, "id": engine.model_id, "sampling": engine.sampling_key()},
        "encoder": {"id": encoder.encoder_id, "dim": cfg.encoder.pca_dim or encoder.dim},
        "templates": aug.report["templates"],
        "parsers": {name: out.augmenter.parser_id for name, out in aug.outputs.items()},
        "runner": runner.kind,
        "input": {
            "counts": gate_counts,
            "quarantined": prep.gate.quarantine.num_rows,
            "not_yet_visible": prep.not_yet_visible,
            "splits": prep.sizes(),
            "sources": prep.sources,
        },
        "augmentation": aug.report["augmenters"],
        "tokens": {k: aug.report["totals"][k] for k in (
            "input_tokens", "prompt_tokens_computed", "output_tokens", "llm_requests", "cache_hits")},
        "encoding": enc.stats(),
    }
    root = snapshot_root(cfg)
    with writing_into(workdir, f"the new snapshot under {root}"):
        info = publish_snapshot(root, tables, manifest, keep=cfg.publish.keep_snapshots, gate=gate)
    return LongJobResult(aug, info.snapshot_id, info.path, enc.stats(), gate.summary(), tuple(info.removed_by_retention))
