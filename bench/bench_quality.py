"""Does LLM item knowledge from a stronger model help a CTR model? (`make quality`, docs/quality.md)

One run, end to end, on configs/ml100k-quality.yaml:

1. the long job: KAR item knowledge written by the opt-in packaged Qwen2.5-Coder-0.5B-Instruct for
   the most-interacted MovieLens-100K items (`pick: most_interacted`), encoded, gated, published;
2. DeepFM and DCN under (a) ids only, (b) + raw-text vectors of the same items (the encoder applied
   to the text the LLM was given), (c) + the LLM's knowledge vectors, over seeds 0, 1, 2 - the
   demo's `recaug report` (pipelines/experiment.py `run_report`): early stopping and model
   selection on validation, test read once per run;
3. a markdown table of test AUC and LogLoss (mean ± std over seeds), overall and on the test
   samples whose item has a knowledge vector, with the time of each step and in total.

It installs nothing: the model's packages must be there (`make quality` installs them; otherwise the
run stops and names the pip command). The table is written to WORKDIR/reports/quality-<snapshot>.md
(and .json) and to bench/results/quality.json.

    .venv/bin/python bench/bench_quality.py [--items N] [--seeds 0 1 2] [--models deepfm dcn] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, REPO, log, machine  # noqa: E402  (sets the offline environment first)

CONFIG = REPO / "configs" / "ml100k-quality.yaml"
AUGMENTER = "kar_item_knowledge"
SEGMENT = "items with LLM vector"


def _mean_std(values: list[float | None]) -> str:
    import numpy as np

    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    return f"{np.mean(vals):.4f} ± {np.std(vals):.4f}"


def quality_markdown(report: dict, info: dict) -> str:
    variants = report["variants"]
    seg_n = next((runs[0]["segments"][SEGMENT]["samples"] for per in report["results"].values() for runs in per.values()), 0)
    test_n = report["samples"].get("test", 0)
    lines = [
        f"# Item knowledge from {info['model']} on ML-100K: CTR value",
        "",
        f"{info['knowledge_items']:,} items with a knowledge vector ({info['picked']} picked, `pick: most_interacted`); "
        f"test AUC / LogLoss, mean ± std over seeds {report['seeds']}, selected on validation. "
        f"\"with knowledge\" = the {seg_n:,} of {test_n:,} test samples whose item has a knowledge vector.",
        "",
        "| backbone | variant | test AUC | test LogLoss | AUC, with knowledge | LogLoss, with knowledge |",
        "|---|---|---|---|---|---|",
    ]
    for model, per in report["results"].items():
        for v, runs in per.items():
            seg = [r["segments"][SEGMENT] for r in runs]
            lines.append(
                f"| {model} | ({v}) {variants[v]} | {_mean_std([r['test_auc'] for r in runs])} | "
                f"{_mean_std([r['test_logloss'] for r in runs])} | {_mean_std([s['auc'] for s in seg])} | "
                f"{_mean_std([s.get('logloss') for s in seg])} |"
            )
    t = info["seconds"]
    lines += [
        "",
        f"Time: generation + encoding + publish {t['long_job']:.0f} s ({info['llm_requests']:,} LLM calls, "
        f"{info['output_tokens']:,} tokens out), CTR training {t['report']:.0f} s, total {t['total']:.0f} s "
        f"({t['total'] / 60:.1f} min); load average {info['load_before']} before, {info['load_after']} after, "
        f"{info['cpus']} CPUs.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--items", type=int, default=None, help="items to write knowledge for (default: the config's max_entities)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the config's ctr.seeds")
    ap.add_argument("--models", nargs="+", default=None, help="default: the config's ctr.models")
    ap.add_argument("--workdir", type=Path, default=None, help="another workdir (a smoke run keeps apart from the real one)")
    args = ap.parse_args(argv)

    from recaug.core.config import load_config
    from recaug.core.packaged import SplitGGUF, installed_parts, packaged_model
    from recaug.pipelines.experiment import run_report
    from recaug.pipelines.jobs import run_long_job_locked

    started = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2)
    cfg = load_config(args.config)
    updates = {}
    if args.items is not None:
        updates["augmenters"] = [a.model_copy(update={"max_entities": args.items}) if a.name == AUGMENTER else a
                                 for a in cfg.augmenters]
    if args.workdir is not None:
        updates["workdir"] = str(args.workdir.resolve())
    if updates:
        cfg = cfg.model_copy(update=updates)
    picked = next(a.max_entities for a in cfg.augmenters if a.name == AUGMENTER)

    model = packaged_model(cfg.engine.model)
    if model is not None and isinstance(model.source, SplitGGUF):
        installed_parts(model)  # stops here, naming the pip command, when a part is missing (installs nothing)
    log(f"quality: {cfg.engine.model}, {picked} items, workdir {cfg.workdir_path()}")

    t0 = time.perf_counter()
    result = run_long_job_locked(cfg, log=log)
    long_s = time.perf_counter() - t0
    totals = result.augmentation.report["totals"]
    log(f"long job {long_s:.0f} s: {totals['llm_requests']:,} LLM calls, {totals['output_tokens']:,} tokens out, "
        f"parse rate {totals['parse_rate']:.1%}, {totals['dead_letter']:,} dead letters; snapshot {result.snapshot_id}")

    t0 = time.perf_counter()
    report = run_report(cfg, "latest", models=args.models, seeds=args.seeds, variants="abc", log=log)
    report_s = time.perf_counter() - t0

    info = {
        "model": packaged_model(cfg.engine.model).hub_name if model is not None else cfg.engine.model,
        "picked": picked,
        "knowledge_items": report["vectors"].get(f"item:{AUGMENTER}", 0),
        "llm_requests": totals["llm_requests"],
        "output_tokens": totals["output_tokens"],
        "seconds": {"long_job": long_s, "report": report_s, "total": time.perf_counter() - started},
        "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    md = quality_markdown(report, info)
    out_dir = cfg.workdir_path() / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"quality-{report['snapshot_id']}.md").write_text(md)
    payload = {"info": info, "report": {k: v for k, v in report.items() if k != "paths"}, "machine": machine()}
    (out_dir / f"quality-{report['snapshot_id']}.json").write_text(json.dumps(payload, indent=2))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "quality.json").write_text(json.dumps(payload, indent=2))
    print(md)
    print(f"full report (segments, coverage, plot): {report['paths']['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
