"""Click-prediction metrics: AUC, LogLoss and GAUC (per-user AUC weighted by the user's samples)."""

from __future__ import annotations

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

LOGLOSS_EPS = 1e-7


def auc(labels: np.ndarray, preds: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        raise ValueError("AUC needs both positive and negative labels; this split has only one class")
    return float(roc_auc_score(labels, preds))


def logloss(labels: np.ndarray, preds: np.ndarray) -> float:
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(preds, dtype=np.float64), LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def gauc(users: np.ndarray, labels: np.ndarray, preds: np.ndarray) -> tuple[float, int]:
    """(GAUC, users counted). Users whose samples are all one class have no AUC and are skipped.

    Per-user AUC by the rank-sum formula with average ranks for ties (equal to roc_auc_score),
    weighted by the user's sample count.
    """
    df = pl.DataFrame({"u": np.asarray(users), "y": np.asarray(labels, dtype=np.float64), "p": np.asarray(preds, dtype=np.float64)})
    per_user = (
        df.with_columns(pl.col("p").rank("average").over("u").alias("r"))
        .group_by("u")
        .agg(
            pl.len().alias("n"),
            pl.col("y").sum().alias("pos"),
            (pl.col("r") * pl.col("y")).sum().alias("rank_sum"),
        )
        .with_columns((pl.col("n") - pl.col("pos")).alias("neg"))
        .filter((pl.col("pos") > 0) & (pl.col("neg") > 0))
    )
    if per_user.height == 0:
        return float("nan"), 0
    user_auc = (pl.col("rank_sum") - pl.col("pos") * (pl.col("pos") + 1) / 2) / (pl.col("pos") * pl.col("neg"))
    value = per_user.select((user_auc * pl.col("n")).sum() / pl.col("n").sum()).item()
    return float(value), per_user.height
