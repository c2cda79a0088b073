"""A simple base recommender for LLMRec's implicit-feedback augmentation: popular items in the
user's favourite genres, computed on the prompt-context history only (no leakage), columnar."""

from __future__ import annotations

import polars as pl


def genre_popularity_candidates(
    history: pl.DataFrame, items: pl.DataFrame, user_ids: list[str], n: int = 10, top_genres: int = 2
) -> pl.DataFrame:
    """user_id -> `candidates` (list of n item ids, most popular first), unseen by the user."""
    hist = history.filter(pl.col("user_id").is_in(user_ids)).select("user_id", "item_id")
    item_genre = items.select("item_id", "genres").explode("genres").rename({"genres": "genre"}).drop_nulls("genre")
    popularity = history.group_by("item_id").len("pop").with_columns(pl.col("pop").cast(pl.Int64))
    genre_items = item_genre.join(popularity, on="item_id", how="left").with_columns(pl.col("pop").fill_null(0))

    user_genres = (
        hist.join(item_genre, on="item_id")
        .group_by("user_id", "genre")
        .len("n")
        .sort(["user_id", "n", "genre"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .head(top_genres)
    )
    ranked = (
        user_genres.join(genre_items, on="genre")
        .join(hist, on=["user_id", "item_id"], how="anti")
        .group_by("user_id", "item_id")
        .agg(pl.col("pop").max())
        .sort(["user_id", "pop", "item_id"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .head(n)
    )
    # users whose genres yield too few candidates are topped up with globally popular unseen items
    global_top = popularity.sort(["pop", "item_id"], descending=[True, False]).head(n * 4)
    filler = (
        pl.DataFrame({"user_id": user_ids}, schema={"user_id": pl.String})
        .join(global_top, how="cross")
        .join(hist, on=["user_id", "item_id"], how="anti")
        .join(ranked.select("user_id", "item_id"), on=["user_id", "item_id"], how="anti")
        .with_columns(pl.col("pop") - 10**12)  # always after the genre candidates
    )
    return (
        pl.concat([ranked, filler.select(ranked.columns)])
        .sort(["user_id", "pop", "item_id"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").head(n).alias("candidates"))
    )
