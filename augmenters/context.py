"""Shared, columnar context builders: the variables templates see.

History is the prompt split only (leakage rule) and is truncated to a token budget by dropping the
*oldest* items first, whole items at a time, never cutting an item in the middle; an item whose line
alone is longer than the budget is left out. One item is one line: line breaks in a title become
spaces, so item text cannot forge extra history lines or candidates.
"""

from __future__ import annotations

import polars as pl

from recaug.augmenters.base import AugmentInputs

GENDER_WORDS = {"M": "male", "F": "female"}


def item_lines(items: pl.DataFrame) -> pl.DataFrame:
    """One readable line per item: 'Toy Story (1995; Animation, Children's, Comedy)'.

    A line break in a title becomes a space: templates list history items and candidates one per
    line, so a title holding "\n- Other film, rated 5/5" would otherwise add a history entry."""
    year = pl.when(pl.col("year").is_not_null()).then(pl.col("year").cast(pl.String)).otherwise(pl.lit("year unknown"))
    genres = pl.col("genres").list.join(", ").fill_null("")
    detail = pl.when(genres != "").then(pl.concat_str([year, pl.lit("; "), genres])).otherwise(year)
    title = pl.col("title").str.replace_all(r"[ \t]*[\r\n]+[ \t]*", " ")
    return items.select("item_id", pl.concat_str([title, pl.lit(" ("), detail, pl.lit(")")]).alias("item_line"))


def history_context(inputs: AugmentInputs, user_ids: list[str], token_budget: int) -> pl.DataFrame:
    """Per user: `history` (list of lines, oldest first, newest kept), `history_dropped` (count)."""
    hist = inputs.history.filter(pl.col("user_id").is_in(user_ids))
    lines = item_lines(inputs.items)
    rating = pl.when(pl.col("rating").is_not_null()).then(
        pl.concat_str([pl.lit(", rated "), pl.col("rating").cast(pl.Int64).cast(pl.String), pl.lit("/5")])
    ).otherwise(pl.lit(""))
    hist = hist.join(lines, on="item_id", how="left").with_columns(
        pl.concat_str([pl.col("item_line").fill_null(pl.col("item_id")), rating]).alias("line")
    )
    # token counts of the distinct lines, one batched tokenizer call
    distinct = hist["line"].unique().to_list()
    counts = pl.DataFrame({"line": distinct, "_tok": inputs.count_tokens(distinct)}, schema={"line": pl.String, "_tok": pl.Int64})
    hist = hist.join(counts, on="line", how="left").sort(["user_id", "timestamp", "item_id"])
    # an item longer than the whole budget can never fit: leave it out instead of letting it push
    # every older item out too (one huge title would otherwise empty the history of whoever rated it)
    fits = hist.filter(pl.col("_tok") <= token_budget)
    # newest-first running total: keep an item only while the whole item still fits
    fits = fits.with_columns(pl.col("_tok").reverse().cum_sum().reverse().over("user_id").alias("_from_newest"))
    kept = fits.filter(pl.col("_from_newest") <= token_budget)
    per_user = kept.group_by("user_id", maintain_order=True).agg(
        pl.col("line").alias("history"), pl.col("item_id").alias("history_item_ids")
    )
    total = hist.group_by("user_id").len("_n_all")
    out = (
        pl.DataFrame({"user_id": user_ids}, schema={"user_id": pl.String})
        .join(per_user, on="user_id", how="left")
        .join(total, on="user_id", how="left")
        .with_columns(
            pl.col("history").fill_null(pl.lit([], dtype=pl.List(pl.String))),
            pl.col("history_item_ids").fill_null(pl.lit([], dtype=pl.List(pl.String))),
            pl.col("_n_all").fill_null(0),
        )
        .with_columns((pl.col("_n_all") - pl.col("history").list.len()).alias("history_dropped"))
        .drop("_n_all")
    )
    return out


def user_profile_columns(inputs: AugmentInputs, user_ids: list[str]) -> pl.DataFrame:
    users = inputs.users.filter(pl.col("user_id").is_in(user_ids))
    return users.select(
        "user_id",
        pl.col("age"),
        pl.col("gender").replace_strict(GENDER_WORDS, default=pl.col("gender")).alias("gender"),
        pl.col("occupation"),
        pl.col("region"),
    )


def user_context(inputs: AugmentInputs, user_ids: list[str], options: dict) -> pl.DataFrame:
    hist = history_context(inputs, user_ids, options["history_token_budget"])
    prof = user_profile_columns(inputs, user_ids)
    return hist.join(prof, on="user_id", how="left").rename({"user_id": "entity_id"})


def item_context(inputs: AugmentInputs, item_ids: list[str], options: dict) -> pl.DataFrame:
    items = inputs.items.filter(pl.col("item_id").is_in(item_ids))
    return items.select(
        pl.col("item_id").alias("entity_id"),
        "title",
        "year",
        pl.col("genres").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        pl.col("description"),
    )
