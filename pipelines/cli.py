"""The `recaug` command line: what cron, Airflow and people call.

Exit codes (stable, for schedulers): 0 ok; 2 usage or config error; 3 input unusable (a table
cannot be read or lacks required columns); 4 input gate stopped the run (too many quarantined rows);
5 output gate failed (nothing published); 6 another run holds the lock; 7 the workdir is full or not
writable (nothing published); 1 anything unexpected. Each comes from the class of the error
(`recaug.core.errors`), never from its name or message. `snapshots diff` answers like diff(1): 0 same
features, 1 they differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recaug.core.offline import go_offline
from recaug.core.timeparse import format_utc, to_unix_seconds
from recaug.core.errors import (  # noqa: F401  (the exit codes, re-exported for callers and tests)
    EXIT_INPUT,
    EXIT_INPUT_GATE,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_OUTPUT_GATE,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    EXIT_WORKDIR,
    RecaugError,
    WorkdirUnwritable,
    ensure_writable,
    storage_errno,
)

# the CTR zoo's names, listed here so `--help` does not import torch (a test keeps them equal)
MODEL_NAMES = ("deepfm", "dcn", "din", "autoint", "xdeepfm", "wdl")


def _quiet_third_party() -> None:
    # Offline by contract: nothing may reach a hub, and GX must not send analytics.
    go_offline()


def parse_time(value: str | None) -> int | None:
    """`--as-of` / `--now`: unix seconds, or an ISO date/datetime (UTC unless it says otherwise)."""
    if value is None:
        return None
    try:
        return to_unix_seconds(value, "time")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _table(rows: list[list[object]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# --- verbs --------------------------------------------------------------------------------------


def cmd_validate(args) -> int:
    from recaug.core.config import load_config
    import pyarrow.compute as pc

    from recaug.pipelines.inputs import prepare_inputs

    cfg = load_config(args.config)
    quarantine_path = ensure_writable(cfg.workdir_path()) / "validate" / "quarantine.parquet"
    prep = prepare_inputs(cfg, as_of=args.as_of, quarantine_path=quarantine_path)
    gate = prep.gate
    print(f"dataset: {cfg.dataset.kind} ({cfg.name})")
    rows = []
    for table in ("users", "items", "interactions"):
        c = gate.counts[table]
        rows.append([table, c["rows_in"], c["rows_ok"], c["rows_quarantined"], f"{c['share']:.2%}"])
    print(_table(rows, ["table", "rows", "clean", "quarantined", "share"]))
    print(f"quarantine threshold: {cfg.input_gate.max_quarantine_share:.2%} per table -> ok")
    print(f"quarantine table: {quarantine_path} ({gate.quarantine.num_rows:,} rows)")
    sanitized = [f"{t}.{k} in {n:,} value(s)" for t, c in gate.counts.items() for k, n in c.get("sanitized", {}).items()]
    if sanitized:
        print("sanitized (kept, not quarantined): " + "; ".join(sanitized))
    if prep.notes.get("implicit_ratings"):
        print(f"implicit feedback: {prep.notes['implicit_ratings']:,} interactions with a rating in dataset.implicit_ratings "
              f"[{', '.join(f'{v:g}' for v in cfg.dataset.implicit_ratings)}] kept without a rating (label 1, no rating shown in prompts)")
    for warning in prep.warnings:
        print(f"recaug: warning: {warning}", file=sys.stderr)
    if prep.not_yet_visible:
        print(f"not yet visible at --as-of {format_utc(args.as_of)}: {prep.not_yet_visible:,} interactions")
    sizes = prep.sizes()
    print()
    if prep.timestamps == "row_order":
        print("splits (split.mode by_row_order: per user, the first rows in file order are prompt context only, "
              "the last ones valid/test):")
    else:
        print("splits (KAR protocol: per-user oldest part is prompt context only; CTR samples by global time):")
    print(
        _table(
            [[name, sizes[name]] for name in ("prompt", "train", "valid", "test")],
            ["split", "interactions"],
        )
    )
    if prep.bounds:
        print(f"valid from {format_utc(prep.bounds.valid_from)}; test from {format_utc(prep.bounds.test_from)}")
    n_samples = prep.samples.num_rows
    pos = int(pc.sum(prep.samples.column("label")).as_py() or 0)
    print(f"CTR samples: {n_samples:,} (positive share {pos / max(n_samples, 1):.1%}, label = rating > {cfg.split.click_threshold:g})")
    print(f"data cutoff: {prep.describe_time(prep.data_cutoff, format_utc)}")
    return EXIT_OK


def _say_waiting(lock: Path, wait: float):
    def say(holder: str) -> None:
        print(f"recaug: {lock} is held by {holder}; waiting up to {wait:g} s for that run to end", file=sys.stderr,
              flush=True)

    return say


def cmd_run(args) -> int:
    from recaug.core.config import load_config
    from recaug.pipelines.jobs import run_long_job_locked

    cfg = load_config(args.config)
    lock = cfg.workdir_path() / "run.lock"
    result = run_long_job_locked(cfg, args.runner, as_of=args.as_of, wait=args.wait, on_wait=_say_waiting(lock, args.wait),
                                 only=args.only, progress=args.progress)
    t = result.augmentation.report["totals"]
    print(
        f"augmentation: {t['llm_requests']:,} LLM calls + {t['cache_hits']:,} cached = "
        f"{t['distinct_prompts']:,} distinct prompts for {t['entities']:,} entities; "
        f"{t['no_history']:,} users without prompt history not prompted; "
        f"parse rate {t['parse_rate']:.1%}, {t['dead_letter']:,} dead-letter rows, "
        f"{t['truncated']:,} answers cut at max_new_tokens ({t['truncated_share']:.0%}), {t['output_tokens']:,} tokens out; "
        f"prompt tokens {t['input_tokens']:,} rendered, {t['prompt_tokens_computed']:,} computed"
    )
    print(f"run report: {result.augmentation.run_dir / 'report.md'}")
    print(f"published snapshot {result.snapshot_id}: {result.snapshot_path}")
    if result.removed_by_retention:
        print(f"retention removed: {', '.join(result.removed_by_retention)}")
    return EXIT_OK


def cmd_preview(args) -> int:
    import json

    from recaug.core.config import load_config
    from recaug.pipelines.jobs import preview_augmenter

    preview = preview_augmenter(load_config(args.config), args.augmenter, args.n, as_of=args.as_of)
    aug = preview.augmenter
    for f in preview.render_failures:
        print(f"== {aug.entity_kind} {f['entity_id']}: cannot render: {f['reason']}")
    if not preview.rows:
        print(f"{aug.name}: no entities selected (check the augmenter's options)")
        return EXIT_OK
    for row in preview.rows:
        p, r = row.pending, row.result
        print(f"=================== {aug.name} · {aug.entity_kind} {p.entity_id} ===================")
        for m in p.messages:
            print(f"--- prompt [{m['role']}]\n{m['content']}")
        print(f"--- LLM answer ({r.input_tokens} tokens in, {r.output_tokens} out, finish={r.finish_reason}, {r.latency_s:.2f} s)")
        print(r.text if r.finish_reason != "error" else f"ERROR: {r.error}")
        if row.parsed is not None:
            print("--- parsed record")
            print(json.dumps(row.parsed.record, indent=2, ensure_ascii=False))
            print("--- text to encode")
            print(row.parsed.text)
        else:
            print(f"--- validation error: {row.parse_error}")
        print()
    return EXIT_OK


def cmd_snapshots(args) -> int:
    import json

    from recaug.core.config import load_config
    from recaug.pipelines.snapshots import list_pins, list_snapshots, resolve_snapshot, snapshot_root

    cfg = load_config(args.config)
    root = snapshot_root(cfg)
    if args.action == "diff":
        return _snapshots_diff(root, args)
    if args.action == "list":
        snaps = list_snapshots(root) if root.exists() else []
        if not snaps:
            print(f"no snapshots under {root} yet (run `recaug run {args.config}`)")
            return EXIT_OK
        latest = resolve_snapshot(root, "latest").snapshot_id
        rows = []
        for info in snaps:
            m = info.manifest
            n_emb = sum(e["rows"] for k, e in m["tables"].items() if k.startswith("embeddings/"))
            rows.append([
                info.snapshot_id + (" (latest)" if info.snapshot_id == latest else ""),
                format_utc(m["data_cutoff"]), len([k for k in m["tables"] if k.startswith("embeddings/")]), n_emb,
                "pinned" if info.pinned else "",
            ])
        print(_table(rows, ["snapshot", "data cutoff", "tables", "vectors", ""]))
        return EXIT_OK
    info = resolve_snapshot(root, args.snapshot or "latest")
    m = info.manifest
    if args.json:
        print(json.dumps(m, indent=2, default=str))
        return EXIT_OK
    print(f"snapshot {info.snapshot_id}  ({info.path})")
    print(f"created {m['created_at']} by run {m.get('run_id')} · code {m.get('code_version')} · runner {m.get('runner')}")
    print(f"data cutoff {format_utc(m['data_cutoff'])}")
    model = m.get("model", {})
    print(f"model {model.get('id')} ({model.get('engine')}, sampling {model.get('sampling')})")
    print(f"encoder {m.get('encoder', {}).get('id')} (dim {m.get('encoder', {}).get('dim')})")
    print("templates: " + ", ".join(f"{k}={v[:12]}" for k, v in (m.get("templates") or {}).items()))
    tok = m.get("tokens", {})
    print(f"tokens: {tok.get('input_tokens', 0):,} in, {tok.get('output_tokens', 0):,} out, "
          f"{tok.get('llm_requests', 0):,} LLM calls, {tok.get('cache_hits', 0):,} cache hits")
    rows = [[name, e["rows"], e.get("kind", ""), e["sha256"][:12]] for name, e in m["tables"].items()]
    print(_table(rows, ["table", "rows", "kind", "sha256"]))
    gate = m.get("output_gate", {})
    if gate:
        failed = [c["name"] for c in gate.get("checks", []) if not c["success"]]
        print(f"output gate: {'passed' if gate.get('success') else 'FAILED'} ({len(gate.get('checks', []))} checks{', failed: ' + ', '.join(failed) if failed else ''})")
    pins = list_pins(root, info.snapshot_id)
    if pins:
        print("pinned by: " + "; ".join(p.get("reason", "?") for p in pins))
    return EXIT_OK


def _snapshots_diff(root, args) -> int:
    """Exit 0 when the two snapshots hold the same features, 1 when they differ (like diff(1))."""
    from recaug.pipelines.snapshot_diff import diff_snapshots, locate_snapshot

    if not args.snapshot:
        print("recaug snapshots diff: name the snapshot to compare (an id, 'latest' or a snapshot folder)", file=sys.stderr)
        return EXIT_USAGE
    result = diff_snapshots(locate_snapshot(root, args.snapshot), locate_snapshot(root, args.other or "latest"), atol=args.atol)
    print(result.summary())
    return EXIT_OK if result.same else 1


def cmd_train(args) -> int:
    from recaug.core.config import load_config
    from recaug.pipelines.jobs import train_manual

    result = train_manual(load_config(args.config), args.snapshot, args.model, args.seed, adaptor=args.adaptor,
                          warm_start=args.warm_start)
    m = result.metrics
    print(f"best epoch {result.best_epoch} (validation AUC by epoch: {', '.join(f'{x:.4f}' for x in result.history_of_valid_auc)})")
    print(f"test (evaluated once): AUC {m['test_auc']:.4f}, LogLoss {m['test_logloss']:.4f}, GAUC {m['test_gauc']:.4f}")
    print(f"checkpoint: {result.checkpoint_path}")
    return EXIT_OK


def cmd_report(args) -> int:
    from recaug.pipelines.experiment import run_report
    from recaug.core.config import load_config

    cfg = load_config(args.config)
    ensure_writable(cfg.workdir_path())
    seeds = list(range(args.seeds)) if args.seeds else None
    report = run_report(cfg, args.snapshot, models=args.models, seeds=seeds, variants=args.variants)
    print()
    print((Path(report["paths"]["markdown"])).read_text())
    print(f"saved: {report['paths']['markdown']}, {report['paths']['png']}, {report['paths']['json']}")
    return EXIT_OK


# The demo's table trains DeepFM only: it is KAR's own backbone, its 12 models (four variants x three
# seeds) take ~80 s on 2 cores, and they already answer "does LLM knowledge lift AUC?" inside the
# demo's time; the six-backbone table (~13 min; xDeepFM and DIN alone ~3.5 and ~3 min) is `recaug report`.
DEMO_MODELS = ("deepfm",)


def cmd_demo(args) -> int:
    """validate -> run (augment, encode, gate, publish) -> the CTR result table, on one config."""
    import time

    started = time.perf_counter()
    steps = [
        ("1/4 input gate and splits", cmd_validate, argparse.Namespace(config=args.config, as_of=None)),
        ("2/4 long job: augment -> encode -> output gate -> publish", cmd_run,
         argparse.Namespace(config=args.config, as_of=None, runner=None, only=None, wait=0.0, progress=args.progress)),
        ("3/4 published snapshot", cmd_snapshots, argparse.Namespace(config=args.config, action="show", snapshot="latest", json=False)),
        (f"4/4 CTR result table ({', '.join(args.models)}; the full table of ctr.models: recaug report CONFIG)", cmd_report,
         argparse.Namespace(config=args.config, snapshot="latest", models=args.models, seeds=None, variants="abcd")),
    ]
    for title, func, ns in steps:
        print(f"\n===== recaug demo {title} =====", flush=True)
        code = func(ns)
        if code != EXIT_OK:
            print(f"recaug demo: step '{title}' failed with exit code {code}", file=sys.stderr)
            return code
    print(f"\nrecaug demo finished in {time.perf_counter() - started:.0f} s. Run it again: the generation cache "
          "answers every unchanged prompt (step 2's 'augmentation:' line then counts 0 LLM calls) and only the "
          "CTR models are retrained.")
    return EXIT_OK


def cmd_schedule(args) -> int:
    from recaug.core.config import load_config
    from recaug.pipelines.scheduler import tick
    from recaug.pipelines.snapshots import SnapshotNotFound, resolve_snapshot, snapshot_root

    cfg = load_config(args.config)
    ensure_writable(cfg.workdir_path())

    def has_snapshot() -> bool:
        try:
            resolve_snapshot(snapshot_root(cfg), "latest")
            return True
        except (SnapshotNotFound, FileNotFoundError):
            return False

    def long_job(cfg, now: int, full_refresh: bool) -> dict:
        from recaug.pipelines.augment import Budget
        from recaug.pipelines.jobs import run_long_job_locked

        budget = None if full_refresh else Budget(cfg.schedule.long_max_entities, cfg.schedule.long_max_tokens)
        lock = cfg.workdir_path() / "run.lock"
        result = run_long_job_locked(cfg, as_of=now, wait=args.wait, on_wait=_say_waiting(lock, args.wait),
                                     progress=args.progress, budget=budget, manual=False, log=lambda line: None)
        return {"snapshot": result.snapshot_id, "llm_requests": result.augmentation.report["totals"]["llm_requests"]}

    def short_job(cfg, now: int, warm_start: str | None) -> dict:
        from recaug.pipelines.experiment import train_model

        _, result = train_model(cfg, "latest", cfg.ctr.models[0], cfg.ctr.seeds[0], warm_start=warm_start)
        return {"checkpoint": str(result.checkpoint_path), "test_auc": result.metrics["test_auc"]}

    res = tick(cfg, long_job, short_job, has_snapshot, now=args.now, dry_run=args.dry_run)
    if res.skipped_locked:
        return EXIT_OK
    for entry in res.ran:
        print(f"ran {entry['job']} job in {entry['seconds']:.1f} s: " + ", ".join(f"{k}={v}" for k, v in entry.items() if k in ("snapshot", "checkpoint", "llm_requests", "test_auc")))
    if not args.dry_run and not res.ran:
        print("nothing was due")
    return EXIT_OK


def _not_yet(verb: str):
    def run(args) -> int:
        print(f"recaug {verb}: not available in this version yet.", file=sys.stderr)
        return EXIT_USAGE

    return run


VERBS = {
    "run": ("run the long job: validate input -> augment -> encode -> gate -> publish", cmd_run),
    "preview": ("show rendered prompts, real LLM answers and parsed records for a few entities", cmd_preview),
    "validate": ("run the input gate and print row, quarantine and split counts", cmd_validate),
    "snapshots": ("list, show or diff published feature snapshots", cmd_snapshots),
    "train": ("train a CTR model on a published snapshot", cmd_train),
    "schedule": ("run what is due in the long-short schedule (call from cron)", cmd_schedule),
    "report": ("print and save the CTR result table", cmd_report),
    "demo": ("run the whole product on the packaged model and data", cmd_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recaug",
        description="Offline LLM feature augmentation for recommender systems.",
        epilog="Exit codes: 0 ok, 2 usage/config, 3 input unusable, 4 input gate, 5 output gate, 6 locked, "
               "7 workdir full or not writable, 1 unexpected.",
    )
    from recaug import __version__

    parser.add_argument("--version", action="version", version=f"recaug {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("validate", help=VERBS["validate"][0], description=VERBS["validate"][0])
    p.add_argument("config", help="pipeline config (YAML)")
    p.add_argument("--as-of", type=parse_time, default=None, help="only interactions up to this time are visible")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help=VERBS["run"][0], description=VERBS["run"][0])
    p.add_argument("config", help="pipeline config (YAML)")
    p.add_argument("--as-of", type=parse_time, default=None, help="only interactions up to this time are visible")
    p.add_argument("--runner", choices=["local", "ray", "beam"], default=None, help="override runner.kind")
    p.add_argument("--only", nargs="+", metavar="AUGMENTER", help="run only these configured augmenters")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for another run's lock (default: fail at once)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "snapshots", help=VERBS["snapshots"][0], description=VERBS["snapshots"][0],
        epilog="diff compares every table (keys, texts, vectors within --atol; created_at and latency_s ignored) "
               "and exits 0 when the features are the same, 1 when they differ. A and B are snapshot ids, 'latest', "
               "or paths to a snapshot folder or another workdir's snapshots/ folder (e.g. a run on another runner).",
    )
    p.add_argument("action", choices=["list", "show", "diff"])
    p.add_argument("config", help="pipeline config (YAML)")
    p.add_argument("snapshot", nargs="?", default=None, help="snapshot id or 'latest' (show); A (diff)")
    p.add_argument("other", nargs="?", default=None, help="B (diff; default: latest)")
    p.add_argument("--json", action="store_true", help="show: print the whole manifest as JSON")
    p.add_argument("--atol", type=float, default=1e-5, help="diff: largest vector difference that counts as equal")
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser("train", help=VERBS["train"][0], description=VERBS["train"][0])
    p.add_argument("config", help="pipeline config (YAML)")
    p.add_argument("--snapshot", default="latest", help="snapshot id or 'latest'")
    p.add_argument("--model", default="deepfm", choices=MODEL_NAMES)
    p.add_argument("--adaptor", default=None, choices=["hybrid", "mlp", "raw", "none"], help="override ctr.adaptor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm-start", default=None, help="a previous checkpoint to start from")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help=VERBS["report"][0], description=VERBS["report"][0])
    p.add_argument("config", help="pipeline config (YAML)")
    p.add_argument("--snapshot", default="latest")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=None, help="default: ctr.models")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: ctr.seeds)")
    p.add_argument("--variants", default="abcd", help="which rows: a ids only, b raw-text vectors, c LLM, d LLM + synthetic")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help=VERBS["demo"][0], description=VERBS["demo"][0])
    p.add_argument("config", nargs="?", default=str(Path(__file__).resolve().parent.parent / "configs" / "ml100k.yaml"))
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(DEMO_MODELS),
                   help="backbones of the demo's table (default: %(default)s; `recaug report` trains all of ctr.models)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("schedule", help=VERBS["schedule"][0], description=VERBS["schedule"][0])
    p.add_argument("action", choices=["tick"])
    p.add_argument("config", help="pipeline config (YAML)")
    p.add_argument("--now", type=parse_time, default=None, help="the time to act as of (default: now); for backfills and simulations")
    p.add_argument("--dry-run", action="store_true", help="print what would run and why, run nothing")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for a manual run's lock")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("preview", help=VERBS["preview"][0], description=VERBS["preview"][0])
    p.add_argument("config", help="pipeline config (YAML)")
    p.add_argument("augmenter", help="augmenter name (see the config or docs/augmenters.md)")
    p.add_argument("-n", type=int, default=5, help="how many sample entities (default 5)")
    p.add_argument("--as-of", type=parse_time, default=None)
    p.set_defaults(func=cmd_preview)

    for verb, (help_text, func) in VERBS.items():
        if verb in sub.choices:
            continue
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func or _not_yet(verb))
    return parser


def _workdir_of(args) -> Path | None:
    """The workdir of the command's config, for a storage error raised outside any stage that named it."""
    config = getattr(args, "config", None)
    if not config:
        return None
    try:
        from recaug.core.config import load_config

        return load_config(config).workdir_path()
    except Exception:  # the config itself is the problem: the error says where instead
        return None


def _report(exc: RecaugError) -> int:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    print(f"recaug: {exc.prefix}{msg}", file=sys.stderr)
    run_dir = getattr(exc, "run_dir", None)
    if run_dir:
        print(f"recaug: the gate report is in {run_dir}", file=sys.stderr)
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # `recaug ... | head` closed the pipe: not an error of ours
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("recaug: interrupted; re-run the same command to resume (finished shards are kept)", file=sys.stderr)
        return 130
    except RecaugError as exc:
        return _report(exc)
    except Exception as exc:
        # a full or read-only disk met where no stage named what it was writing
        if storage_errno(exc) is None:
            raise
        filename = getattr(exc, "filename", None)
        workdir = _workdir_of(args)
        if workdir is None or (filename and not Path(str(filename)).resolve().is_relative_to(workdir)):
            workdir = Path(str(filename)).resolve().parent if filename else Path.cwd()
        return _report(WorkdirUnwritable(workdir, f"recaug {args.verb} writing {filename or 'a file'}", exc))


if __name__ == "__main__":
    sys.exit(main())
