"""Run every benchmark, print one markdown table set per benchmark plus a summary, save JSON + markdown.

    .venv/bin/python bench/run_all.py            # everything, full sizes (`make bench`)
    .venv/bin/python bench/run_all.py --quick    # small sizes: a smoke test of every benchmark
    .venv/bin/python bench/run_all.py --only cache --only ray

Results go to bench/results/<timestamp>.json and .md (not tracked by git). Each benchmark runs in a
fresh process, one after the other. Every figure is measured side by side in this one run, so ratios
hold on a busy machine even when absolute times do not; the load average before and after each
benchmark is recorded with it. A benchmark that fails is reported as failed and the others still
run (exit code 1 at the end).
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, log, machine, markdown  # noqa: E402

# name -> module; the order the issue lists them in
BENCHMARKS = {
    "generation": "bench_generation",  # 1. our pipeline vs naive loop vs bare batched generate; peers; FLOP bound
    "cache": "bench_cache",  # 2. unchanged re-run and 1% incremental over a large catalogue
    "encoding": "bench_encoding",  # 3. ours vs SentenceTransformer.encode
    "ctr": "bench_ctr",  # 4a. feature join + DeepFM with and without the adaptor
    "memory": "bench_memory",  # 4b. peak RSS of the long job at two catalogue sizes
    "ray": "bench_ray",  # 5. Ray runner overhead vs local
}


def _run_isolated(name: str, quick: bool) -> tuple[dict | None, str | None]:
    """(result, None) or (None, traceback), from a fresh interpreter: what one benchmark leaves behind
    (vLLM's and torch's thread pools, loaded models, a grown heap) must not weigh on the next, and a
    benchmark's figures must not depend on which ran before it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        return importlib.import_module(BENCHMARKS[name]).run(quick=quick), None
    except Exception:  # one broken benchmark must not hide the others' figures
        return None, traceback.format_exc()


def summary_markdown(results: list[dict], failures: dict[str, str], seconds: dict[str, float], quick: bool) -> str:
    lines = ["## Summary", "", "| benchmark | minutes | finding |", "|---|---:|---|"]
    for res in results:
        first, *rest = res["summary"] or ["(no summary)"]
        lines.append(f"| {res['name']} | {seconds[res['name']] / 60:.1f} | {first} |")
        for line in rest:
            lines.append(f"|  |  | {line} |")
    for name, err in failures.items():
        lines.append(f"| {name} | {seconds.get(name, 0) / 60:.1f} | FAILED: {err.strip().splitlines()[-1]} |")
    m = machine()
    lines += ["", f"{'quick sizes (smoke test)' if quick else 'full sizes'}; {m['cpus']} CPUs, {m['memory_gib']} GiB, "
              f"Python {m['python']}, {m['platform']}; total {sum(seconds.values()) / 60:.1f} min"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of every benchmark")
    ap.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                    help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for <timestamp>.json and .md")
    args = ap.parse_args(argv)

    chosen = [n for n in BENCHMARKS if not args.only or n in args.only]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    results, failures, seconds, loads = [], {}, {}, {}
    started = time.perf_counter()
    print(f"# recaug benchmarks {stamp}{' (quick)' if args.quick else ''}: {', '.join(chosen)}\n", flush=True)
    for i, name in enumerate(chosen, 1):
        log(f"({i}/{len(chosen)}) {name} ...")
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        try:  # a worker that dies (out of memory, a crash in native code) raises here instead of hanging
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                res, error = pool.submit(_run_isolated, name, args.quick).result()
        except Exception:
            res, error = None, traceback.format_exc()
        if error is not None:
            failures[name] = error
            seconds[name] = time.perf_counter() - t0
            log(f"({i}/{len(chosen)}) {name} FAILED after {seconds[name]:.0f} s")
            print(f"## {name}: FAILED\n\n```\n{failures[name]}```\n", flush=True)
            continue
        seconds[name] = time.perf_counter() - t0
        loads[name] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
        res["data"]["seconds"] = seconds[name]
        res["data"]["load_avg_1m"] = loads[name]
        results.append(res)
        log(f"({i}/{len(chosen)}) {name} done in {seconds[name] / 60:.1f} min "
            f"(load average {loads[name]['before']} -> {loads[name]['after']})")
        print(markdown(res), flush=True)

    summary = summary_markdown(results, failures, seconds, args.quick)
    print(summary, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"{stamp}.json", args.out / f"{stamp}.md"
    payload = {"created_at": stamp, "quick": args.quick, "machine": machine(),
               "total_seconds": time.perf_counter() - started, "benchmarks": results, "failures": failures}
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(f"# recaug benchmarks {stamp}{' (quick)' if args.quick else ''}\n\n"
                       + "\n".join(markdown(r) for r in results) + "\n" + summary)
    print(f"saved {json_path} and {md_path.name}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
