"""Leakage-free splits (KAR protocol; docs/architecture.md, "Splits and leakage").

Per user, the oldest part of the history (``prompt_share`` of it, at most ``prompt_cap`` rows) is
prompt context only: the LLM sees it, the CTR model never trains or evaluates on it. Every later
interaction is a CTR sample; those are split by *global* time quantiles into train / valid / test so
that validation and test are always in the future of training.

`split.mode: by_row_order` is for data without timestamps: the loader numbers the interactions in
file order (that number is their `timestamp`), and each user's CTR samples are split on their own:
the last `test_share` of them (at least one) are test, the `valid_share` before those (at least one)
valid, the rest train. Only users with at least 3 CTR samples get valid/test rows, so every evaluated
user also has training rows; users with fewer train only.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from recaug.core.config import SplitConfig
from recaug.schemas import CTR_SAMPLES, SPLIT_INTERACTIONS, conform


@dataclass(frozen=True)
class SplitBoundaries:
    valid_from: int  # first timestamp that belongs to validation
    test_from: int  # first timestamp that belongs to test


def _order(df: pl.DataFrame) -> pl.DataFrame:
    # item_id breaks timestamp ties so the order (and so the split) is deterministic
    return df.sort(["user_id", "timestamp", "item_id"])


def split_interactions(interactions: pa.Table, cfg: SplitConfig) -> tuple[pa.Table, SplitBoundaries | None]:
    """Annotate every interaction with its split: prompt | train | valid | test."""
    df = _order(pl.from_arrow(interactions))
    df = df.with_columns(
        pl.int_range(pl.len()).over("user_id").alias("_rank"),
        pl.len().over("user_id").alias("_n"),
    )
    n_prompt = pl.min_horizontal((pl.col("_n") * cfg.prompt_share).floor().cast(pl.Int64), pl.lit(cfg.prompt_cap))
    df = df.with_columns((pl.col("_rank") < n_prompt).alias("_is_prompt"))

    ctr_ts = df.filter(~pl.col("_is_prompt"))["timestamp"]
    if cfg.mode == "by_row_order":
        split, bounds = _per_user_split(n_prompt, cfg), None
    elif ctr_ts.len() == 0:
        split = pl.lit("prompt")
        bounds = None
    else:
        # "lower" keeps the quantile an observed timestamp, so the boundaries are real instants
        valid_from = int(ctr_ts.quantile(1.0 - cfg.valid_share - cfg.test_share, interpolation="lower"))
        test_from = int(ctr_ts.quantile(1.0 - cfg.test_share, interpolation="lower"))
        bounds = SplitBoundaries(valid_from=valid_from, test_from=test_from)
        split = (
            pl.when(pl.col("_is_prompt"))
            .then(pl.lit("prompt"))
            .when(pl.col("timestamp") >= test_from)
            .then(pl.lit("test"))
            .when(pl.col("timestamp") >= valid_from)
            .then(pl.lit("valid"))
            .otherwise(pl.lit("train"))
        )
    out = df.with_columns(split.alias("split")).drop(["_rank", "_n", "_is_prompt"])
    return conform(out.to_arrow(), SPLIT_INTERACTIONS), bounds


# a user needs this many CTR samples to get valid and test rows in by_row_order mode (one of each
# and at least one to train on)
MIN_EVALUATED_SAMPLES = 3


def _per_user_split(n_prompt: pl.Expr, cfg: SplitConfig) -> pl.Expr:
    m = pl.col("_n") - n_prompt  # the user's CTR samples
    pos = pl.col("_rank") - n_prompt  # 0-based among them, oldest first
    n_test = pl.max_horizontal((m * cfg.test_share).floor().cast(pl.Int64), pl.lit(1))
    n_valid = pl.max_horizontal((m * cfg.valid_share).floor().cast(pl.Int64), pl.lit(1))
    evaluated = m >= MIN_EVALUATED_SAMPLES
    return (
        pl.when(pl.col("_is_prompt"))
        .then(pl.lit("prompt"))
        .when(evaluated & (pos >= m - n_test))
        .then(pl.lit("test"))
        .when(evaluated & (pos >= m - n_test - n_valid))
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )


def ctr_samples(split: pa.Table, cfg: SplitConfig) -> pa.Table:
    """CTR samples from the non-prompt interactions. Without a rating an interaction is a click."""
    df = pl.from_arrow(split).filter(pl.col("split") != "prompt")
    label = pl.when(pl.col("rating").is_null()).then(1).otherwise((pl.col("rating") > cfg.click_threshold).cast(pl.Int8))
    df = df.select(
        "user_id",
        "item_id",
        "timestamp",
        label.cast(pl.Int8).alias("label"),
        "split",
        pl.lit(False).alias("synthetic"),
    )
    return conform(df.to_arrow(), CTR_SAMPLES)


def prompt_context(split: pa.Table) -> pl.DataFrame:
    """The prompt-only history, oldest first per user: what augmenters may show the LLM."""
    return _order(pl.from_arrow(split).filter(pl.col("split") == "prompt"))


def split_sizes(split: pa.Table) -> dict[str, int]:
    counts = pl.from_arrow(split).group_by("split").len()
    sizes = {name: 0 for name in ("prompt", "train", "valid", "test")}
    sizes.update(dict(zip(counts["split"].to_list(), counts["len"].to_list())))
    return sizes
