"""Feature join and CTR training throughput on MovieLens-100K (the packaged recbole copy).

Vectors: random unit vectors of 384 dimensions (all-MiniLM-L6-v2's width) for every user and item,
published as two real snapshots (`kar_user_preference`, `kar_item_knowledge`; one cut off before
every sample, one at the samples' median time), so the join does the real point-in-time work while
the figures do not depend on a long LLM run. Throughput does not depend on what the vectors say.

  join        recaug.features.join_point_in_time over every CTR sample (and the samples tiled to
              ~1M rows): each sample gets the vectors of the newest snapshot cut off before it
  dataset     build_ctr_data: vocabularies, side features, DIN history, per-entity vectors
  train       one epoch of DeepFM, the same batches, without vectors (adaptor "none") and with the
              KAR hybrid-expert adaptor over both vectors: vectors looked up by index from the tables
              inside the model (the training path: the adaptor runs once per distinct user/item of a
              batch), and gathered per sample and passed in (the earlier input path, every sample's
              vectors through the adaptor; same adaptor code); plus the adaptor over 64-d vectors (what `encoder.pca_dim: 64`
              gives). Best of --repeats interleaved runs; validation AUC after the epoch, side by side.
  predict     scoring the validation split with each model

    .venv/bin/python bench/bench_ctr.py [--repeats 2] [--quick]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, log, result, standalone, table  # noqa: E402

NAME = "ctr"
DIM = 384
VECTORS = {"kar_user_preference": "user", "kar_item_knowledge": "item"}


def random_embeddings(ids: list[str], augmenter: str, kind: str, seed: int, dim: int = DIM):
    import numpy as np
    import pyarrow as pa

    from recaug.schemas.vectors import fixed_size_vectors
    from recaug.schemas.tables import embedding_schema

    vec = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    meta = {"recaug.encoder": "bench/random", "recaug.pooling": "none", "recaug.augmenter": augmenter,
            "recaug.entity_kind": kind, "recaug.snapshot": "unpublished"}
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), fixed_size_vectors(vec), pa.array([f"h{i}" for i in range(len(ids))], pa.string())],
        schema=embedding_schema(dim, meta),
    )


def _per_sample_epoch(model, data, train, optimizer, batch_size, generator) -> None:
    """The earlier input path: each batch's vectors gathered per sample and passed to the model."""
    import torch
    import torch.nn.functional as F

    from recaug.ctr_models.train import _batch_bounds

    model.train()
    order = torch.randperm(len(train), generator=generator)
    for start, end in _batch_bounds(len(train), batch_size):
        index = order[start:end]
        ids, labels = train.ids[index], train.labels[index]
        vectors, missing = data.gather_vectors(ids)
        loss = F.binary_cross_entropy(model(ids, vectors, missing), labels, reduction="sum")
        optimizer.zero_grad()
        (loss + model.regularization_loss()).backward()
        optimizer.step()


def _per_sample_predict(model, data, split, batch_size: int = 4096):
    import numpy as np
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            ids = split.ids[start:start + batch_size]
            out.append(model(ids, *data.gather_vectors(ids)))
    return torch.cat(out).numpy().astype(np.float64)


def _train_epochs(datasets, cfg, paths, repeats: int) -> dict[str, dict]:
    """paths: label -> (adaptor kind, dataset name, per-sample input path?)."""
    import torch

    from recaug.ctr_models.metrics import auc
    from recaug.ctr_models.network import build_model
    from recaug.ctr_models.train import _train_epoch, predict, seed_everything

    any_data = next(iter(datasets.values()))
    train, _ = any_data.train_split(0.0, 0)
    valid = any_data.split("valid")
    runs: dict[str, list] = {p: [] for p in paths}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what train_on_data uses by default
    try:
        for r in range(repeats):  # interleaved: a busy spell on the machine hits both models
            for label, (adaptor, which, per_sample) in paths.items():
                data = datasets[which]
                seed_everything(0)
                model = build_model("deepfm", data.spec, cfg.model_copy(update={"adaptor": adaptor}), seed=0)
                params = sum(p.numel() for p in model.parameters())
                opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
                epoch = _per_sample_epoch if per_sample else _train_epoch
                with Timer() as t_train:
                    epoch(model, data, train, opt, cfg.batch_size, torch.Generator().manual_seed(0))
                with Timer() as t_pred:
                    preds = _per_sample_predict(model, data, valid) if per_sample else predict(model, data, valid)
                valid_auc = auc(valid.labels.numpy(), preds)
                runs[label].append({"train_s": t_train.wall, "train_cpu_s": t_train.cpu, "predict_s": t_pred.wall,
                                    "params": params, "valid_auc": valid_auc})
                log(f"[{r + 1}/{repeats}] DeepFM {label:<40} train {len(train) / t_train.wall:9,.0f} samples/s "
                    f"({len(train) / t_train.cpu:9,.0f} per CPU-s)  predict {len(valid) / t_pred.wall:9,.0f} samples/s  "
                    f"valid AUC {valid_auc:.4f}")
    finally:
        torch.set_num_threads(threads)
    out = {}
    for label, rs in runs.items():
        out[label] = {
            "train_samples_per_s": len(train) / min(x["train_s"] for x in rs),
            "train_samples_per_cpu_s": len(train) / min(x["train_cpu_s"] for x in rs),
            "valid_auc": rs[0]["valid_auc"],
            "predict_samples_per_s": len(valid) / min(x["predict_s"] for x in rs),
            "params": rs[0]["params"], "runs": rs, "train_rows": len(train), "valid_rows": len(valid),
        }
    return out


def run(quick: bool = False, repeats: int | None = None) -> dict:
    import polars as pl

    from recaug.pipelines import features
    from recaug.ctr_models.data import build_ctr_data
    from recaug.core.config import CTRConfig, load_config
    from recaug.pipelines.inputs import prepare_inputs
    from recaug.pipelines.snapshots import publish_snapshot

    repeats = repeats or (1 if quick else 2)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "ml100k.yaml")
    with Timer() as t_prep:
        prep = prepare_inputs(cfg)
    samples = pl.from_arrow(prep.samples)
    if quick:
        samples = samples.filter(pl.col("user_id").cast(pl.Int64, strict=False) % 5 == 0)
    log(f"ML-100K: {samples.height:,} CTR samples, {prep.users.num_rows:,} users, {prep.items.num_rows:,} items "
        f"(inputs in {t_prep.wall:.1f} s)")

    tmp = Path(tempfile.mkdtemp(prefix="recaug-bench-ctr-"))
    try:
        root = tmp / "snapshots"
        ts = samples["timestamp"]
        cutoffs = [int(ts.min()) - 1, int(ts.median())]
        ids = {"user": prep.users.column("user_id").to_pylist(), "item": prep.items.column("item_id").to_pylist()}
        for n, cutoff in enumerate(cutoffs):
            tables = {f"embeddings/{aug}": random_embeddings(ids[kind], aug, kind, seed=10 * n + k)
                      for k, (aug, kind) in enumerate(VECTORS.items())}
            publish_snapshot(root, tables, {"data_cutoff": cutoff}, keep=5)

        join_rows = []
        tiled = pl.concat([samples] * max(1, round(1_000_000 / samples.height)))
        for frame in (samples, tiled):
            best = None
            for _ in range(repeats):
                with Timer() as t:
                    joined, report = features.join_point_in_time(frame, root)
                if best is None or t.wall < best.wall:
                    best = t
            assert report["without_snapshot"] == 0 and not any(report["missing_vectors"].values()), report
            vec_bytes = sum(joined[c].to_arrow().nbytes for c in report["vector_columns"])
            join_rows.append({"samples": frame.height, "seconds": best.wall, "cpu_s": best.cpu,
                              "samples_per_s": frame.height / best.wall, "vector_gib": vec_bytes / 2**30,
                              "snapshots_used": len(report["snapshots_used"])})
            best = best.wall
            log(f"point-in-time join: {frame.height:,} samples in {best:.2f} s = {frame.height / best:,.0f} samples/s")
            del joined

        with Timer() as t_load:
            feats = features.load(root, augmenter=list(VECTORS))
        vectors = {f"{kind}:{aug}": part.select("entity_id", "vector").to_arrow()
                   for (aug, kind), part in feats.group_by(["augmenter", "entity_kind"], maintain_order=True)}
        ctr_cfg = CTRConfig(batch_size=cfg.ctr.batch_size, embedding_dim=cfg.ctr.embedding_dim)
        with Timer() as t_data:
            data = build_ctr_data(samples.to_arrow(), prep.users, prep.items, prep.split, vectors, ctr_cfg.history_len)
        log(f"features.load {t_load.wall:.2f} s; build_ctr_data {t_data.wall:.2f} s")
        narrow = {key: random_embeddings(ids[key.split(":")[0]], key.split(":")[1], key.split(":")[0], seed=k, dim=64)
                  .select(["entity_id", "vector"]) for k, key in enumerate(vectors)}
        data64 = build_ctr_data(samples.to_arrow(), prep.users, prep.items, prep.split, narrow, ctr_cfg.history_len)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    paths = {
        "no vectors (adaptor none)": ("none", "384", False),
        "hybrid-expert adaptor": ("hybrid", "384", False),
        "hybrid, vectors gathered per sample, no de-duplication": ("hybrid", "384", True),
        "hybrid, 64-d vectors": ("hybrid", "64", False),
    }
    models = _train_epochs({"384": data, "64": data64}, ctr_cfg, paths, repeats)
    base, kar = models["no vectors (adaptor none)"], models["hybrid-expert adaptor"]
    prev, kar64 = models["hybrid, vectors gathered per sample, no de-duplication"], models["hybrid, 64-d vectors"]
    ratio_train = kar["train_samples_per_s"] / base["train_samples_per_s"]
    ratio_pred = kar["predict_samples_per_s"] / base["predict_samples_per_s"]
    ratio_cpu = kar["train_samples_per_cpu_s"] / base["train_samples_per_cpu_s"]
    ratio_prev = prev["train_samples_per_s"] / base["train_samples_per_s"]
    ratio_64 = kar64["train_samples_per_s"] / base["train_samples_per_s"]

    t1 = table(
        "Point-in-time feature join (recaug.features.join_point_in_time, 2 snapshots x 2 augmenters, 384-d)",
        ["samples", "wall s", "CPU s", "samples/s", "joined vectors GiB"],
        [[r["samples"], r["seconds"], r["cpu_s"], r["samples_per_s"], r["vector_gib"]] for r in join_rows],
        notes=[f"features.load of one snapshot ({feats.height:,} vectors): {t_load.wall:.2f} s; "
               f"build_ctr_data over {samples.height:,} samples: {t_data.wall:.2f} s"],
    )
    t2 = table(
        f"DeepFM on ML-100K, one training epoch (batch {ctr_cfg.batch_size}, 2 torch threads, best of {repeats})",
        ["model", "parameters", "train samples/s", "train samples/CPU-s", "vs no vectors", "predict samples/s",
         "valid AUC"],
        [[label, m["params"], m["train_samples_per_s"], m["train_samples_per_cpu_s"],
          m["train_samples_per_s"] / base["train_samples_per_s"], m["predict_samples_per_s"], m["valid_auc"]]
         for label, m in models.items()],
        notes=["vectors: random unit vectors for every user and item (throughput does not depend on their content; "
               "they carry no signal, so AUC compares the input paths, not the value of knowledge)",
               "the adaptor runs once per distinct user/item of a batch; its floor is the FLOPs of d x 128 first "
               "layers for (shared + dedicated) experts over those rows, which 384-d vectors make larger than a "
               "whole plain DeepFM step"],
    )
    summary = [
        f"point-in-time join: {join_rows[-1]['samples_per_s']:,.0f} samples/s at {join_rows[-1]['samples']:,} samples",
        f"DeepFM with the hybrid-expert adaptor trains at {ratio_train:.2f}x the samples/s of plain DeepFM "
        f"({kar['train_samples_per_s']:,.0f} vs {base['train_samples_per_s']:,.0f}; {ratio_cpu:.2f}x per CPU-second); "
        f"scoring at {ratio_pred:.2f}x; vectors gathered per sample: {ratio_prev:.2f}x; "
        f"with 64-d vectors: {ratio_64:.2f}x",
        f"validation AUC after one epoch: indexed {kar['valid_auc']:.4f} vs per-sample {prev['valid_auc']:.4f} "
        f"(same seed and batches; no vectors: {base['valid_auc']:.4f}; 64-d: {kar64['valid_auc']:.4f})",
    ]
    data_out = {"join": join_rows, "models": models, "ratio_train_adaptor_vs_none": ratio_train,
                "ratio_train_cpu_adaptor_vs_none": ratio_cpu, "ratio_train_per_sample_path_vs_none": ratio_prev,
                "ratio_train_adaptor_64d_vs_none": ratio_64,
                "ratio_predict_adaptor_vs_none": ratio_pred, "samples": samples.height, "vectors": "random 384-d",
                "build_ctr_data_s": t_data.wall, "features_load_s": t_load.wall}
    return result(NAME, "CTR: feature join and DeepFM training throughput", [t1, t2], summary, data_out)


def _args(ap):
    ap.add_argument("--repeats", type=int, default=None, help="interleaved runs per path (default 2; --quick 1)")


def main(argv: list[str] | None = None) -> int:
    return standalone(run, argv, _args, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
