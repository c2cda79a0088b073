"""Feature join and CTR training throughput on MovieLens-100K (the packaged recbole copy).

Vectors: random unit vectors of 384 dimensions (all-MiniLM-L6-v2's width) for every user and item,
published as two real snapshots (`kar_user_preference`, `kar_item_knowledge`; one cut off before
every sample, one at the samples' median time), so the join does the real point-in-time work while
the figures do not depend on a long LLM run. Throughput does not depend on what the vectors say.

  join        recaug.features.join_point_in_time over every CTR sample (and the samples tiled to
              ~1M rows): each sample gets the vectors of the newest snapshot cut off before it
  dataset     build_ctr_data: vocabularies, side features, DIN history, per-entity vectors
  train       one epoch of DeepFM, the same seed and batches, without vectors (adaptor "none") and with
              the KAR hybrid-expert adaptor over both vectors: the adaptor code before the December 2026
              speed work (kept below as _PreviousHybridAdaptor, with the per-tensor Adam of that time),
              the current code stepping the adaptor every batch and every 16 batches (the default,
              ctr.adaptor_update_every) at KAR's hidden width 128, at 32, the same vectors
              gathered per sample (no de-duplication), the default with each adaptor output also fed to
              the DNN (`ctr.vector_dnn_copy: true`, DeepFM's layout before 7 December 2026), and the
              vectors reduced to 64-d by PCA fitted on them once before training (what
              `encoder.pca_dim: 64` gives). Vectors are looked up by
              index from tables inside the model; the adaptor runs once per distinct user/item of a
              batch. A last row feeds 32-d vectors straight to the backbone (adaptor "raw"): what the
              backbone's knowledge inputs cost with no adaptor at all. Each of --repeats runs trains
              every model one untimed epoch, then 3 rounds of one timed epoch per model; a path's
              speed is its median epoch, its ratio to plain DeepFM the median of same-round ratios.
              Validation AUC after the first epoch, side by side.
  predict     scoring the validation split with each model
  toy AUC     the AUC question where vectors carry signal: the toy world (recaug.ctr_models.toy, 384-d
              vectors that partly reveal hidden tastes), DeepFM trained up to 12 epochs (patience 3,
              validation-selected) per seed: hidden width 128 vs 32, 384-d vs PCA-64, and no vectors
  warm start  the daily retrain: from each seed's default toy model, 4 more epochs with the adaptor at the
              backbone's rate (what a warm start takes) and at the windowed schedule's scaled rate

    .venv/bin/python bench/bench_ctr.py [--repeats 2] [--toy-seeds 3] [--quick]
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


def _previous_hybrid_class():
    """The hybrid adaptor's forward before the December 2026 speed work (same weights, same function):
    fused first layer, batched second layer, experts mixed by einsum("nk,kno->no")."""
    import torch
    import torch.nn.functional as F

    from recaug.ctr_models.adaptor import HybridExpertAdaptor

    class _PreviousHybridAdaptor(HybridExpertAdaptor):
        def forward(self, vectors):
            self._check(vectors)
            experts_of = [list(self.shared) + list(own) for own in self.dedicated]
            outputs = []
            for t, x in enumerate(vectors):
                experts = experts_of[t]
                k = len(experts)
                w1 = torch.cat([e[0].weight for e in experts] + [self.gates[t].weight])
                b1 = torch.cat([e[0].bias for e in experts] + [self.gates[t].bias])
                first = torch.addmm(b1, x, w1.t())
                hidden_width = experts[0][0].out_features
                hidden = torch.relu(first[:, : k * hidden_width]).reshape(-1, k, hidden_width).transpose(0, 1)
                hidden = F.dropout(hidden, experts[0][2].p, self.training)
                w2 = torch.stack([e[3].weight.t() for e in experts])
                b2 = torch.stack([e[3].bias for e in experts]).unsqueeze(1)
                out = F.dropout(torch.relu(torch.baddbmm(b2, hidden, w2)), experts[0][5].p, self.training)
                gate = torch.softmax(first[:, k * hidden_width :], dim=-1)
                outputs.append(torch.einsum("nk,kno->no", gate, out))
            return outputs

    return _PreviousHybridAdaptor


def pca_vectors(vectors: dict, dim: int) -> dict:
    """The same vector tables reduced by a PCA fitted on each table once (encoders/pca.py, as
    `encoder.pca_dim` does when the tables are built)."""
    import pyarrow as pa

    from recaug.encoders.pca import fit_pca
    from recaug.schemas.vectors import fixed_size_vectors, vectors_numpy

    out = {}
    for key, table in vectors.items():
        x = vectors_numpy(table)
        reduced = fit_pca(x, dim, renormalize=True, label=key).apply(x)
        out[key] = pa.table({"entity_id": table.column("entity_id"), "vector": fixed_size_vectors(reduced)})
    return out


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


def _train_epochs(datasets, cfg, paths, repeats: int, base: str, epochs: int = 3) -> dict[str, dict]:
    """paths: label -> (adaptor kind, dataset name, hidden width, variant, adaptor_update_every);
    variant is "" (the training path), "per-sample" (vectors gathered per sample and passed in),
    "dnn-copy" (the adaptor outputs also fed to the DNN: ctr.vector_dnn_copy true) or "previous" (the
    adaptor, optimizer and DNN inputs before the speed work). Each run builds every path's model and
    trains one untimed epoch of each (validation AUC and prediction speed after it), then `epochs`
    timed rounds of one epoch per path, the order reversed every other round. A path's speed is its
    median epoch; its ratio to `base` is the median over rounds of the two epochs' ratio within a round,
    so a busy spell on the machine meets both sides of a ratio (with one run of 3 epochs per path after
    another, single ratios ranged from 0.58x to 0.76x between bench runs)."""
    import statistics

    import torch

    from recaug.ctr_models.metrics import auc
    from recaug.ctr_models.network import build_model
    from recaug.ctr_models.train import _train_epoch, make_optimizer, predict, seed_everything

    previous_cls = _previous_hybrid_class()
    any_data = next(iter(datasets.values()))
    train, _ = any_data.train_split(0.0, 0)
    valid = any_data.split("valid")
    runs: dict[str, list] = {p: [] for p in paths}
    first: dict[str, dict] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what train_on_data uses by default
    try:
        for r in range(repeats):
            live = {}
            for label, (adaptor, which, hidden, variant, every) in paths.items():
                data = datasets[which]
                seed_everything(0)
                # the layout before: each adaptor output also entered DeepFM's DNN as a dense input; raw
                # in the default adaptor's layout, as the ceiling of the default
                copy = True if variant in ("previous", "dnn-copy") else (False if adaptor == "raw" else None)
                run_cfg = cfg.model_copy(update={"adaptor": adaptor, "adaptor_hidden_dim": hidden,
                                                 "adaptor_update_every": every, "vector_dnn_copy": copy})
                model = build_model("deepfm", data.spec, run_cfg, seed=0)
                if variant == "previous":
                    model.adaptor.__class__ = previous_cls
                    model.route_inputs = False  # nor were the adaptor outputs routed then
                    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)  # per-tensor (foreach) Adam
                else:
                    opt = make_optimizer(model, run_cfg)
                per_sample = variant == "per-sample"
                generator = torch.Generator().manual_seed(0)

                def epoch(model=model, data=data, opt=opt, generator=generator, per_sample=per_sample):
                    if per_sample:
                        _per_sample_epoch(model, data, train, opt, cfg.batch_size, generator)
                    else:
                        _train_epoch(model, data, train, opt, cfg.batch_size, generator)

                epoch()  # untimed: first-use costs (allocations, kernel set-up) stay out of the ratios
                with Timer() as t_pred:
                    preds = _per_sample_predict(model, data, valid) if per_sample else predict(model, data, valid)
                row = first.setdefault(label, {"params": sum(p.numel() for p in model.parameters()),
                                               "valid_auc": auc(valid.labels.numpy(), preds), "predict_s": []})
                row["predict_s"].append(t_pred.wall)
                live[label] = epoch
            order = list(paths)
            for e in range(epochs):
                for label in (order if e % 2 == 0 else order[::-1]):
                    with Timer() as t_train:
                        live[label]()
                    runs[label].append({"train_s": t_train.wall, "train_cpu_s": t_train.cpu, "run": r, "round": e})
            for label in paths:
                mine = runs[label][-epochs:]
                speeds = ", ".join(f"{len(train) / x['train_cpu_s']:,.0f}" for x in mine)
                log(f"[{r + 1}/{repeats}] DeepFM {label:<44} train {speeds} samples per CPU-s (rounds 1-{epochs})  "
                    f"valid AUC after epoch 1 {first[label]['valid_auc']:.4f}")
    finally:
        torch.set_num_threads(threads)
    out = {}
    for label, rs in runs.items():
        paired = list(zip(runs[base], rs, strict=True))  # the same run and round
        out[label] = {
            "train_samples_per_s": len(train) / statistics.median(x["train_s"] for x in rs),
            "train_samples_per_cpu_s": len(train) / statistics.median(x["train_cpu_s"] for x in rs),
            "ratio_wall": statistics.median(b["train_s"] / x["train_s"] for b, x in paired),
            "ratio_cpu": statistics.median(b["train_cpu_s"] / x["train_cpu_s"] for b, x in paired),
            "ratio_cpu_range": [min(b["train_cpu_s"] / x["train_cpu_s"] for b, x in paired),
                                max(b["train_cpu_s"] / x["train_cpu_s"] for b, x in paired)],
            "valid_auc": first[label]["valid_auc"],
            "predict_samples_per_s": len(valid) / min(first[label]["predict_s"]),
            "params": first[label]["params"], "runs": rs, "train_rows": len(train), "valid_rows": len(valid),
            "epochs_timed": len(rs),
        }
    return out


def _toy_auc(seeds: int, quick: bool) -> tuple[dict[str, dict], dict[str, list[list[float]]]]:
    """Validation and test AUC on the toy world, whose 384-d vectors carry signal, per configuration
    and seed (train_on_data: epochs with validation-based selection, test read once)."""
    import numpy as np

    from recaug.ctr_models.data import build_ctr_data
    from recaug.ctr_models.toy import make_toy_world
    from recaug.ctr_models.train import train_on_data
    from recaug.core.config import CTRConfig

    world = make_toy_world(n_users=150 if quick else 300, vector_dim=DIM, n_synthetic=0, seed=0)
    full = build_ctr_data(world.samples, world.users, world.items, world.split, world.vectors, history_len=10)
    pca = build_ctr_data(world.samples, world.users, world.items, world.split, pca_vectors(world.vectors, 64),
                         history_len=10)
    every = CTRConfig().adaptor_update_every
    configs = {"no vectors": ("none", full, 128, every, None),
               f"384-d, hidden 128, adaptor steps every {every} batches (default)": ("hybrid", full, 128, every, None),
               "384-d, hidden 128, outputs also as DNN inputs (layout before)": ("hybrid", full, 128, every, True),
               "384-d, hidden 128, adaptor steps every batch": ("hybrid", full, 128, 1, None),
               "384-d, hidden 32": ("hybrid", full, 32, every, None),
               "PCA-64, hidden 128": ("hybrid", pca, 128, every, None)}
    out = {}
    default_label = f"384-d, hidden 128, adaptor steps every {every} batches (default)"
    checkpoints: list[Path] = []
    ckpt_dir = Path(tempfile.mkdtemp(prefix="recaug-bench-toy-"))
    for label, (adaptor, data, hidden, k, dnn_copy) in configs.items():
        # trained to convergence: with 5 epochs and patience 1 the widths looked equal (docs/ctr-models.md)
        cfg = CTRConfig(adaptor=adaptor, adaptor_hidden_dim=hidden, epochs=12, patience=3, batch_size=256,
                        history_len=10, adaptor_update_every=k, vector_dnn_copy=dnn_copy)
        runs = [train_on_data(data, cfg, "deepfm", seed=s, num_threads=2,
                              checkpoint_dir=ckpt_dir if label == default_label else None) for s in range(seeds)]
        if label == default_label:
            checkpoints = [r.checkpoint_path for r in runs]
        rs = [r.metrics for r in runs]
        valid, test = np.array([m["valid_auc"] for m in rs]), np.array([m["test_auc"] for m in rs])
        out[label] = {"valid_auc": valid.tolist(), "test_auc": test.tolist(), "valid_mean": float(valid.mean()),
                      "valid_std": float(valid.std(ddof=1)) if seeds > 1 else 0.0, "test_mean": float(test.mean()),
                      "test_std": float(test.std(ddof=1)) if seeds > 1 else 0.0}
        log(f"toy world, {label}: valid AUC {valid.mean():.4f} +- {out[label]['valid_std']:.4f}, "
            f"test {test.mean():.4f} ({seeds} seeds)")
    try:
        warm = _toy_warm_start(full, checkpoints, every)
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return out, warm


def _toy_warm_start(data, checkpoints: list[Path], every: int, epochs: int = 4) -> dict[str, list[list[float]]]:
    """The daily warm start: from each seed's default model, `epochs` more epochs on the same data with
    the adaptor at the backbone's rate (what train_on_data does from a checkpoint) and at `every` times
    it (what it does from scratch). Per rate and seed: validation AUC after each epoch minus the warm
    start's own."""
    import torch

    from recaug.ctr_models.metrics import auc
    from recaug.ctr_models.network import build_model
    from recaug.ctr_models.train import _train_epoch, load_checkpoint, load_warm_weights, make_optimizer, predict
    from recaug.ctr_models.train import seed_everything
    from recaug.core.config import CTRConfig

    valid = data.split("valid")
    out: dict[str, list[list[float]]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for label, scaled in (("the backbone's (what a warm start now takes)", False),
                              (f"{every}x the backbone's (from scratch; warm starts before)", True)):
            for seed, path in enumerate(checkpoints):
                ckpt = load_checkpoint(path)
                cfg = CTRConfig(**{**ckpt["ctr_config"], "epochs": epochs})
                seed_everything(seed + 100)
                model = build_model("deepfm", data.spec, cfg, seed=seed + 100)
                load_warm_weights(model, ckpt["state_dict"])
                start = auc(valid.labels.numpy(), predict(model, data, valid))
                opt = make_optimizer(model, cfg, warm_start=not scaled)
                train, _ = data.train_split(0.0, seed + 100)
                generator = torch.Generator().manual_seed(seed + 100)
                deltas = []
                for _ in range(epochs):
                    _train_epoch(model, data, train, opt, cfg.batch_size, generator)
                    deltas.append(auc(valid.labels.numpy(), predict(model, data, valid)) - start)
                out.setdefault(label, []).append(deltas)
            mean = [sum(d[e] for d in out[label]) / len(out[label]) for e in range(epochs)]
            log(f"toy world, warm start, adaptor rate {label}: valid AUC minus the warm start's after epochs 1-{epochs}: "
                + ", ".join(f"{m:+.4f}" for m in mean))
    finally:
        torch.set_num_threads(threads)
    return out


def run(quick: bool = False, repeats: int | None = None, toy_seeds: int | None = None) -> dict:
    import polars as pl

    from recaug.pipelines import features
    from recaug.ctr_models.data import build_ctr_data
    from recaug.core.config import CTRConfig, load_config
    from recaug.pipelines.inputs import prepare_inputs
    from recaug.pipelines.snapshots import publish_snapshot

    repeats = repeats or (1 if quick else 2)
    toy_seeds = toy_seeds or (2 if quick else 3)
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
        data64 = build_ctr_data(samples.to_arrow(), prep.users, prep.items, prep.split, pca_vectors(vectors, 64),
                                ctr_cfg.history_len)
        data32 = build_ctr_data(samples.to_arrow(), prep.users, prep.items, prep.split, pca_vectors(vectors, 32),
                                ctr_cfg.history_len)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    every = CTRConfig().adaptor_update_every
    base_label, prev_label = "no vectors (adaptor none)", "hybrid 384-d, hidden 128, code before"
    kar_label = f"hybrid 384-d, hidden 128, adaptor steps every {every} batches (default)"
    every1_label, kar32_label = "hybrid 384-d, hidden 128, adaptor steps every batch", "hybrid 384-d, hidden 32"
    per_sample_label, pca128_label = "hybrid 384-d, hidden 128, gathered per sample", "hybrid PCA-64, hidden 128"
    pca_label = "hybrid PCA-64, hidden 32"
    copy_label = f"hybrid 384-d, hidden 128, every {every} batches, outputs also as DNN inputs (layout before)"
    free_label = "adaptor raw over PCA-32 (no adaptor cost; the backbone's knowledge inputs alone)"
    paths = {
        base_label: ("none", "384", 128, "", 1),
        prev_label: ("hybrid", "384", 128, "previous", 1),
        every1_label: ("hybrid", "384", 128, "", 1),
        kar_label: ("hybrid", "384", 128, "", every),
        copy_label: ("hybrid", "384", 128, "dnn-copy", every),
        kar32_label: ("hybrid", "384", 32, "", every),
        per_sample_label: ("hybrid", "384", 128, "per-sample", 1),
        pca128_label: ("hybrid", "64", 128, "", every),
        pca_label: ("hybrid", "64", 32, "", every),
        free_label: ("raw", "32", 128, "", 1),
    }
    models = _train_epochs({"384": data, "64": data64, "32": data32}, ctr_cfg, paths, repeats, base_label)
    toy, warm = _toy_auc(toy_seeds, quick)
    base = models[base_label]
    for m in models.values():
        m["ratio_predict"] = m["predict_samples_per_s"] / base["predict_samples_per_s"]
    kar, prev, pca = models[kar_label], models[prev_label], models[pca_label]

    t1 = table(
        "Point-in-time feature join (recaug.features.join_point_in_time, 2 snapshots x 2 augmenters, 384-d)",
        ["samples", "wall s", "CPU s", "samples/s", "joined vectors GiB"],
        [[r["samples"], r["seconds"], r["cpu_s"], r["samples_per_s"], r["vector_gib"]] for r in join_rows],
        notes=[f"features.load of one snapshot ({feats.height:,} vectors): {t_load.wall:.2f} s; "
               f"build_ctr_data over {samples.height:,} samples: {t_data.wall:.2f} s"],
    )
    t2 = table(
        f"DeepFM on ML-100K, training speed (batch {ctr_cfg.batch_size}, 2 torch threads; {repeats} runs x 3 "
        f"rounds of one epoch per model after an untimed one; speeds are median epochs, ratios the median of "
        f"same-round ratios; same seed and batches for every row)",
        ["model", "parameters", "train samples/s", "train samples/CPU-s", "vs no vectors (wall)",
         "vs no vectors (CPU)", "CPU ratio, lowest-highest round", "predict samples/s (best run)",
         "valid AUC after epoch 1"],
        [[label, m["params"], m["train_samples_per_s"], m["train_samples_per_cpu_s"], m["ratio_wall"], m["ratio_cpu"],
          "{:.2f}-{:.2f}".format(*m["ratio_cpu_range"]), m["predict_samples_per_s"], f"{m['valid_auc']:.4f}"]
         for label, m in models.items()],
        notes=["vectors: random unit vectors for every user and item (throughput does not depend on their content; "
               "they carry no signal beyond identifying the entity, so this AUC compares code paths and widths, "
               "not the value of knowledge: see the toy-world table for that)",
               "PCA-64: a PCA fitted once on each 384-d table before training (encoders/pca.py, what "
               "encoder.pca_dim: 64 gives); the adaptor then trains on 64-d inputs",
               "code before: the adaptor forward, per-tensor Adam, adaptor outputs read as slices of X and also "
               "fed to the DNN as dense inputs, as before the December 2026 speed work (the rest, e.g. the "
               "knowledge fields, is today's code); its ratio is against today's plain DeepFM loop (fused Adam)",
               "outputs also as DNN inputs: ctr.vector_dnn_copy true, DeepFM's layout before 7 December 2026 (each "
               "32-d adaptor output entered the DNN as well as its FM field, which reaches the DNN anyway)",
               "adaptor raw over PCA-32: the vectors enter DeepFM as the hybrid adaptor's 32-d outputs would "
               "(linear inputs, FM fields; ctr.vector_dnn_copy false, the default adaptor's layout), with "
               "nothing computed before them: the ceiling of the default adaptor",
               f"adaptor steps every {every} batches (ctr.adaptor_update_every, the default): the adaptor runs once "
               f"over the distinct users and items of {every} batches and steps once on their summed gradient at "
               f"{every}x the learning rate; the backbone steps every batch. Code before, per sample and every "
               "batch step the adaptor with every batch"],
    )
    t3 = table(
        f"Same AUC? Toy world with 384-d vectors that carry signal (recaug.ctr_models.toy), DeepFM, up to 12 epochs "
        f"(patience 3) with validation-based selection, {toy_seeds} seeds",
        ["configuration", "valid AUC mean", "valid AUC sd", "test AUC mean", "test AUC sd", "valid AUC per seed"],
        [[label, f"{t['valid_mean']:.4f}", f"{t['valid_std']:.4f}", f"{t['test_mean']:.4f}", f"{t['test_std']:.4f}",
          " ".join(f"{v:.4f}" for v in t["valid_auc"])] for label, t in toy.items()],
    )
    warm_epochs = len(next(iter(warm.values()))[0]) if warm else 0
    warm_means = {label: [sum(d[e] for d in runs) / len(runs) for e in range(warm_epochs)] for label, runs in warm.items()}
    t4 = table(
        f"Warm start (the daily CTR retrain): from each seed's default toy-world model above, {warm_epochs} more "
        f"epochs on the same data; validation AUC minus the warm start's, mean (lowest) over {toy_seeds} seeds",
        ["adaptor learning rate"] + [f"after epoch {e + 1}" for e in range(warm_epochs)],
        [[label] + [f"{warm_means[label][e]:+.4f} ({min(d[e] for d in runs):+.4f})" for e in range(warm_epochs)]
         for label, runs in warm.items()],
        notes=["a fresh Adam's first steps move every weight by about its rate, whatever its gradient: at the "
               "windowed schedule's scaled rate they throw a trained adaptor off (ctr_models/train.py, make_optimizer)"],
    )
    summary = [
        f"point-in-time join: {join_rows[-1]['samples_per_s']:,.0f} samples/s at {join_rows[-1]['samples']:,} samples",
        f"DeepFM + hybrid adaptor vs plain DeepFM, train samples per CPU-second (per wall second): "
        f"384-d hidden 128, adaptor steps every {every} batches (default) {kar['ratio_cpu']:.2f}x "
        f"({kar['ratio_wall']:.2f}x), with the outputs also as DNN inputs (layout before) "
        f"{models[copy_label]['ratio_cpu']:.2f}x ({models[copy_label]['ratio_wall']:.2f}x), every batch {models[every1_label]['ratio_cpu']:.2f}x "
        f"({models[every1_label]['ratio_wall']:.2f}x), code before "
        f"{prev['ratio_cpu']:.2f}x ({prev['ratio_wall']:.2f}x); 384-d hidden 32 {models[kar32_label]['ratio_cpu']:.2f}x; "
        f"PCA-64 hidden 128 {models[pca128_label]['ratio_cpu']:.2f}x; PCA-64 hidden 32 {pca['ratio_cpu']:.2f}x "
        f"({pca['ratio_wall']:.2f}x); per-sample {models[per_sample_label]['ratio_cpu']:.2f}x; the backbone's "
        f"knowledge inputs alone (32-d, no adaptor) {models[free_label]['ratio_cpu']:.2f}x",
        "validation AUC after one epoch, same seed and batches: " + "; ".join(
            f"{label} {m['valid_auc']:.4f}" for label, m in models.items()),
        "toy world (vectors with signal), valid AUC over seeds: " + "; ".join(
            f"{label} {t['valid_mean']:.4f} +- {t['valid_std']:.4f}" for label, t in toy.items()),
        "warm start, valid AUC change after epochs 1-{}: ".format(warm_epochs) + "; ".join(
            f"{label} " + ", ".join(f"{m:+.4f}" for m in means) for label, means in warm_means.items()),
    ]
    data_out = {"join": join_rows, "models": models, "toy_auc": toy, "toy_warm_start_valid_auc_change": warm,
                "ratio_train_adaptor_vs_none": kar["ratio_wall"], "ratio_train_cpu_adaptor_vs_none": kar["ratio_cpu"],
                "ratio_train_cpu_pca64_vs_none": pca["ratio_cpu"], "ratio_train_pca64_vs_none": pca["ratio_wall"],
                "ratio_train_cpu_previous_vs_none": prev["ratio_cpu"],
                "ratio_train_cpu_every_batch_vs_none": models[every1_label]["ratio_cpu"],
                "ratio_predict_adaptor_vs_none": kar["ratio_predict"], "samples": samples.height,
                "vectors": "random 384-d", "build_ctr_data_s": t_data.wall, "features_load_s": t_load.wall}
    return result(NAME, "CTR: feature join and DeepFM training throughput", [t1, t2, t3, t4], summary, data_out)


def _args(ap):
    ap.add_argument("--repeats", type=int, default=None, help="interleaved runs per path (default 2; --quick 1)")
    ap.add_argument("--toy-seeds", type=int, default=None, help="seeds per toy-world configuration (default 3; --quick 2)")


def main(argv: list[str] | None = None) -> int:
    return standalone(run, argv, _args, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
