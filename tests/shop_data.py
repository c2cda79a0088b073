"""The small "shop" dataset the CLI and reliability tests run on, written once.

A `Shop` describes users, items and ratings by a few numbers (sizes, ratings per user, a seed) and
writes them as CSV files, either in the user's own column names and formats (customers.csv /
catalogue.csv / events.csv, text timestamps, `dataset.*.columns` maps them) or in recaug's own
(users.csv / items.csv / interactions.csv, epoch seconds, no mapping). `dataset()` is the matching
`dataset:` section of a pipeline config. The same settings always give the same bytes, so a test
that depends on which prompts are sent (a stub server's answers, chaos draws) sees the same data
every run.

    from shop_data import Shop
    shop = Shop(n_users=30, n_items=20).write(tmp_path / "data")
    cfg = {"dataset": shop.dataset(tmp_path / "data"), ...}
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

# canonical column -> the shop's own name for it (the "own" style)
OWN_COLUMNS = {
    "users": {"user_id": "customer", "age": "age_years", "gender": "sex"},
    "items": {"item_id": "sku", "title": "name", "year": "released", "genres": "cats"},
    "interactions": {"user_id": "customer", "item_id": "sku", "rating": "stars", "timestamp": "when"},
}
FILES = {
    "own": {"users": "customers.csv", "items": "catalogue.csv", "interactions": "events.csv"},
    "canonical": {"users": "users.csv", "items": "items.csv", "interactions": "interactions.csv"},
}
OWN_TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
FIRST_TIMESTAMP = 880_000_000  # 1997-11-19, the canonical style's ratings start here
SAMPLED_GENRES = ["Drama", "Comedy", "Action", "Romance"]
TABLES = ("users", "items", "interactions")


@dataclass(frozen=True)
class Shop:
    n_users: int = 40
    n_items: int = 30
    per_user: int = 12  # ratings per user
    # "own": the user's column names and formats (text timestamps, ids c0/s0); "canonical": recaug's (epoch, u0/i0)
    style: str = "own"
    # ratings: drawn with random.Random(seed) (items sampled, stars random); None: a fixed cycle,
    # user u rates items (u * item_stride + k) % n_items, k = 0..per_user-1, with 1 + (u + k) % 5 stars
    seed: int | None = 7
    item_stride: int = 1
    tick: int = 1  # canonical style: seconds between one user's ratings (user u starts at FIRST_TIMESTAMP + 1000 u)
    # "sampled": two of SAMPLED_GENRES per item, drawn with the seed before the ratings; or a cycle of '|'-joined lists
    genres: str | tuple[str, ...] = "sampled"
    title: str = "Film number {i}"
    first_age: int = 18  # user u is first_age + u % 50
    first_year: int = 1980  # item i is first_year + i
    user_columns: tuple[str, ...] = ("user_id", "age", "gender")
    item_columns: tuple[str, ...] = ("item_id", "title", "year", "genres")
    # ratings of "lots" stars appended at the end (users 0..bad_rows-1, item 1): the input gate quarantines them
    bad_rows: int = 0

    def but(self, **changes) -> "Shop":
        return replace(self, **changes)

    @property
    def files(self) -> dict[str, str]:
        return FILES[self.style]

    def frames(self) -> dict[str, pl.DataFrame]:
        """users / items / interactions as all-text frames, in the style's column names."""
        own = self.style == "own"
        if self.style not in FILES:
            raise ValueError(f"Shop.style must be one of {sorted(FILES)}, not {self.style!r}")
        uid = (lambda u: f"c{u}") if own else (lambda u: f"u{u}")
        iid = (lambda i: f"s{i}") if own else (lambda i: f"i{i}")
        if self.seed is None and self.genres == "sampled":
            raise ValueError("Shop(genres='sampled') draws the genres with the seed: give a seed or a genre cycle")
        rng = random.Random(self.seed)
        users = {
            "user_id": [uid(u) for u in range(self.n_users)],
            "age": [str(self.first_age + u % 50) for u in range(self.n_users)],
            "gender": ["M" if u % 2 else "F" for u in range(self.n_users)],
            "occupation": ["doctor" if u % 2 else "writer" for u in range(self.n_users)],
        }
        if self.genres == "sampled":
            genres = ["|".join(rng.sample(SAMPLED_GENRES, 2)) for _ in range(self.n_items)]
        else:
            genres = [self.genres[i % len(self.genres)] for i in range(self.n_items)]
        items = {
            "item_id": [iid(i) for i in range(self.n_items)],
            "title": [self.title.format(i=i) for i in range(self.n_items)],
            "year": [str(self.first_year + i) for i in range(self.n_items)],
            "genres": genres,
            "description": [f"A film about thing {i}." for i in range(self.n_items)],
        }
        rows = []
        for u in range(self.n_users):
            if self.seed is None:
                picks = [((u * self.item_stride + k) % self.n_items, 1 + (u + k) % 5) for k in range(self.per_user)]
            else:  # the stars are drawn after the user's items, in the order rated
                picks = [(i, None) for i in rng.sample(range(self.n_items), self.per_user)]
            for k, (i, stars) in enumerate(picks):
                stars = rng.randint(1, 5) if stars is None else stars
                when = (f"1998-0{1 + k % 9}-{10 + u % 18:02d} 12:{k:02d}:00" if own
                        else str(FIRST_TIMESTAMP + u * 1000 + k * self.tick))
                rows.append({"user_id": uid(u), "item_id": iid(i), "rating": str(stars), "timestamp": when})
        for b in range(self.bad_rows):
            rows.append({"user_id": uid(b), "item_id": iid(1), "rating": "lots",
                         "timestamp": "1998-01-01 00:00:00" if own else str(FIRST_TIMESTAMP)})
        out = {
            "users": pl.DataFrame(users).select(self.user_columns),
            "items": pl.DataFrame(items).select(self.item_columns),
            "interactions": pl.DataFrame(rows, schema={c: pl.String for c in ("user_id", "item_id", "rating", "timestamp")}),
        }
        if own:
            out = {t: df.rename({c: OWN_COLUMNS[t].get(c, c) for c in df.columns}) for t, df in out.items()}
        return out

    def write(self, folder: Path) -> "Shop":
        """Write the three CSV files into `folder` (created if missing)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for table, df in self.frames().items():
            df.write_csv(folder / self.files[table])
        return self

    def dataset(self, folder: Path | None = None, domain: str | None = None) -> dict:
        """The config's `dataset:` section for these files: paths inside `folder` (or bare file names,
        resolved against the config's folder), and for the own style the column mapping and timestamp format."""
        out: dict = {"kind": "files"}
        if domain is not None:
            out["domain"] = domain
        for table in TABLES:
            source: dict = {"path": str(Path(folder) / self.files[table]) if folder is not None else self.files[table]}
            if self.style == "own":
                columns = self.user_columns if table == "users" else self.item_columns if table == "items" else \
                    ("user_id", "item_id", "rating", "timestamp")
                source["columns"] = {c: OWN_COLUMNS[table][c] for c in columns if c in OWN_COLUMNS[table]}
                if table == "interactions":
                    source["timestamp_format"] = OWN_TIMESTAMP_FORMAT
            out[table] = source
        return out
