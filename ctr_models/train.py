"""The one training loop for every backbone: validation-only model selection, test read once.

Protocol (docs/architecture.md, "CTR side and the long-short schedule"):
  * Adam (cfg.learning_rate), binary cross-entropy summed over the batch plus deepctr's L2 terms
    (deepctr's own convention, so its per-model regularisation strengths mean what they say),
    mini-batches of cfg.batch_size in a seeded random order.
  * After every epoch: AUC on the **validation** split. The best validation AUC so far keeps its
    weights; `patience` epochs without improvement stop training; the best weights are restored.
  * Then, once, the **test** split: AUC, LogLoss, GAUC. Nothing about test feeds back into training
    or selection; `CTRData.reads` / `access_log` record that test was read exactly once, last.
  * Synthetic interactions join the *train* split only (CTRData.train_split), at
    cfg.synthetic_rate x real train rows, drawn with the seed.
  * Seeds fix python, numpy and torch RNGs; torch runs on `num_threads` threads (default 2) for
    the duration of the call.
Warm start (the short job): the previous checkpoint's vocabularies are extended by appending new
ids, embedding tables grow (old rows copied, new rows freshly initialised), every other weight is
loaded as is; the optimizer starts fresh. The loaded model's validation AUC is the bar the new
epochs must beat (best_epoch == 0 means the loaded weights were kept).
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from recaug.ctr_models.data import CTRData, FeatureSpec, SplitArrays, build_ctr_data
from recaug.ctr_models.metrics import auc, gauc, logloss
from recaug.ctr_models.network import KnowledgeCTRModel, build_model, resolve_vector_dnn_copy
from recaug.ctr_models.zoo import get_backbone
from recaug.core.config import CTRConfig
from recaug.core.errors import UsageError

CHECKPOINT_FORMAT = "recaug.ctr_checkpoint/1"
EVAL_BATCH_SIZE = 8192


class WarmStartError(UsageError, ValueError):
    """The checkpoint cannot seed this run; the message says what differs."""


@dataclass
class TrainResult:
    metrics: dict[str, float]  # test_auc, test_logloss, test_gauc, valid_auc, counts (see docs/ctr-models.md)
    best_epoch: int  # 1-based epoch whose weights were kept; 0 = the warm-start weights
    checkpoint_path: Path | None
    history_of_valid_auc: list[float]  # after epoch 1, 2, ...
    train_loss_history: list[float] = field(default_factory=list)  # mean BCE per epoch
    data_summary: dict[str, Any] = field(default_factory=dict)
    split_reads: dict[str, int] = field(default_factory=dict)  # reads of each split during this run
    seconds: float = 0.0
    # the one test read, kept for metrics by segment (cold/warm users and items, with/without a vector):
    # prediction, label and the user's and item's vocabulary index per test sample
    test_rows: dict[str, np.ndarray] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoint_name(model_name: str, cfg: CTRConfig, seed: int) -> str:
    return f"{model_name}-{cfg.adaptor}-seed{seed}.pt"


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CTR checkpoint {path} not found")
    payload = torch.load(path, map_location="cpu", weights_only=True)  # plain containers + tensors only
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise WarmStartError(f"{path} is not a recaug CTR checkpoint ({CHECKPOINT_FORMAT})")
    return payload


# what checkpoints written before a setting existed were trained with
_LEGACY_CTR_CONFIG = {"adaptor_hidden_dim": 128, "vector_dnn_copy": True}


def _checkpoint_ctr_config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    out = {**_LEGACY_CTR_CONFIG, **ckpt["ctr_config"]}
    if out["vector_dnn_copy"] is None:  # checkpoints record the layout as built; null is not one
        out["vector_dnn_copy"] = _LEGACY_CTR_CONFIG["vector_dnn_copy"]
    return out


def _check_warm_start(ckpt: Mapping[str, Any], model_name: str, cfg: CTRConfig, source: str) -> None:
    old_cfg = _checkpoint_ctr_config(ckpt)
    differences = []
    if ckpt["model_name"] != model_name:
        differences.append(f"model {ckpt['model_name']!r} vs {model_name!r}")
    for key in ("adaptor", "embedding_dim", "adaptor_shared_experts", "adaptor_dedicated_experts", "adaptor_hidden_dim"):
        if key in old_cfg and old_cfg[key] != getattr(cfg, key):
            differences.append(f"{key} {old_cfg[key]!r} vs {getattr(cfg, key)!r}")
    backbone = get_backbone(model_name)
    old_copy = resolve_vector_dnn_copy(backbone, old_cfg["vector_dnn_copy"], cfg.adaptor)
    if cfg.vector_dnn_copy is not None and old_copy != resolve_vector_dnn_copy(backbone, cfg.vector_dnn_copy, cfg.adaptor):
        differences.append(f"vector_dnn_copy {old_copy!r} vs {cfg.vector_dnn_copy!r} (null keeps the checkpoint's)")
    if differences:
        raise WarmStartError(
            f"cannot warm-start from {source}: {'; '.join(differences)}. "
            "Warm start needs the same architecture; train from scratch (no warm start) after changing it."
        )


def load_warm_weights(model: KnowledgeCTRModel, state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Load a checkpoint's weights into `model`, growing embedding tables whose vocabulary grew.

    Returns {parameter name: (old rows, new rows)} for every grown table.
    """
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise WarmStartError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "train from scratch after an architecture change"
        )
    merged, grown = {}, {}
    for key, current in own.items():
        old = state[key]
        if old.shape == current.shape:
            merged[key] = old
        elif "embedding_dict." in key and old.ndim == 2 and old.shape[1] == current.shape[1] and old.shape[0] < current.shape[0]:
            table = current.clone()  # new rows keep this model's fresh initialisation
            table[: old.shape[0]] = old
            merged[key] = table
            grown[key] = (int(old.shape[0]), int(current.shape[0]))
        else:
            raise WarmStartError(f"checkpoint weight {key} has shape {tuple(old.shape)}, the model needs {tuple(current.shape)}")
    model.load_state_dict(merged)
    return grown


def _spec_for_checkpoint(spec: FeatureSpec, model: KnowledgeCTRModel) -> dict[str, Any]:
    out = spec.to_dict()
    if not model.uses_vectors:
        out["vectors"] = []  # adaptor "none" never read them; a warm start must not require them
    return out


def load_model(path: str | Path) -> tuple[KnowledgeCTRModel, FeatureSpec, dict[str, Any]]:
    """(model with the checkpoint's weights, its feature spec, the checkpoint) for scoring.

    Score new rows by building a `CTRData` with `base_spec=spec` (same vocabularies; unseen ids
    map to new rows, which this model does not have, so keep to known ids or warm-start first).
    """
    ckpt = load_checkpoint(path)
    known = {k: v for k, v in _checkpoint_ctr_config(ckpt).items() if k in CTRConfig.model_fields}
    cfg = CTRConfig.model_validate(known)
    spec = FeatureSpec.from_dict(ckpt["feature_spec"])
    model = build_model(ckpt["model_name"], spec, cfg, seed=int(ckpt["lineage"].get("seed", 0)))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, spec, ckpt


# --- the loop ------------------------------------------------------------------------------------


def _batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    starts = list(range(0, n, batch_size))
    # a final batch of one row would break BatchNorm (DIN's Dice): fold it into the previous batch
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(s, starts[i + 1] if i + 1 < len(starts) else n) for i, s in enumerate(starts)]


def make_optimizer(model: KnowledgeCTRModel, cfg: CTRConfig, warm_start: bool = False) -> torch.optim.Optimizer:
    """Adam over every weight. The fused kernel updates all parameters in one pass instead of a dozen
    tensor-list operations per step; the adaptor adds many parameter tensors, so it pays most.
    With `adaptor_update_every` k > 1 the adaptor steps once per k batches (`_train_epoch`), so its
    learning rate is k times the backbone's: Adam moves a weight by about the learning rate per step,
    and this keeps the adaptor's distance per epoch. With the unscaled rate it learnt too little to
    beat the no-vector model on the toy world (docs/ctr-models.md).
    `warm_start`: the model starts from trained weights, and the adaptor keeps the backbone's rate.
    A fresh Adam's first steps move every weight by about the rate, and at k times the rate they threw
    a trained adaptor off: on the toy world, validation AUC fell by 0.016 after the first warm epoch
    (still 0.007 below the start after the second), where the backbone's rate gained 0.006."""
    adaptor = list(model.adaptor.parameters())
    k = cfg.adaptor_update_every
    if k <= 1 or not adaptor:
        return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, fused=True)
    backbone = list(model.backbone.parameters())
    if len(backbone) + len(adaptor) != len(list(model.parameters())):
        raise RuntimeError("the model has weights outside its backbone and adaptor; the optimizer would miss them")
    # the window size travels with the adaptor's group, so `_train_epoch` cannot step with another one
    rate = cfg.learning_rate * (1 if warm_start else k)
    groups = [{"params": backbone}, {"params": adaptor, "lr": rate, "adaptor_update_every": k}]
    return torch.optim.Adam(groups, lr=cfg.learning_rate, fused=True)


def _inputs(model: KnowledgeCTRModel, data: CTRData, ids: torch.Tensor):
    if model.uses_vectors:
        model.attach_vectors(data.vectors)  # looked up by index inside the model (once attached, free)
        return None, None
    return [], ids.new_zeros((ids.shape[0], 0), dtype=torch.float32)


def predict(model: KnowledgeCTRModel, data: CTRData, split: SplitArrays, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start, end in _batch_bounds(len(split), batch_size):
            ids = split.ids[start:end]
            vectors, missing = _inputs(model, data, ids)
            out.append(model(ids, vectors, missing))
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _train_epoch(model, data, train: SplitArrays, optimizer, batch_size: int, generator: torch.Generator) -> float:
    model.train()
    order = torch.randperm(len(train), generator=generator)
    bounds = list(_batch_bounds(len(train), batch_size))
    # windows of batches when make_optimizer gave the adaptor a group of its own (adaptor_update_every > 1)
    step = max((g.get("adaptor_update_every", 1) for g in optimizer.param_groups), default=1)
    windowed = step > 1 and model.uses_vectors
    total = 0.0
    for w in range(0, len(bounds), step):
        batches = [(train.ids[order[s:e]], train.labels[order[s:e]]) for s, e in bounds[w:w + step]]
        window = None
        if windowed:
            model.attach_vectors(data.vectors)
            window = model.adaptor_window([ids for ids, _ in batches])
        for ids, labels in batches:
            vectors, missing = (None, None) if windowed else _inputs(model, data, ids)
            probs = model(ids, vectors, missing, window)
            loss = F.binary_cross_entropy(probs, labels, reduction="sum")
            optimizer.zero_grad()
            (loss + model.regularization_loss()).backward()
            optimizer.step()  # the adaptor's weights have no gradient here: only the backbone steps
            total += float(loss.detach())
        if window is not None:
            optimizer.zero_grad()
            window.backward()
            optimizer.step()  # now only the adaptor's weights have gradients
    return total / max(len(train), 1)


def _check_labels(split: SplitArrays, name: str) -> None:
    labels = split.labels.numpy()
    if labels.size == 0 or labels.min() == labels.max():
        raise ValueError(
            f"the {name} split has {labels.size} sample(s) of a single class; AUC-based "
            f"{'model selection' if name == 'valid' else 'evaluation'} needs clicks and non-clicks"
        )


def train_on_data(
    data: CTRData,
    cfg: CTRConfig,
    model_name: str,
    seed: int,
    *,
    warm_start: str | Path | Mapping[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    lineage: Mapping[str, Any] | None = None,
    num_threads: int = 2,
) -> TrainResult:
    """Train `model_name` on prepared data (reusable across models and seeds); see the module doc."""
    started = time.perf_counter()
    reads_before = dict(data.reads)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        ckpt, source = None, None
        if warm_start is not None:
            ckpt = warm_start if isinstance(warm_start, Mapping) else load_checkpoint(warm_start)
            source = "<checkpoint>" if isinstance(warm_start, Mapping) else str(warm_start)
            _check_warm_start(ckpt, model_name, cfg, source)
            if cfg.vector_dnn_copy is None:  # continue the checkpoint's layout, whatever the backbone's default
                cfg = cfg.model_copy(update={"vector_dnn_copy": _checkpoint_ctr_config(ckpt)["vector_dnn_copy"]})

        seed_everything(seed)
        model = build_model(model_name, data.spec, cfg, seed)
        grown: dict[str, tuple[int, int]] = {}
        if ckpt is not None:
            grown = load_warm_weights(model, ckpt["state_dict"])

        train, synthetic_info = data.train_split(cfg.synthetic_rate, seed)
        valid = data.split("valid")
        _check_labels(valid, "valid")
        if len(train) == 0:
            raise ValueError("the train split is empty")

        optimizer = make_optimizer(model, cfg, warm_start=ckpt is not None)
        generator = torch.Generator().manual_seed(seed)
        best_auc, best_state, best_epoch = float("-inf"), None, 0
        metrics: dict[str, float] = {}
        if ckpt is not None:
            best_auc = auc(valid.labels.numpy(), predict(model, data, valid))
            best_state = copy.deepcopy(model.state_dict())
            metrics["warm_start_valid_auc"] = best_auc

        valid_history, loss_history, waited = [], [], 0
        for epoch in range(1, cfg.epochs + 1):
            loss_history.append(_train_epoch(model, data, train, optimizer, cfg.batch_size, generator))
            valid_auc = auc(valid.labels.numpy(), predict(model, data, valid))
            valid_history.append(valid_auc)
            if valid_auc > best_auc:
                best_auc, best_state, best_epoch, waited = valid_auc, copy.deepcopy(model.state_dict()), epoch, 0
            else:
                waited += 1
                if waited >= cfg.patience:
                    break
        if best_state is None:
            raise RuntimeError(f"{model_name}: validation AUC was never a number ({valid_history}); training diverged")
        model.load_state_dict(best_state)

        # the single read of the test split
        test = data.split("test")
        _check_labels(test, "test")
        test_pred = predict(model, data, test)
        test_labels = test.labels.numpy()
        test_gauc, gauc_users = gauc(test.user_ids, test_labels, test_pred)
        id_cols = data.spec.id_columns()
        test_rows = {"pred": test_pred, "label": test_labels,
                     "user_index": test.ids[:, id_cols["user_id"][0]].numpy(),
                     "item_index": test.ids[:, id_cols["item_id"][0]].numpy()}
        metrics.update(
            {
                "test_auc": auc(test_labels, test_pred),
                "test_logloss": logloss(test_labels, test_pred),
                "test_gauc": test_gauc,
                "test_gauc_users": gauc_users,
                "valid_auc": best_auc,
                "n_train": len(train),
                "n_train_synthetic": int(train.synthetic.sum()),
                "n_valid": len(valid),
                "n_test": len(test),
                "epochs_run": len(valid_history),
            }
        )

        summary = dict(data.summary)
        summary["synthetic"] = synthetic_info
        summary["vector_routes"] = model.vector_routes
        has_weights = any(True for _ in model.adaptor.parameters())  # "raw" passes the vectors through
        summary["adaptor_learning_rate"] = optimizer.param_groups[-1]["lr"] if has_weights else None
        if grown:
            summary["warm_start_grown_tables"] = {k: list(v) for k, v in grown.items()}

        checkpoint_path = None
        if checkpoint_dir is not None:
            payload_lineage = {**dict(lineage or {}), "seed": seed}
            if source is not None:
                payload_lineage.setdefault("warm_start_from", source)
            checkpoint_path = save_checkpoint(
                Path(checkpoint_dir) / checkpoint_name(model_name, cfg, seed),
                {
                    "format": CHECKPOINT_FORMAT,
                    "model_name": model_name,
                    "adaptor": cfg.adaptor,
                    # the layout as built, so loading never depends on a backbone's default of the day
                    "ctr_config": cfg.model_copy(update={"vector_dnn_copy": model.vector_dnn_copy}).model_dump(mode="json"),
                    "feature_spec": _spec_for_checkpoint(data.spec, model),
                    "state_dict": model.state_dict(),
                    "lineage": payload_lineage,
                    "best_epoch": best_epoch,
                    "metrics": {k: float(v) for k, v in metrics.items()},
                    "history_of_valid_auc": valid_history,
                },
            )
        return TrainResult(
            metrics=metrics,
            best_epoch=best_epoch,
            checkpoint_path=checkpoint_path,
            history_of_valid_auc=valid_history,
            train_loss_history=loss_history,
            data_summary=summary,
            split_reads={k: data.reads[k] - reads_before.get(k, 0) for k in data.reads},
            seconds=time.perf_counter() - started,
            test_rows=test_rows,
        )
    finally:
        torch.set_num_threads(threads_before)


def train_ctr(
    samples: pa.Table,
    users: pa.Table,
    items: pa.Table,
    history: pa.Table | None,
    vectors: Mapping[str, pa.Table] | None,
    cfg: CTRConfig,
    model_name: str,
    seed: int,
    warm_start: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    *,
    synthetic: pa.Table | None = None,
    lineage: Mapping[str, Any] | None = None,
    num_threads: int = 2,
) -> TrainResult:
    """Build the dataset from the tables and train one backbone with one seed.

    samples: CTR_SAMPLES; users/items: clean USERS/ITEMS; history: SPLIT_INTERACTIONS (prompt rows
    are used); vectors: {"user:<name>" | "item:<name>": embedding table} (ignored when
    cfg.adaptor == "none"); synthetic: SYNTHETIC_INTERACTIONS for the train split;
    lineage: fields stored in the checkpoint (snapshot id, config hash, ...; the seed is added).
    To train several backbones/seeds on the same tables, call `build_ctr_data` once and
    `train_on_data` per run instead.
    """
    ckpt = load_checkpoint(warm_start) if warm_start is not None else None
    if ckpt is not None:
        _check_warm_start(ckpt, model_name, cfg, str(warm_start))
    use_vectors = dict(vectors or {}) if cfg.adaptor != "none" else {}
    data = build_ctr_data(
        samples,
        users,
        items,
        history,
        use_vectors,
        cfg.history_len,
        synthetic=synthetic,
        base_spec=FeatureSpec.from_dict(ckpt["feature_spec"]) if ckpt is not None else None,
    )
    if vectors and not use_vectors:
        data.summary["vectors_ignored"] = sorted(vectors)  # adaptor "none": the baseline
    result = train_on_data(
        data,
        cfg,
        model_name,
        seed,
        warm_start=ckpt,
        checkpoint_dir=checkpoint_dir,
        lineage={**dict(lineage or {}), **({"warm_start_from": str(warm_start)} if warm_start is not None else {})},
        num_threads=num_threads,
    )
    return result
