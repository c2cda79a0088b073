"""CTR datasets built from recaug tables: vocabularies, sparse features, history, vectors, splits.

Everything here is columnar (polars / pyarrow / numpy); nothing loops over rows.

Index conventions (every categorical feature, ids included):
  0 = padding (empty slots of the genre list and of the DIN history),
  1 = missing or unknown (a null attribute, or an id/value the vocabulary does not hold),
  2.. = the vocabulary's values, in the vocabulary's order.
Vocabularies only ever grow by appending (warm start keeps every old index valid).

Sparse features per sample: user_id, item_id, age_bucket, gender, occupation (from USERS),
year_bucket and the multi-hot `genres` list (from ITEMS), and for DIN the user's history
`hist_item_id` (+ its length `hist_len`):
  * the prompt-context rows (SPLIT_INTERACTIONS with split == "prompt"), oldest first, followed by
  * the user's *positive train* CTR samples strictly before the sample's timestamp,
  keeping the newest `history_len` of them. Valid/test labels never enter any history, so the
  test split is read only when it is evaluated. Synthetic samples get the prompt part only.

Vectors (`dict[str, pa.Table]` keyed "user:<name>" or "item:<name>", columns entity_id +
vector fixed_size_list<float32>[d]) are kept per entity, not per sample: a batch gathers the rows
of its users/items. An entity without a vector (or with a null vector) gets zeros and its
missing indicator set to 1; the counts are in `CTRData.summary`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recaug.schemas.vectors import vectors_numpy

PAD = 0
UNKNOWN = 1
FIRST_VALUE = 2

SPLITS = ("train", "valid", "test")
USER_FIELDS = ("age_bucket", "gender", "occupation")
ITEM_FIELDS = ("year_bucket",)
# sparse single-valued fields in the order they appear in the id matrix
SPARSE_FIELDS = ("user_id", "item_id") + USER_FIELDS + ITEM_FIELDS
# MovieLens-1M age groups; ML-100K gives exact ages, which fall into the same groups
AGE_EDGES = (18, 25, 35, 45, 50, 56)
AGE_LABELS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
MAX_GENRES = 10  # longer genre lists keep their first MAX_GENRES (counted in the summary)
VECTOR_KINDS = ("user", "item")


class CTRDataError(ValueError):
    """Input tables that cannot be turned into a CTR dataset; the message says what to fix."""


# --- vocabularies -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """Values of one categorical feature; index = FIRST_VALUE + position."""

    values: tuple[str, ...]

    @property
    def size(self) -> int:  # embedding rows, padding and unknown included
        return len(self.values) + FIRST_VALUE

    def encode(self, column) -> np.ndarray:
        """Indices of `column` (nulls and values not in the vocabulary -> UNKNOWN), as int64."""
        return _encode(self, column)

    def extended(self, values: Sequence[str]) -> "Vocabulary":
        """This vocabulary plus the values it lacks, appended in sorted order (old indices stay valid)."""
        known = set(self.values)
        new = sorted({v for v in values if v is not None and v not in known})
        return Vocabulary(self.values + tuple(new)) if new else self

    @classmethod
    def of(cls, values: Sequence[str]) -> "Vocabulary":
        return cls(tuple(sorted({v for v in values if v is not None})))


def _encode(vocab: Vocabulary, column) -> np.ndarray:
    # index_in gives the position in the value set or null; null -> -1 -> -1 + FIRST_VALUE == UNKNOWN
    pos = pc.index_in(_as_string(column), value_set=pa.array(vocab.values, type=pa.string()))
    return pc.fill_null(pos, -1).to_numpy().astype(np.int64) + FIRST_VALUE


def _as_string(column) -> pa.Array | pa.ChunkedArray:
    if isinstance(column, pl.Series):
        column = column.to_arrow()
    if not isinstance(column, (pa.Array, pa.ChunkedArray)):
        column = pa.array(column, type=pa.string())
    if isinstance(column, pa.ChunkedArray) and column.num_chunks != 1:
        column = column.combine_chunks()
    if not pa.types.is_string(column.type):
        column = column.cast(pa.string())
    return column


# --- the feature specification (what a checkpoint stores) ----------------------------------------


@dataclass(frozen=True)
class VectorSpec:
    name: str  # "user:kar_user_preference"
    kind: str  # user | item
    dim: int

    @property
    def slug(self) -> str:  # a name deepctr can use as a feature name and module key
        return re.sub(r"[^A-Za-z0-9_]", "_", self.name)


@dataclass(frozen=True)
class FeatureSpec:
    vocabularies: dict[str, Vocabulary]  # SPARSE_FIELDS + "genres"
    genre_maxlen: int
    history_len: int
    vectors: tuple[VectorSpec, ...]

    def id_columns(self) -> dict[str, tuple[int, int]]:
        """Column ranges of the int64 id matrix, by deepctr feature name."""
        cols: dict[str, tuple[int, int]] = {}
        at = 0
        for name in SPARSE_FIELDS:
            cols[name] = (at, at + 1)
            at += 1
        cols["genres"] = (at, at + self.genre_maxlen)
        at += self.genre_maxlen
        cols["hist_item_id"] = (at, at + self.history_len)
        at += self.history_len
        cols["hist_len"] = (at, at + 1)
        return cols

    @property
    def id_width(self) -> int:
        return len(SPARSE_FIELDS) + self.genre_maxlen + self.history_len + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "vocabularies": {k: list(v.values) for k, v in self.vocabularies.items()},
            "genre_maxlen": self.genre_maxlen,
            "history_len": self.history_len,
            "vectors": [{"name": v.name, "kind": v.kind, "dim": v.dim} for v in self.vectors],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureSpec":
        return cls(
            vocabularies={k: Vocabulary(tuple(v)) for k, v in data["vocabularies"].items()},
            genre_maxlen=int(data["genre_maxlen"]),
            history_len=int(data["history_len"]),
            vectors=tuple(VectorSpec(v["name"], v["kind"], int(v["dim"])) for v in data["vectors"]),
        )


# --- arrays ---------------------------------------------------------------------------------------


@dataclass
class SplitArrays:
    """One split, ready for batching: ids (int64 [N, id_width]), labels (float32 [N]), synthetic flags."""

    ids: torch.Tensor
    labels: torch.Tensor
    synthetic: np.ndarray  # bool [N]
    user_ids: np.ndarray  # the user's vocabulary index [N] (for GAUC)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray | torch.Tensor) -> "SplitArrays":
        index_t = torch.as_tensor(index, dtype=torch.long)
        index_n = index_t.numpy()
        return SplitArrays(self.ids[index_t], self.labels[index_t], self.synthetic[index_n], self.user_ids[index_n])

    @staticmethod
    def concat(parts: Sequence["SplitArrays"]) -> "SplitArrays":
        return SplitArrays(
            torch.cat([p.ids for p in parts]),
            torch.cat([p.labels for p in parts]),
            np.concatenate([p.synthetic for p in parts]),
            np.concatenate([p.user_ids for p in parts]),
        )


@dataclass
class EntityVectors:
    """One vector table aligned with an id vocabulary: row i belongs to vocabulary index i."""

    spec: VectorSpec
    matrix: torch.Tensor  # float32 [vocab size, d]; zeros where missing
    missing: torch.Tensor  # float32 [vocab size]; 1 = no vector


@dataclass
class CTRData:
    """Everything a training run needs, with access to the splits recorded.

    `split("test")` is how the trainer reaches the test split; every call is counted in `reads`
    and appended to `access_log`, so a test can check that one training touched test exactly once
    and only after model selection. Build it once with `build_ctr_data` and reuse it across
    backbones and seeds (synthetic samples are drawn per seed by `train_split`).
    """

    spec: FeatureSpec
    _splits: dict[str, SplitArrays]
    _synthetic_pool: SplitArrays
    vectors: tuple[EntityVectors, ...]
    summary: dict[str, Any]
    reads: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    access_log: list[str] = field(default_factory=list)

    def split(self, name: str) -> SplitArrays:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        self.reads[name] += 1
        self.access_log.append(name)
        return self._splits[name]

    def size(self, name: str) -> int:
        """Row count of a split (does not count as a read)."""
        return len(self._splits[name])

    @property
    def synthetic_pool_size(self) -> int:
        return len(self._synthetic_pool)

    def train_split(self, synthetic_rate: float, seed: int) -> tuple[SplitArrays, dict[str, int]]:
        """The train split plus `synthetic_rate` x (real train rows) synthetic rows, drawn with `seed`.

        Synthetic rows are only ever added here, so they cannot reach valid or test.
        """
        train = self.split("train")
        n_real = int((~train.synthetic).sum())
        wanted = int(round(synthetic_rate * n_real))
        pool = len(self._synthetic_pool)
        used = min(wanted, pool)
        info = {"synthetic_wanted": wanted, "synthetic_available": pool, "synthetic_added": used}
        if used == 0:
            return train, info
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(pool, size=used, replace=False))
        return SplitArrays.concat([train, self._synthetic_pool.take(chosen)]), info

    def gather_vectors(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Vectors of a batch's users/items ([B, d] each) and their missing flags ([B, n_vectors])."""
        cols = self.spec.id_columns()
        out, missing = [], []
        for ev in self.vectors:
            entity = ids[:, cols[f"{ev.spec.kind}_id"][0]]
            out.append(ev.matrix.index_select(0, entity))
            missing.append(ev.missing.index_select(0, entity))
        flags = torch.stack(missing, dim=1) if missing else ids.new_zeros((ids.shape[0], 0), dtype=torch.float32)
        return out, flags


# --- building ------------------------------------------------------------------------------------


def _check_columns(table: pa.Table, what: str, needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise CTRDataError(f"{what} table lacks column(s) {missing}; it has {table.column_names}")


def _unique_ids(table: pa.Table, column: str, what: str) -> None:
    ids = table.column(column)
    if ids.null_count:
        raise CTRDataError(f"{what} table has {ids.null_count} null {column} value(s)")
    n_unique = len(pc.unique(ids))
    if n_unique != table.num_rows:
        raise CTRDataError(f"{what} table has {table.num_rows - n_unique} duplicate {column} row(s); pass one row per id")


def _age_bucket(age: pl.Expr) -> pl.Expr:
    expr = pl.when(age.is_null()).then(pl.lit(None, pl.String))
    lower = None
    for edge, label in zip(AGE_EDGES, AGE_LABELS):
        cond = age < edge if lower is None else (age >= lower) & (age < edge)
        expr = expr.when(cond).then(pl.lit(label))
        lower = edge
    return expr.otherwise(pl.lit(AGE_LABELS[-1]))


def _year_bucket(year: pl.Expr) -> pl.Expr:
    return pl.when(year.is_null()).then(pl.lit(None, pl.String)).otherwise(((year // 10) * 10).cast(pl.String) + "s")


def _user_attributes(users: pa.Table) -> pl.DataFrame:
    df = pl.from_arrow(users)
    cols = {
        "age": pl.col("age").cast(pl.Int64) if "age" in df.columns else pl.lit(None, pl.Int64),
        "gender": pl.col("gender").cast(pl.String) if "gender" in df.columns else pl.lit(None, pl.String),
        "occupation": pl.col("occupation").cast(pl.String) if "occupation" in df.columns else pl.lit(None, pl.String),
    }
    return df.select(
        pl.col("user_id").cast(pl.String),
        _age_bucket(cols["age"]).alias("age_bucket"),
        cols["gender"].alias("gender"),
        cols["occupation"].alias("occupation"),
    )


def _item_attributes(items: pa.Table) -> pl.DataFrame:
    df = pl.from_arrow(items)
    year = pl.col("year").cast(pl.Int64) if "year" in df.columns else pl.lit(None, pl.Int64)
    genres = pl.col("genres") if "genres" in df.columns else pl.lit(None, pl.List(pl.String))
    return df.select(pl.col("item_id").cast(pl.String), _year_bucket(year).alias("year_bucket"), genres.alias("genres"))


def _prompt_history(history: pa.Table | None) -> pl.DataFrame:
    if history is None or history.num_rows == 0:
        return pl.DataFrame(schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64})
    _check_columns(history, "history", ["user_id", "item_id", "timestamp"])
    df = pl.from_arrow(history)
    if "split" in df.columns:
        df = df.filter(pl.col("split") == "prompt")
    return df.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), pl.col("timestamp").cast(pl.Int64))


def _samples_frame(samples: pa.Table) -> pl.DataFrame:
    _check_columns(samples, "CTR samples", ["user_id", "item_id", "timestamp", "label", "split"])
    df = pl.from_arrow(samples).select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("timestamp").cast(pl.Int64),
        pl.col("label").cast(pl.Int8),
        pl.col("split").cast(pl.String),
        (pl.col("synthetic").cast(pl.Boolean) if "synthetic" in samples.column_names else pl.lit(False)).alias("synthetic"),
    )
    bad_split = df.filter(~pl.col("split").is_in(list(SPLITS)))
    if bad_split.height:
        raise CTRDataError(
            f"{bad_split.height} CTR sample(s) have a split outside {SPLITS} "
            f"(e.g. {bad_split['split'].unique().to_list()[:3]}); prompt rows are history, pass them as `history`"
        )
    bad_label = df.filter(~pl.col("label").is_in([0, 1]))
    if bad_label.height:
        raise CTRDataError(f"{bad_label.height} CTR sample(s) have a label other than 0/1")
    leaked = df.filter(pl.col("synthetic") & (pl.col("split") != "train"))
    if leaked.height:
        raise CTRDataError(
            f"{leaked.height} synthetic sample(s) are in valid/test; synthetic samples are training-only by contract"
        )
    for split in SPLITS:
        if df.filter(pl.col("split") == split).height == 0:
            raise CTRDataError(f"the CTR samples have no {split!r} rows; training needs train, valid and test")
    return df


def _synthetic_frame(synthetic: pa.Table | None) -> pl.DataFrame:
    schema = {"user_id": pl.String, "item_id": pl.String, "label": pl.Int8}
    if synthetic is None or synthetic.num_rows == 0:
        return pl.DataFrame(schema=schema)
    _check_columns(synthetic, "synthetic interactions", ["user_id", "item_id", "label"])
    df = pl.from_arrow(synthetic).select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), pl.col("label").cast(pl.Int8)
    )
    bad = df.filter(~pl.col("label").is_in([0, 1]))
    if bad.height:
        raise CTRDataError(f"{bad.height} synthetic interaction(s) have a label other than 0/1")
    return df


def _vector_specs(vectors: Mapping[str, pa.Table]) -> tuple[VectorSpec, ...]:
    specs = []
    for name in sorted(vectors):
        kind = name.split(":", 1)[0]
        if ":" not in name or kind not in VECTOR_KINDS:
            raise CTRDataError(f"vector table key {name!r} must look like 'user:<name>' or 'item:<name>'")
        table = vectors[name]
        _check_columns(table, f"vector table {name!r}", ["entity_id", "vector"])
        vtype = table.schema.field("vector").type
        if not pa.types.is_fixed_size_list(vtype):
            raise CTRDataError(f"vector table {name!r}: column 'vector' must be fixed_size_list<float32>[d], got {vtype}")
        specs.append(VectorSpec(name=name, kind=kind, dim=vtype.list_size))
    slugs = [s.slug for s in specs]
    if len(set(slugs)) != len(slugs):
        raise CTRDataError(f"vector table names {sorted(vectors)} collide after sanitising to feature names {slugs}")
    return tuple(specs)


def _entity_vectors(spec: VectorSpec, table: pa.Table, vocab: Vocabulary) -> tuple[EntityVectors, dict[str, int]]:
    matrix = np.zeros((vocab.size, spec.dim), dtype=np.float32)
    present = np.zeros(vocab.size, dtype=bool)
    values = vectors_numpy(table, "vector")
    idx = _encode(vocab, table.column("entity_id"))
    usable = np.isfinite(values).all(axis=1)  # null rows come back as NaN
    known = idx >= FIRST_VALUE
    keep = usable & known
    matrix[idx[keep]] = values[keep]
    present[idx[keep]] = True
    vocab_rows = vocab.size - FIRST_VALUE
    stats = {
        "rows": int(table.num_rows),
        "entities_with_vector": int(present[FIRST_VALUE:].sum()),
        "entities_missing_vector": int(vocab_rows - present[FIRST_VALUE:].sum()),
        "null_or_nonfinite_rows": int((~usable).sum()),
        "rows_for_unknown_entities": int((~known).sum()),
    }
    missing = (~present).astype(np.float32)
    return EntityVectors(spec, torch.from_numpy(matrix), torch.from_numpy(missing)), stats


def _genre_matrix(items: pl.DataFrame, item_idx: np.ndarray, n_items: int, vocab: Vocabulary, maxlen: int) -> np.ndarray:
    out = np.zeros((n_items, maxlen), dtype=np.int64)
    if maxlen == 0 or items.height == 0:
        return out
    exploded = (
        items.select(pl.Series("row", item_idx), pl.col("genres"))
        .explode("genres")
        .drop_nulls("genres")
        .with_columns(pl.int_range(pl.len()).over("row").alias("pos"))
        .filter(pl.col("pos") < maxlen)
    )
    rows = exploded["row"].to_numpy()
    pos = exploded["pos"].to_numpy()
    out[rows, pos] = _encode(vocab, exploded["genres"])
    return out


def _history_matrix(
    user_idx: np.ndarray,
    ts: np.ndarray,
    prompt_user: np.ndarray,
    prompt_item: np.ndarray,
    pos_user: np.ndarray,
    pos_item: np.ndarray,
    pos_ts: np.ndarray,
    n_users: int,
    length: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: prompt items then positive train items strictly before `ts`, newest `length` kept.

    Inputs are pre-sorted (by user, then time). Returns (history [N, length], lengths [N]).
    """
    n = user_idx.shape[0]
    seq = np.zeros((n, length), dtype=np.int64)
    if n == 0 or length == 0:
        return seq, np.zeros(n, dtype=np.int64)
    n_prompt = np.bincount(prompt_user, minlength=n_users)
    n_pos = np.bincount(pos_user, minlength=n_users)
    per_user = n_prompt + n_pos
    offsets = np.concatenate([[0], np.cumsum(per_user)[:-1]])
    # one flat array: for each user, its prompt items then its positive train items
    flat = np.empty(int(per_user.sum()), dtype=np.int64)
    prompt_rank = np.arange(prompt_user.size) - np.concatenate([[0], np.cumsum(n_prompt)[:-1]])[prompt_user]
    flat[offsets[prompt_user] + prompt_rank] = prompt_item
    pos_rank = np.arange(pos_user.size) - np.concatenate([[0], np.cumsum(n_pos)[:-1]])[pos_user]
    flat[offsets[pos_user] + n_prompt[pos_user] + pos_rank] = pos_item

    # positives of the sample's user strictly before its timestamp: a search on (user, time) keys
    if pos_ts.size:
        t0 = int(min(pos_ts.min(), ts.min()))
        span = int(max(pos_ts.max(), ts.max())) - t0 + 2
        if n_users * span >= 2**62:
            raise CTRDataError("timestamps span too wide to index histories; pass unix seconds")
        pos_key = pos_user * span + (pos_ts - t0)
        sample_key = user_idx * span + (ts - t0)
        before = np.searchsorted(pos_key, sample_key, side="left") - np.searchsorted(pos_key, user_idx * span, side="left")
    else:
        before = np.zeros(n, dtype=np.int64)
    available = n_prompt[user_idx] + before
    lengths = np.minimum(available, length)
    start = offsets[user_idx] + available - lengths
    j = np.arange(length)
    pos = start[:, None] + j[None, :]
    valid = j[None, :] < lengths[:, None]
    if flat.size:
        seq = np.where(valid, flat[np.minimum(pos, flat.size - 1)], PAD)
    return seq.astype(np.int64), lengths.astype(np.int64)


def build_feature_spec(
    samples: pl.DataFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
    prompt: pl.DataFrame,
    synthetic: pl.DataFrame,
    vector_specs: tuple[VectorSpec, ...],
    history_len: int,
    base: FeatureSpec | None,
) -> FeatureSpec:
    user_values = pl.concat([users["user_id"], samples["user_id"], prompt["user_id"], synthetic["user_id"]]).unique()
    item_values = pl.concat([items["item_id"], samples["item_id"], prompt["item_id"], synthetic["item_id"]]).unique()
    genre_values = items["genres"].explode().drop_nulls().unique() if items.height else pl.Series([], dtype=pl.String)
    found = {
        "user_id": user_values.to_list(),
        "item_id": item_values.to_list(),
        "age_bucket": users["age_bucket"].drop_nulls().unique().to_list(),
        "gender": users["gender"].drop_nulls().unique().to_list(),
        "occupation": users["occupation"].drop_nulls().unique().to_list(),
        "year_bucket": items["year_bucket"].drop_nulls().unique().to_list(),
        "genres": genre_values.to_list(),
    }
    longest = int(items["genres"].list.len().max() or 0) if items.height else 0
    genre_maxlen = max(1, min(longest, MAX_GENRES))
    if base is None:
        vocabs = {k: Vocabulary.of(v) for k, v in found.items()}
    else:
        vocabs = {k: base.vocabularies.get(k, Vocabulary(())).extended(v) for k, v in found.items()}
        genre_maxlen = max(genre_maxlen, base.genre_maxlen)
    return FeatureSpec(vocabularies=vocabs, genre_maxlen=genre_maxlen, history_len=history_len, vectors=vector_specs)


def build_ctr_data(
    samples: pa.Table,
    users: pa.Table,
    items: pa.Table,
    history: pa.Table | None,
    vectors: Mapping[str, pa.Table] | None,
    history_len: int,
    synthetic: pa.Table | None = None,
    base_spec: FeatureSpec | None = None,
) -> CTRData:
    """Encode the tables into a `CTRData`.

    samples: CTR_SAMPLES rows (train/valid/test); users/items: the clean USERS/ITEMS tables;
    history: SPLIT_INTERACTIONS (only split == "prompt" rows are used; a prompt-only table works too);
    vectors: {"user:<name>" | "item:<name>": embedding table}; synthetic: SYNTHETIC_INTERACTIONS,
    a pool drawn from per training run (see CTRData.train_split);
    base_spec: a checkpoint's feature spec to extend (warm start) instead of starting afresh.
    """
    vectors = dict(vectors or {})
    _check_columns(users, "users", ["user_id"])
    _check_columns(items, "items", ["item_id"])
    _unique_ids(users, "user_id", "users")
    _unique_ids(items, "item_id", "items")
    df = _samples_frame(samples)
    user_attr = _user_attributes(users)
    item_attr = _item_attributes(items)
    prompt = _prompt_history(history)
    syn = _synthetic_frame(synthetic)
    specs = _vector_specs(vectors)
    if base_spec is not None:
        old = {(v.name, v.dim) for v in base_spec.vectors}
        new = {(v.name, v.dim) for v in specs}
        if old != new:
            raise CTRDataError(
                f"the warm-start checkpoint was trained with vectors {sorted(old)} but this run has {sorted(new)}; "
                "train from scratch (no warm start) when the vector set changes"
            )
    spec = build_feature_spec(df, user_attr, item_attr, prompt, syn, specs, history_len, base_spec)
    V = spec.vocabularies

    # per-entity side features, aligned with the id vocabularies
    n_users, n_items = V["user_id"].size, V["item_id"].size
    user_side = np.full((n_users, len(USER_FIELDS)), UNKNOWN, dtype=np.int64)
    u_rows = _encode(V["user_id"], user_attr["user_id"].to_arrow())
    for j, name in enumerate(USER_FIELDS):
        user_side[u_rows, j] = _encode(V[name], user_attr[name].to_arrow())
    item_side = np.full((n_items, len(ITEM_FIELDS)), UNKNOWN, dtype=np.int64)
    i_rows = _encode(V["item_id"], item_attr["item_id"].to_arrow())
    for j, name in enumerate(ITEM_FIELDS):
        item_side[i_rows, j] = _encode(V[name], item_attr[name].to_arrow())
    genres = _genre_matrix(item_attr, i_rows, n_items, V["genres"], spec.genre_maxlen)
    user_side[:FIRST_VALUE] = UNKNOWN
    item_side[:FIRST_VALUE] = UNKNOWN

    # history sources, sorted by (user, time, item) so ties are deterministic
    prompt_sorted = prompt.sort(["user_id", "timestamp", "item_id"])
    p_user = _encode(V["user_id"], prompt_sorted["user_id"].to_arrow())
    p_item = _encode(V["item_id"], prompt_sorted["item_id"].to_arrow())
    order = np.argsort(p_user, kind="stable")  # keeps time order within a user index
    p_user, p_item = p_user[order], p_item[order]
    positives = df.filter((pl.col("split") == "train") & (pl.col("label") == 1) & ~pl.col("synthetic"))
    pos_u = _encode(V["user_id"], positives["user_id"].to_arrow())
    pos_i = _encode(V["item_id"], positives["item_id"].to_arrow())
    pos_t = positives["timestamp"].to_numpy().astype(np.int64)
    order = np.lexsort((pos_i, pos_t, pos_u))
    pos_u, pos_i, pos_t = pos_u[order], pos_i[order], pos_t[order]

    def encode_rows(frame: pl.DataFrame, timestamps: np.ndarray | None) -> SplitArrays:
        u = _encode(V["user_id"], frame["user_id"].to_arrow())
        i = _encode(V["item_id"], frame["item_id"].to_arrow())
        if timestamps is None:  # synthetic rows: before every positive, i.e. prompt history only
            ts = np.full(u.shape[0], np.iinfo(np.int64).min // 4, dtype=np.int64)
            hist, hist_len = _history_matrix(u, ts, p_user, p_item, pos_u[:0], pos_i[:0], pos_t[:0], n_users, spec.history_len)
        else:
            hist, hist_len = _history_matrix(u, timestamps, p_user, p_item, pos_u, pos_i, pos_t, n_users, spec.history_len)
        ids = np.concatenate(
            [u[:, None], i[:, None], user_side[u], item_side[i], genres[i], hist, hist_len[:, None]], axis=1
        )
        assert ids.shape[1] == spec.id_width
        labels = frame["label"].to_numpy().astype(np.float32)
        flags = frame["synthetic"].to_numpy() if "synthetic" in frame.columns else np.ones(u.shape[0], dtype=bool)
        return SplitArrays(torch.from_numpy(ids), torch.from_numpy(labels), flags.astype(bool), u)

    splits = {}
    for name in SPLITS:
        part = df.filter(pl.col("split") == name).sort(["timestamp", "user_id", "item_id"])
        splits[name] = encode_rows(part, part["timestamp"].to_numpy().astype(np.int64))
    pool = encode_rows(syn.with_columns(pl.lit(True).alias("synthetic")), None)

    entity_vectors, vector_stats = [], {}
    for vs in specs:
        ev, stats = _entity_vectors(vs, vectors[vs.name], V[f"{vs.kind}_id"])
        entity_vectors.append(ev)
        vector_stats[vs.name] = stats

    longest_genres = int(item_attr["genres"].list.len().max() or 0) if item_attr.height else 0
    summary = {
        "rows": {name: len(arr) for name, arr in splits.items()},
        "synthetic_in_samples": int(df["synthetic"].sum()),
        "synthetic_pool": len(pool),
        "vocabulary_sizes": {k: len(v.values) for k, v in V.items()},
        "items_with_genres_truncated": int((item_attr["genres"].list.len() > spec.genre_maxlen).sum()) if longest_genres else 0,
        "vectors": vector_stats,
        "unknown_ids": {
            "samples_without_user_row": int((~df["user_id"].is_in(user_attr["user_id"].implode())).sum()),
            "samples_without_item_row": int((~df["item_id"].is_in(item_attr["item_id"].implode())).sum()),
        },
    }
    return CTRData(spec=spec, _splits=splits, _synthetic_pool=pool, vectors=tuple(entity_vectors), summary=summary)
