"""Shared, columnar context builders: the variables templates see.

History is the prompt split only (leakage rule) and is truncated to a token budget by dropping the
*oldest* items first, whole items at a time, never cutting an item in the middle; an item whose line
alone is longer than the budget is left out. One item is one line: line breaks in a title become
spaces, so item text cannot forge extra history lines or candidates.

Domain fields: users and items may carry attribute columns `attr_<name>` (dataset.<table>.attributes,
e.g. author, publisher, brand, location). Every user and item context has `attributes`, an ordered
dict {name: value} of the entity's non-empty ones (in config order), and an item's line shows them
as `name: value` pairs after its year and genres.

Ratings are shown on the dataset's scale (`input_gate.rating_min`/`rating_max`, handed over in
`inputs.extras["rating_scale"]`): "rated 8/10"; a scale that does not start at 0 or 1 is spelt out
("rated 3 on a -2 to 3 scale"). An interaction without a rating (or with an implicit one,
dataset.implicit_ratings) shows none.
"""

from __future__ import annotations

import polars as pl

from recaug.augmenters.base import AugmentInputs
from recaug.schemas.tables import ATTRIBUTE_PREFIX

GENDER_WORDS = {"M": "male", "F": "female"}
DEFAULT_RATING_SCALE = (0.0, 5.0)  # input_gate.rating_min / rating_max defaults
_LINE_BREAKS = r"[ \t]*[\r\n]+[ \t]*"


def attribute_columns(frame: pl.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith(ATTRIBUTE_PREFIX)]


ATTRIBUTE_DTYPE = pl.List(pl.Struct({"name": pl.String, "value": pl.String}))


def attribute_dicts(frame: pl.DataFrame) -> pl.Series:
    """Per row, the non-empty attribute columns as [{name, value}, ...] in column order (one line each).

    A list of structs, not Python dicts: the column stays columnar, so request keys can hash it with
    the rest of the row; templates see it as an ordered {name: value} mapping
    (augmenters.base.normalise_attributes)."""
    names = attribute_columns(frame)
    if not names:  # built in polars: a Python list of empty lists cost ~40 µs per row
        return pl.select(pl.repeat(pl.lit([], dtype=ATTRIBUTE_DTYPE), frame.height).alias("attributes")).to_series()
    pairs = [
        pl.struct(
            pl.lit(c[len(ATTRIBUTE_PREFIX):]).alias("name"),
            pl.col(c).cast(pl.String).str.replace_all(_LINE_BREAKS, " ").str.strip_chars().alias("value"),
        )
        for c in names
    ]
    value = pl.element().struct.field("value")
    listed = pl.concat_list(pairs).list.eval(pl.element().filter(value.is_not_null() & (value != "")))
    return frame.select(listed.cast(ATTRIBUTE_DTYPE).alias("attributes")).to_series()


def rating_scale(inputs: AugmentInputs) -> tuple[float, float]:
    lo, hi = inputs.extras.get("rating_scale", DEFAULT_RATING_SCALE)
    return float(lo), float(hi)


def rating_text(rating: pl.Expr, scale: tuple[float, float]) -> pl.Expr:
    """', rated 8/10' on the dataset's scale; '' without a rating. Whole ratings print without '.0'."""
    lo, hi = scale
    r = rating.cast(pl.Float64)
    number = pl.when(r == r.floor()).then(r.cast(pl.Int64).cast(pl.String)).otherwise(r.round(2).cast(pl.String))
    suffix = f"/{hi:g}" if lo in (0.0, 1.0) else f" on a {lo:g} to {hi:g} scale"
    return pl.when(r.is_not_null()).then(pl.concat_str([pl.lit(", rated "), number, pl.lit(suffix)])).otherwise(pl.lit(""))


def item_lines(items: pl.DataFrame) -> pl.DataFrame:
    """One readable line per item: 'Toy Story (1995; Animation, Children's, Comedy)', with the
    item's attributes after them: 'Dune (1965; Science Fiction; author: Frank Herbert; publisher: Ace)'.

    A line break in a title or attribute becomes a space: templates list history items and candidates
    one per line, so a title holding "\n- Other film, rated 5/5" would otherwise add a history entry."""
    year = pl.when(pl.col("year").is_not_null()).then(pl.col("year").cast(pl.String)).otherwise(pl.lit("year unknown"))
    genres = pl.col("genres").list.join(", ").fill_null("")
    detail = pl.when(genres != "").then(pl.concat_str([year, pl.lit("; "), genres])).otherwise(year)
    for column in attribute_columns(items):
        value = pl.col(column).cast(pl.String).str.replace_all(_LINE_BREAKS, " ").str.strip_chars()
        pair = pl.concat_str([pl.lit(f"; {column[len(ATTRIBUTE_PREFIX):]}: "), value])
        detail = pl.concat_str([detail, pl.when(value.fill_null("") != "").then(pair).otherwise(pl.lit(""))])
    title = pl.col("title").str.replace_all(_LINE_BREAKS, " ")
    return items.select("item_id", pl.concat_str([title, pl.lit(" ("), detail, pl.lit(")")]).alias("item_line"))


def history_context(inputs: AugmentInputs, user_ids: list[str], token_budget: int) -> pl.DataFrame:
    """Per user: `history` (list of lines, oldest first, newest kept), `history_dropped` (count)."""
    hist = inputs.history.filter(pl.col("user_id").is_in(user_ids))
    lines = item_lines(inputs.items)
    rating = rating_text(pl.col("rating"), rating_scale(inputs))
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
        *attribute_columns(users),
    )


def _with_attributes(frame: pl.DataFrame) -> pl.DataFrame:
    """Replace the attr_<name> columns by the `attributes` dict column (last, after every join)."""
    return frame.with_columns(attribute_dicts(frame)).drop(attribute_columns(frame))


def user_context(inputs: AugmentInputs, user_ids: list[str], options: dict) -> pl.DataFrame:
    hist = history_context(inputs, user_ids, options["history_token_budget"])
    prof = user_profile_columns(inputs, user_ids)
    return _with_attributes(hist.join(prof, on="user_id", how="left").rename({"user_id": "entity_id"}))


def item_context(inputs: AugmentInputs, item_ids: list[str], options: dict) -> pl.DataFrame:
    items = inputs.items.filter(pl.col("item_id").is_in(item_ids))
    return _with_attributes(items.select(
        pl.col("item_id").alias("entity_id"),
        "title",
        "year",
        pl.col("genres").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        pl.col("description"),
        *attribute_columns(items),
    ))
