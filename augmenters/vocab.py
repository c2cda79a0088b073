"""Fixed vocabularies per domain (ONCE/GENRE profiler topics, generator categories, LLMRec genres)."""

from __future__ import annotations

VOCABULARY = {
    # the MovieLens genre list
    "movies": [
        "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
        "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
    ],
    "books": [
        "Fiction", "Mystery", "Thriller", "Romance", "Fantasy", "Science Fiction", "Biography", "History",
        "Science", "Self-Help", "Business", "Children", "Poetry", "Travel", "Cooking",
    ],
    "news": [
        "Politics", "World", "Business", "Technology", "Science", "Health", "Sports", "Entertainment",
        "Lifestyle", "Travel", "Food", "Autos", "Finance", "Weather",
    ],
    # any other catalogue (a shop, a music or game store, ...): broad, product-neutral categories
    "generic": [
        "Electronics", "Home", "Fashion", "Beauty", "Health", "Sports", "Toys", "Books", "Music", "Movies",
        "Games", "Food", "Garden", "Automotive", "Office", "Travel", "Other",
    ],
}


def canonical(domain: str, values: list[str]) -> tuple[list[str], list[str]]:
    """(known values in their canonical spelling, unknown values): case- and space-insensitive."""
    index = {v.lower().replace(" ", ""): v for v in VOCABULARY[domain]}
    known, unknown = [], []
    for v in values:
        hit = index.get(str(v).lower().replace(" ", ""))
        if hit is None:
            unknown.append(str(v))
        elif hit not in known:
            known.append(hit)
    return known, unknown
