"""CTR training on a published snapshot, and the result table (KAR's comparison on real data).

Leakage: a snapshot's user texts were written from the prompt split only (the oldest part of each
user's history, which ends before that user's first CTR sample) and its item texts from catalogue
metadata, so every CTR sample of the same split may use them. `recaug train` rebuilds the split
exactly as the snapshot saw it (the snapshot's data cutoff) and checks that rule before training.

The result table compares, per backbone, mean ± std over seeds, selected on validation only:
  (a) ids + attributes only;
  (b) + vectors of the raw item text / user history, encoder only, no LLM (for the same entities as (c));
  (c) + the LLM knowledge vectors (KAR: user preference reasoning, item knowledge);
  (d) as (c) + LLM-made synthetic interactions in training.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from recaug.core.config import CTRConfig, PipelineConfig

VARIANTS = {
    "a": "ids + attributes",
    "b": "+ raw-text vectors (encoder only)",
    "c": "+ LLM knowledge (KAR)",
    "d": "+ LLM knowledge + synthetic interactions",
}


@dataclass
class TrainingInputs:
    snapshot_id: str
    manifest: dict[str, Any]
    samples: pa.Table
    users: pa.Table
    items: pa.Table
    split: pa.Table
    llm_vectors: dict[str, pa.Table]  # "user:<augmenter>" / "item:<augmenter>"
    synthetic: pa.Table


def _config_hash(cfg: PipelineConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.hash_view(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_no_leak(split: pa.Table) -> None:
    """Every CTR sample is at or after the last prompt row of its user (the KAR rule)."""
    df = pl.from_arrow(split)
    last_prompt = df.filter(pl.col("split") == "prompt").group_by("user_id").agg(pl.col("timestamp").max().alias("p"))
    bad = df.filter(pl.col("split") != "prompt").join(last_prompt, on="user_id").filter(pl.col("timestamp") < pl.col("p"))
    if bad.height:
        raise RuntimeError(f"{bad.height} CTR samples are older than their user's prompt context; refusing to train")


def load_training_inputs(
    cfg: PipelineConfig, snapshot: str = "latest", vector_augmenters: list[str] | None = None, pin_reason: str | None = None
) -> TrainingInputs:
    """The snapshot's features and the samples as of its data cutoff. With `pin_reason` the snapshot is
    pinned before anything is read, so a publish's retention cannot delete it while a model trains on it."""
    import pyarrow.parquet as pq

    from recaug.pipelines import features
    from recaug.pipelines.inputs import prepare_inputs
    from recaug.pipelines.snapshots import pin_snapshot, read_snapshot, snapshot_root, unpin

    root = snapshot_root(cfg)
    wanted = vector_augmenters or cfg.ctr.vector_augmenters

    def read(info):
        # one whole snapshot: `latest` retired by a concurrent publish before the pin is read again as the new one
        if pin_reason:
            pin_snapshot(root, info.snapshot_id, pin_reason)
        try:
            manifest = info.manifest
            feats = features.load(root, info.snapshot_id, augmenter=wanted)
            synthetic = (pq.read_table(info.table_path("synthetic/interactions"))
                         if "synthetic/interactions" in manifest["tables"] else None)
        except BaseException:
            if pin_reason:
                unpin(root, info.snapshot_id, pin_reason)
            raise
        return info, manifest, feats, synthetic

    info, manifest, feats, synthetic = read_snapshot(root, snapshot, read)
    try:
        vectors = {}
        for (aug, kind), part in feats.group_by(["augmenter", "entity_kind"], maintain_order=True):
            vectors[f"{kind}:{aug}"] = part.select("entity_id", "vector").to_arrow()
        missing = sorted(set(wanted) - {k.split(":", 1)[1] for k in vectors})
        if missing:
            raise ValueError(f"snapshot {info.snapshot_id} has no embeddings for augmenter(s) {missing} (ctr.vector_augmenters)")
        prep = prepare_inputs(cfg, as_of=int(manifest["data_cutoff"]))
        check_no_leak(prep.split)
    except BaseException:
        if pin_reason:  # nothing will train on it
            unpin(root, info.snapshot_id, pin_reason)
        raise
    from recaug.schemas import SYNTHETIC_INTERACTIONS

    return TrainingInputs(
        snapshot_id=info.snapshot_id,
        manifest=manifest,
        samples=prep.samples,
        users=prep.users,
        items=prep.items,
        split=prep.split,
        llm_vectors=vectors,
        synthetic=synthetic if synthetic is not None else SYNTHETIC_INTERACTIONS.empty_table(),
    )


# a user or item with at most this many (real) training samples is "cold" in the segment table
COLD_MAX_TRAIN_SAMPLES = 5


def vector_coverage(samples: pa.Table, llm_vectors: dict[str, pa.Table]) -> dict[str, dict[str, Any]]:
    """Per split: samples, and how many of them have a user with an LLM user vector, an item with an
    LLM item vector, either, or both (any augmenter of that kind) - so a null result can be told
    apart from no coverage."""
    df = pl.from_arrow(samples).select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), "split")
    ids = {"user": set(), "item": set()}
    for key, table in llm_vectors.items():
        kind = key.split(":", 1)[0]
        ids.setdefault(kind, set()).update(table.column("entity_id").to_pylist())
    df = df.with_columns(pl.col("user_id").is_in(list(ids["user"])).alias("_u"),
                         pl.col("item_id").is_in(list(ids["item"])).alias("_i"))
    out: dict[str, dict[str, Any]] = {}
    for split in ("train", "valid", "test"):
        part = df.filter(pl.col("split") == split)
        n = part.height
        counts = {"samples": n, "user": int(part["_u"].sum()), "item": int(part["_i"].sum()),
                  "either": int((part["_u"] | part["_i"]).sum()), "both": int((part["_u"] & part["_i"]).sum())}
        out[split] = counts | {f"{k}_share": (counts[k] / n if n else 0.0) for k in ("user", "item", "either", "both")}
    return out


def coverage_lines(coverage: dict[str, dict[str, Any]]) -> list[str]:
    return [
        f"  {split:<5} {c['samples']:>9,} samples: user vector {c['user']:,} ({c['user_share']:.1%}), "
        f"item vector {c['item']:,} ({c['item_share']:.1%}), either {c['either_share']:.1%}, both {c['both_share']:.1%}"
        for split, c in coverage.items()
    ]


def segment_flags(samples: pa.Table, llm_vectors: dict[str, pa.Table]) -> dict[str, dict[str, set[str]]]:
    """Which users and items are cold (<= COLD_MAX_TRAIN_SAMPLES real training samples) and which
    have an LLM vector: {"user": {"cold": ids, "vector": ids}, "item": {...}}."""
    df = pl.from_arrow(samples).select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), "split")
    train = df.filter(pl.col("split") == "train")
    out: dict[str, dict[str, set[str]]] = {}
    for kind in ("user", "item"):
        col = f"{kind}_id"
        counts = df.select(col).unique().join(train.group_by(col).len("_n"), on=col, how="left").with_columns(
            pl.col("_n").fill_null(0))
        cold = set(counts.filter(pl.col("_n") <= COLD_MAX_TRAIN_SAMPLES)[col].to_list())
        vector = set()
        for key, table in llm_vectors.items():
            if key.startswith(f"{kind}:"):
                vector.update(table.column("entity_id").to_pylist())
        out[kind] = {"cold": cold, "vector": vector}
    return out


SEGMENTS = ("cold users", "warm users", "cold items", "warm items", "users with LLM vector", "items with LLM vector")


def segment_metrics(test_rows: dict[str, np.ndarray], spec, flags: dict[str, dict[str, set[str]]]) -> dict[str, dict[str, Any]]:
    """Test AUC, LogLoss and sample count per segment (AUC None where a segment has one class or no
    sample, LogLoss None where it has no sample)."""
    from recaug.ctr_models.metrics import auc, logloss

    from recaug.ctr_models.data import FIRST_VALUE

    def member(kind: str, index: np.ndarray, ids: set[str]) -> np.ndarray:
        # vocabulary index FIRST_VALUE.. = values in order; below = padding/unknown (in no id segment)
        values = pa.array(spec.vocabularies[f"{kind}_id"].values, pa.string())
        hit = pc.is_in(values, value_set=pa.array(sorted(ids), pa.string())).to_numpy(zero_copy_only=False)
        lookup = np.concatenate([np.zeros(FIRST_VALUE, dtype=bool), hit.astype(bool)])
        return lookup[np.clip(index, 0, len(lookup) - 1)]

    u, i = test_rows["user_index"], test_rows["item_index"]
    cold_u, cold_i = member("user", u, flags["user"]["cold"]), member("item", i, flags["item"]["cold"])
    masks = {
        "cold users": cold_u, "warm users": ~cold_u, "cold items": cold_i, "warm items": ~cold_i,
        "users with LLM vector": member("user", u, flags["user"]["vector"]),
        "items with LLM vector": member("item", i, flags["item"]["vector"]),
    }
    out = {}
    for name, mask in masks.items():
        labels, preds = test_rows["label"][mask], test_rows["pred"][mask]
        value = float(auc(labels, preds)) if labels.size and labels.min() != labels.max() else None
        out[name] = {"samples": int(mask.sum()), "auc": value,
                     "logloss": float(logloss(labels, preds)) if labels.size else None}
    return out


def raw_text_vectors(cfg: PipelineConfig, inputs: TrainingInputs, like: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Row (b): the encoder applied to the text the LLM was given (item line / user history),
    for exactly the entities that have LLM vectors, so (b) and (c) differ only by the LLM."""
    from recaug.augmenters.context import item_lines
    from recaug.encoders import encode_table
    from recaug.encoders.text_encoder import TextEncoder
    from recaug.ctr_models.splits import prompt_context

    encoder = TextEncoder(cfg.encoder, progress=False)
    items = pl.from_arrow(inputs.items)
    lines = item_lines(items)
    history = prompt_context(inputs.split).join(lines, on="item_id", how="left")
    user_text = history.group_by("user_id", maintain_order=True).agg(pl.col("item_line").fill_null("").str.join("\n").alias("text"))
    out = {}
    for key, table in like.items():
        kind, aug = key.split(":", 1)
        ids = pl.DataFrame({"entity_id": table.column("entity_id").to_pylist()}, schema={"entity_id": pl.String})
        if kind == "item":
            texts = ids.join(lines.rename({"item_id": "entity_id", "item_line": "text"}), on="entity_id", how="inner")
        else:
            texts = ids.join(user_text.rename({"user_id": "entity_id"}), on="entity_id", how="inner")
        texts = texts.filter(pl.col("text").str.len_chars() > 0).with_columns(
            pl.lit(kind).alias("entity_kind"), pl.lit(f"raw:{aug}").alias("augmenter"), pl.lit("raw").alias("template_hash")
        )
        emb = encode_table(texts.to_arrow(), encoder, cfg.workdir_path() / "cache" / "encodings", f"raw:{aug}")
        out[f"{kind}:raw_{aug}"] = emb.select(["entity_id", "vector"])
    return out


def train_model(
    cfg: PipelineConfig,
    snapshot: str = "latest",
    model: str = "deepfm",
    seed: int = 0,
    adaptor: str | None = None,
    warm_start: str | None = None,
    log=print,
):
    """`recaug train`: one backbone on one snapshot; the checkpoint pins the snapshot."""
    from recaug.ctr_models import train_ctr
    from recaug.pipelines.long_job import new_run_id
    from recaug.pipelines.snapshots import pin_snapshot, snapshot_root, unpin

    run_id = new_run_id()
    root = snapshot_root(cfg)
    # pinned while training (a concurrent publish's retention must not delete it), then by the checkpoint
    training_pin = f"training run {run_id}"
    inputs = load_training_inputs(cfg, snapshot, pin_reason=training_pin)
    try:
        ctr = cfg.ctr if adaptor is None else cfg.ctr.model_copy(update={"adaptor": adaptor})
        # one folder per training run: a daily retrain never overwrites the checkpoint it started from
        out_dir = cfg.workdir_path() / "models" / inputs.snapshot_id / run_id
        lineage = {"snapshot_id": inputs.snapshot_id, "config_hash": _config_hash(cfg), "pipeline": cfg.name}
        log(f"train {model} (adaptor {ctr.adaptor}, seed {seed}) on snapshot {inputs.snapshot_id}: "
            f"{inputs.samples.num_rows:,} samples, vectors {sorted(inputs.llm_vectors)}"
            + (f", warm start from {warm_start}" if warm_start else ""))
        coverage = vector_coverage(inputs.samples, inputs.llm_vectors)
        log("LLM-vector coverage of the samples (share whose user / item has an LLM vector):")
        for line in coverage_lines(coverage):
            log(line)
        result = train_ctr(
            inputs.samples, inputs.users, inputs.items, inputs.split, inputs.llm_vectors, ctr, model, seed,
            warm_start=warm_start, checkpoint_dir=out_dir,
            synthetic=inputs.synthetic if ctr.synthetic_rate > 0 else None, lineage=lineage,
        )
        if result.checkpoint_path:
            pin_snapshot(root, inputs.snapshot_id, f"model {result.checkpoint_path}")
    finally:
        unpin(root, inputs.snapshot_id, training_pin)
    return inputs, result


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def run_report(
    cfg: PipelineConfig,
    snapshot: str = "latest",
    models: list[str] | None = None,
    seeds: list[int] | None = None,
    variants: str = "abcd",
    log=print,
) -> dict[str, Any]:
    """Train every backbone under every variant and seed; write markdown, JSON and a PNG plot."""
    from recaug.ctr_models import build_ctr_data, train_on_data

    started = time.perf_counter()
    inputs = load_training_inputs(cfg, snapshot)
    models = models or cfg.ctr.models
    seeds = seeds if seeds is not None else cfg.ctr.seeds
    data_by_variant: dict[str, Any] = {}
    notes = []
    coverage = vector_coverage(inputs.samples, inputs.llm_vectors)
    log("LLM-vector coverage of the samples (share whose user / item has an LLM vector):")
    for line in coverage_lines(coverage):
        log(line)
    flags = segment_flags(inputs.samples, inputs.llm_vectors)
    syn_rate = cfg.ctr.synthetic_rate
    for v in variants:
        if v == "a":
            vectors, syn = {}, None
        elif v == "b":
            vectors, syn = raw_text_vectors(cfg, inputs, inputs.llm_vectors), None
        elif v == "c":
            vectors, syn = inputs.llm_vectors, None
        else:
            if syn_rate <= 0 or inputs.synthetic.num_rows == 0:
                notes.append("row (d) skipped: ctr.synthetic_rate is 0 or the snapshot has no synthetic interactions")
                continue
            vectors, syn = inputs.llm_vectors, inputs.synthetic
        data_by_variant[v] = build_ctr_data(inputs.samples, inputs.users, inputs.items, inputs.split, vectors,
                                            cfg.ctr.history_len, synthetic=syn)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    total = len(models) * len(data_by_variant) * len(seeds)
    done = 0
    for model in models:
        for v, data in data_by_variant.items():
            ctr: CTRConfig = cfg.ctr.model_copy(update={
                "adaptor": "none" if v == "a" else (cfg.ctr.adaptor if cfg.ctr.adaptor != "none" else "hybrid"),
                "synthetic_rate": syn_rate if v == "d" else 0.0,
            })
            for seed in seeds:
                r = train_on_data(data, ctr, model, seed)
                done += 1
                results.setdefault(model, {}).setdefault(v, []).append(
                    {k: r.metrics[k] for k in ("test_auc", "test_logloss", "test_gauc", "valid_auc")}
                    | {"best_epoch": r.best_epoch, "segments": segment_metrics(r.test_rows, data.spec, flags)}
                )
                log(f"  [{done}/{total}] {model:<8} ({v}) seed {seed}: valid AUC {r.metrics['valid_auc']:.4f}, "
                    f"test AUC {r.metrics['test_auc']:.4f}, LogLoss {r.metrics['test_logloss']:.4f} ({r.seconds:.1f} s)")
    report = {
        "pipeline": cfg.name,
        "snapshot_id": inputs.snapshot_id,
        "data_cutoff": inputs.manifest["data_cutoff"],
        "samples": {s: int(n) for s, n in pl.from_arrow(inputs.samples).group_by("split").len().iter_rows()},
        "vectors": {k: t.num_rows for k, t in inputs.llm_vectors.items()},
        "coverage": coverage,
        "cold_max_train_samples": COLD_MAX_TRAIN_SAMPLES,
        "synthetic_interactions": inputs.synthetic.num_rows,
        "synthetic_rate": syn_rate,
        "seeds": seeds,
        "variants": {v: VARIANTS[v] for v in data_by_variant},
        "results": results,
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }
    out_dir = cfg.workdir_path() / "reports" / inputs.snapshot_id
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    md = report_markdown(report)
    (out_dir / "report.md").write_text(md)
    plot_report(report, out_dir / "report.png")
    report["paths"] = {"markdown": str(out_dir / "report.md"), "png": str(out_dir / "report.png"), "json": str(out_dir / "report.json")}
    return report


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# CTR result table — {report['pipeline']}, snapshot {report['snapshot_id']}",
        "",
        f"Test AUC and LogLoss, mean ± std over seeds {report['seeds']}; early stopping and model selection on the "
        "validation split only, test evaluated once per run. Samples: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(report["samples"].items()))
        + ". LLM vectors: " + ", ".join(f"{k} ({v:,} entities)" for k, v in report["vectors"].items())
        + f". Synthetic interactions available: {report['synthetic_interactions']:,} (rate {report['synthetic_rate']}).",
        "",
        "| backbone | variant | test AUC | test LogLoss | test GAUC |",
        "|---|---|---|---|---|",
    ]
    for model, per in report["results"].items():
        for v, runs in per.items():
            lines.append(
                f"| {model} | ({v}) {report['variants'][v]} | {_fmt([r['test_auc'] for r in runs])} | "
                f"{_fmt([r['test_logloss'] for r in runs])} | {_fmt([r['test_gauc'] for r in runs])} |"
            )
    if report.get("coverage"):
        lines += ["", "LLM-vector coverage of the samples (share whose user / item has an LLM vector):", "",
                  "| split | samples | user vector | item vector | either | both |", "|---|---:|---:|---:|---:|---:|"]
        for split, c in report["coverage"].items():
            lines.append(f"| {split} | {c['samples']:,} | {c['user']:,} ({c['user_share']:.1%}) | "
                         f"{c['item']:,} ({c['item_share']:.1%}) | {c['either_share']:.1%} | {c['both_share']:.1%} |")
    segments = [seg for seg in SEGMENTS if any(seg in r.get("segments", {}) for per in report["results"].values()
                                                for runs in per.values() for r in runs)]
    if segments:
        lines += ["", f"Test AUC by segment, mean over seeds (cold = at most {report.get('cold_max_train_samples')} "
                  "training samples; the sample count is per run; - = one class only or no sample):", "",
                  "| backbone | variant | " + " | ".join(segments) + " |", "|---|---|" + "---|" * len(segments)]
        for model, per in report["results"].items():
            for v, runs in per.items():
                cells = []
                for seg in segments:
                    vals = [r["segments"][seg]["auc"] for r in runs if r["segments"][seg]["auc"] is not None]
                    n = runs[0]["segments"][seg]["samples"]
                    cells.append(f"{np.mean(vals):.4f} (n={n:,})" if vals else f"- (n={n:,})")
                lines.append(f"| {model} | ({v}) | " + " | ".join(cells) + " |")
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["results"])
    variants = list(report["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(variants), 1)
    for ax, metric, label in ((axes[0], "test_auc", "test AUC (higher is better)"), (axes[1], "test_logloss", "test LogLoss (lower is better)")):
        for i, v in enumerate(variants):
            means = [np.mean([r[metric] for r in report["results"][m].get(v, [])]) for m in models]
            stds = [np.std([r[metric] for r in report["results"][m].get(v, [])]) for m in models]
            xs = np.arange(len(models)) + (i - (len(variants) - 1) / 2) * width
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=f"({v}) {report['variants'][v]}")
        ax.set_xticks(np.arange(len(models)), models)
        ax.set_title(label)
        values = [r[metric] for m in models for v in variants for r in report["results"][m].get(v, [])]
        if values:
            lo, hi = min(values), max(values)
            pad = (hi - lo) * 0.5 + 1e-3
            ax.set_ylim(lo - pad, hi + pad)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{report['pipeline']}: CTR models with and without LLM features (snapshot {report['snapshot_id']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
