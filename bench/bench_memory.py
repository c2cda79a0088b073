"""Peak memory of the whole long job at two catalogue sizes: does it stream?

Each size runs in a fresh interpreter (its peak RSS, VmHWM, is that run's alone): a synthetic catalogue
(items as in bench_cache) goes through `run_long_job` - input gate, augmentation with the fake
engine on the local runner (empty cache, so every entity is generated and committed), encoding,
the output gate and publishing the snapshot. The sentence encoder is replaced by a tiny
deterministic hash encoder (32-d, no model), so the figures are the pipeline's own memory, not a
model's. A sampler thread records the RSS peak inside each phase.

"Streams" would mean: the peak grows with the entities only by what the job keeps as output (the
generated-text and embedding tables it publishes). The marginal cost of one more entity (peak
difference between the two sizes / entity difference) is compared with the output bytes per entity.

    .venv/bin/python bench/bench_memory.py [--sizes 100000 1000000] [--quick]
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    HashEncoder,
    Timer,
    current_rss_mib,
    fake_pipeline_config,
    log,
    peak_rss_mib,
    result,
    run_child,
    standalone,
    synthetic_world,
    table,
    write_world,
)

NAME = "memory"
PHASES = ("input gate", "augment", "encode", "output gate", "publish")


class PhaseSampler:
    """Samples this process's RSS every `every` seconds and keeps the peak per named phase."""

    def __init__(self, every: float = 0.05):
        self.every, self.phase, self.peaks, self.seconds = every, "setup", {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._since = time.perf_counter()

    def _loop(self):
        while not self._stop.is_set():
            rss = current_rss_mib()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            self._stop.wait(self.every)

    def enter(self, phase: str):
        now = time.perf_counter()
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self._since
        rss = current_rss_mib()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
        self.phase, self._since = phase, now
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.enter("done")
        self._stop.set()
        self._thread.join()


def _wrap(module, attr: str, sampler: PhaseSampler, phase: str, after: str | None = None):
    original = getattr(module, attr)

    def wrapped(*args, **kwargs):
        sampler.enter(phase)
        try:
            return original(*args, **kwargs)
        finally:
            if after:
                sampler.enter(after)

    setattr(module, attr, wrapped)


def child(items: int, world_dir: Path) -> dict:
    """One long job over the `items` synthetic items written in `world_dir`, measured from inside
    this process (which has read no data before its baseline is taken)."""
    import recaug.encoders as encoders_pkg
    import recaug.encoders.text_encoder as text_encoder_mod
    import recaug.pipelines.long_job as long_job
    import recaug.pipelines.snapshots as snapshots
    import recaug.schemas.output_gate as output_gate
    from recaug.pipelines.config import parse_config
    from recaug.pipelines.engines.fake import FakeEngine
    from recaug.pipelines.inputs import prepare_inputs
    from recaug.pipelines.runners import make_runner

    tmp = Path(tempfile.mkdtemp(prefix="recaug-bench-memory-"))
    try:
        paths = {t: str(world_dir / f"{t}.parquet") for t in ("users", "items", "interactions")}
        cfg = parse_config(fake_pipeline_config("bench-memory", tmp / "work", paths))
        text_encoder_mod.TextEncoder = HashEncoder  # run_long_job looks it up here when it runs
        import gc

        gc.collect()
        baseline = current_rss_mib()  # interpreter + every library the job imports, before any data
        with PhaseSampler() as sampler:
            _wrap(long_job, "run_augmentation", sampler, "augment", after="encode")
            _wrap(encoders_pkg, "encode_outputs", sampler, "encode")
            _wrap(output_gate, "run_output_gate", sampler, "output gate", after="publish")
            _wrap(snapshots, "publish_snapshot", sampler, "publish")
            sampler.enter("input gate")
            with Timer() as t:
                prep = prepare_inputs(cfg)
                # the input tables the job keeps for its whole run (Arrow; the split and samples are
                # derived tables of their own)
                held_input = sum(t.nbytes for t in (prep.users, prep.items, prep.interactions, prep.split, prep.samples))
                engine = FakeEngine(cfg.engine)
                runner = make_runner(cfg.runner, engine, cfg.engine)
                res = long_job.run_long_job(cfg, prep, engine, runner, progress=False, log=lambda *_: None)
                job_peak = peak_rss_mib()  # before the checks below read a published table back
                sampler.enter("checks")
            out = res.augmentation.outputs["kar_item_knowledge"]
            kept = {"generated": out.generated.nbytes}
            emb = snapshots.read_table(snapshots.snapshot_root(cfg), res.snapshot_id, "embeddings/kar_item_knowledge")
            kept["embeddings"] = emb.nbytes
            assert out.stats.parsed == items and engine.requests_seen == items, (out.stats.parsed, engine.requests_seen)
        return {
            "items": items,
            "baseline_mib": baseline,
            "peak_mib": job_peak,
            "phase_peak_mib": {p: sampler.peaks.get(p, 0.0) for p in PHASES},
            "phase_seconds": {p: sampler.seconds.get(p, 0.0) for p in PHASES},
            "wall_s": t.wall,
            "cpu_s": t.cpu,
            "kept_output_bytes": kept,
            "held_input_bytes": held_input,
            "snapshot": res.snapshot_id,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(quick: bool = False, sizes: list[int] | None = None) -> dict:
    sizes = sizes or ([5_000, 50_000] if quick else [100_000, 1_000_000])
    runs = []
    for n in sizes:
        log(f"long job over {n:,} synthetic items in a child process (fake engine, hash encoder) ...")
        with tempfile.TemporaryDirectory(prefix="recaug-bench-world-") as world:
            write_world(Path(world), *synthetic_world(n))  # written here: the child only reads it
            r = run_child(Path(__file__), ["--child", str(n), world])
        r["growth_mib"] = r["peak_mib"] - r["baseline_mib"]
        r["kept_mib"] = sum(r["kept_output_bytes"].values()) / 2**20
        r["input_mib"] = r["held_input_bytes"] / 2**20
        runs.append(r)
        log(f"  {n:,} items: peak RSS {r['peak_mib']:,.0f} MiB (baseline {r['baseline_mib']:,.0f}), "
            f"{r['wall_s']:.1f} s; output tables {r['kept_mib']:,.0f} MiB")

    rows = []
    for r in runs:
        rows.append([r["items"], r["baseline_mib"], r["peak_mib"], r["growth_mib"], r["kept_mib"], r["input_mib"],
                     r["growth_mib"] * 2**20 / r["items"], r["kept_mib"] * 2**20 / r["items"],
                     r["input_mib"] * 2**20 / r["items"], r["wall_s"]])
    t1 = table(
        "Peak RSS of the long job (fake engine, 32-d hash encoder, child process per size)",
        ["items", "baseline MiB", "peak MiB", "peak - baseline MiB", "output tables MiB", "input tables MiB",
         "bytes/entity (peak)", "bytes/entity (output)", "bytes/entity (input)", "wall s"],
        rows,
        notes=["baseline = the child's RSS after imports, before reading any data. output tables = Arrow bytes of the "
               "generated-text and embedding tables the job publishes (what it must hold). input tables = Arrow bytes "
               "of the validated users, items, interactions, split and CTR-sample tables it reads once and keeps."],
    )
    t2 = table(
        "Peak RSS inside each phase, MiB",
        ["items", *PHASES],
        [[r["items"], *[r["phase_peak_mib"][p] for p in PHASES]] for r in runs],
        notes=["seconds per phase: " + "; ".join(
            f"{r['items']:,}: " + ", ".join(f"{p} {r['phase_seconds'][p]:.0f}" for p in PHASES) for r in runs)],
    )
    small, big = runs[0], runs[-1]
    scale = big["items"] / small["items"]
    growth_ratio = big["growth_mib"] / small["growth_mib"]
    # one more entity costs this much peak memory, and this much of it is output the job must keep
    marginal = (big["peak_mib"] - small["peak_mib"]) * 2**20 / (big["items"] - small["items"])
    kept_marginal = (big["kept_mib"] - small["kept_mib"]) * 2**20 / (big["items"] - small["items"])
    input_marginal = (big["input_mib"] - small["input_mib"]) * 2**20 / (big["items"] - small["items"])
    streams = marginal <= 1.5 * (kept_marginal + input_marginal)
    rest = marginal - kept_marginal - input_marginal
    peak_phase = max(PHASES, key=lambda p: big["phase_peak_mib"][p])
    summary = [
        f"{scale:.0f}x the entities -> {growth_ratio:.1f}x the memory above baseline; each extra entity costs "
        f"{marginal:,.0f} bytes of peak RSS: {kept_marginal:,.0f} are the output tables the job publishes, "
        f"{input_marginal:,.0f} the input tables it keeps, {rest:,.0f} everything else (peak in the {peak_phase} phase)",
        (f"the work streams: beyond the tables it keeps, an entity costs {rest:,.0f} bytes of peak memory "
         f"({rest / marginal:.0%} of its total); the kept tables themselves are held in memory (columnar) from the "
         "input gate to publish" if streams else
         f"it does not stream: peak memory grows at {marginal / (kept_marginal + input_marginal):.1f}x what the "
         "input and output tables need"),
    ]
    data = {"runs": runs, "streams": streams, "growth_ratio": growth_ratio, "size_ratio": scale,
            "marginal_bytes_per_entity": marginal, "output_bytes_per_entity": kept_marginal,
            "input_bytes_per_entity": input_marginal}
    return result(NAME, "Memory: peak RSS of the long job", [t1, t2], summary, data)


def _args(ap):
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="catalogue sizes (default 100000 1000000)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(int(argv[1]), Path(argv[2]))), flush=True)
        return 0
    return standalone(run, argv, _args, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
