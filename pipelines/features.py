"""The modeler's API (`recaug.features`): load published features, join them point-in-time.

    import recaug
    feats = recaug.features.load("work/snapshots")                   # latest snapshot, every augmenter
    users = feats.filter(pl.col("entity_kind") == "user")
    X = recaug.features.vectors_numpy(users.filter(pl.col("augmenter") == "kar_user_preference"))
    joined, report = recaug.features.join_point_in_time(samples, "work/snapshots")

`load` returns one long frame — snapshot_id, augmenter, entity_kind, entity_id, vector, text_hash —
because that is what a modeler filters and joins; every augmenter of a snapshot shares one vector
width (one encoder per snapshot), and a mismatch is reported instead of being padded.
`join_point_in_time` gives each sample the vectors of the newest snapshot whose `data_cutoff` is
strictly before the sample's time, one `<augmenter>_vector` column per augmenter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recaug.schemas.vectors import vector_dim, vectors_numpy  # noqa: F401  (re-exported for modelers)
from recaug.core.errors import UsageError
from recaug.pipelines.snapshots import (  # noqa: F401  (re-exported)
    SnapshotInfo,
    SnapshotNotFound,
    list_snapshots,
    read_manifest,
    read_snapshot,
    resolve_snapshot,
    snapshot_root,
)

LONG_COLUMNS = ("snapshot_id", "augmenter", "entity_kind", "entity_id", "vector", "text_hash")


class MissingVectors(UsageError, KeyError):
    """The snapshot has no vectors of the augmenter (or entity kind) asked for (exit 2)."""


def resolve_root(root_or_config: Any) -> Path:
    """A snapshot root folder, a PipelineConfig, or the path of a pipeline YAML file."""
    from recaug.core.config import PipelineConfig, load_config

    if isinstance(root_or_config, PipelineConfig):
        return snapshot_root(root_or_config)
    path = Path(root_or_config).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return snapshot_root(load_config(path))
    return path


def _names(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    return {value} if isinstance(value, str) else set(value)


def _embedding_entries(info: SnapshotInfo, augmenter: str | Iterable[str] | None, kind: str | None) -> list[dict[str, Any]]:
    manifest = info.manifest
    entries = [
        {"name": name, **entry}
        for name, entry in manifest["tables"].items()
        if entry.get("kind") == "embeddings"
    ]
    available = sorted({e["metadata"].get("recaug.augmenter", "") for e in entries})
    wanted = _names(augmenter)
    if wanted is not None:
        unknown = sorted(wanted - set(available))
        if unknown:
            raise MissingVectors(f"snapshot {info.snapshot_id} has no embeddings for augmenter(s) {unknown}; it has {available}")
        entries = [e for e in entries if e["metadata"].get("recaug.augmenter") in wanted]
    if kind is not None:
        if kind not in ("user", "item"):
            raise ValueError(f"kind must be 'user' or 'item', got {kind!r}")
        entries = [e for e in entries if e["metadata"].get("recaug.entity_kind") == kind]
    if not entries:
        what = f"{kind} " if kind else ""
        raise MissingVectors(f"snapshot {info.snapshot_id} has no {what}embedding tables matching augmenter={augmenter!r}; it has {available}")
    return entries


def load(
    root_or_config: Any,
    snapshot: str = "latest",
    augmenter: str | Iterable[str] | None = None,
    kind: str | None = None,
    as_: str = "polars",
) -> pl.DataFrame | pa.Table:
    """Every embedding table of one snapshot (filtered by augmenter / entity kind) as one long frame.

    Columns: snapshot_id, augmenter, entity_kind, entity_id, vector (Array(Float32, d) in polars,
    fixed_size_list<float32>[d] in arrow), text_hash. With as_="arrow" the schema metadata keeps
    each source table's metadata (encoder, pooling, template hash ...) under `recaug.tables` (JSON).
    Vectors stay in one chunk per source table; `vectors_numpy` on one augmenter's rows of a
    freshly loaded frame is a view, on a filtered or multi-table frame a copy.
    """
    if as_ not in ("polars", "arrow"):
        raise ValueError(f"as_ must be 'polars' or 'arrow', got {as_!r}")
    root = resolve_root(root_or_config)
    # one whole snapshot: a `latest` retired by a concurrent publish mid-read is read again as the new one
    out = read_snapshot(root, snapshot, lambda info: _load_tables(info, augmenter, kind))
    if as_ == "arrow":
        return out
    return pl.from_arrow(out, rechunk=False)


def _load_tables(info: SnapshotInfo, augmenter: str | Iterable[str] | None, kind: str | None) -> pa.Table:
    entries = _embedding_entries(info, augmenter, kind)
    parts, table_meta, dims = [], {}, {}
    for entry in entries:
        table = pq.read_table(info.path / entry["path"])
        meta = entry["metadata"]
        aug = meta.get("recaug.augmenter", entry["name"])
        dims[aug] = vector_dim(table.schema.field("vector").type)
        n = table.num_rows
        parts.append(
            pa.table(
                {
                    "snapshot_id": pa.repeat(info.snapshot_id, n),
                    "augmenter": pa.repeat(aug, n),
                    "entity_kind": pa.repeat(meta.get("recaug.entity_kind", ""), n),
                    "entity_id": table.column("entity_id"),
                    "vector": table.column("vector"),
                    "text_hash": table.column("text_hash"),
                }
            )
        )
        table_meta[aug] = meta
    if len(set(dims.values())) > 1:
        raise ValueError(
            f"snapshot {info.snapshot_id} mixes vector widths {dims}; load one augmenter at a time (augmenter=...)"
        )
    out = pa.concat_tables(parts)
    out = out.replace_schema_metadata(
        {"recaug.snapshot": info.snapshot_id, "recaug.data_cutoff": str(info.data_cutoff), "recaug.tables": json.dumps(table_meta, sort_keys=True)}
    )
    return out


class PointInTimeResult(NamedTuple):
    frame: pl.DataFrame
    report: dict[str, Any]


def _epoch_seconds(samples: pl.DataFrame, time_col: str) -> pl.Expr:
    dtype = samples.schema[time_col]
    if dtype == pl.Datetime or isinstance(dtype, pl.Datetime):
        return pl.col(time_col).dt.epoch("s")
    if dtype == pl.Date:
        return pl.col(time_col).cast(pl.Datetime("us")).dt.epoch("s")
    if dtype.is_integer():
        return pl.col(time_col).cast(pl.Int64)
    raise TypeError(f"samples.{time_col} must be unix seconds (integer), Datetime or Date; got {dtype}")


def join_point_in_time(
    samples: pl.DataFrame,
    root_or_config: Any,
    augmenter: str | Iterable[str] | None = None,
    kind: str | None = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
) -> PointInTimeResult:
    """Attach to each sample the vectors of the newest snapshot with data_cutoff < the sample's time.

    Adds `feature_snapshot` (the snapshot used, null when none qualifies) and one
    `<augmenter>_vector` column per augmenter (user augmenters join on `user_col`, item augmenters
    on `item_col`); vectors are null where no snapshot qualifies or the snapshot lacks the entity.
    Sample order and count are kept. `report` counts samples without a snapshot, missing vectors
    per column and samples per snapshot used.
    """
    if time_col not in samples.columns:
        raise KeyError(f"samples need a {time_col!r} column; they have {samples.columns}")
    root = resolve_root(root_or_config)
    snaps = list_snapshots(root)
    row_col, ts_col, snap_col = "__recaug_row", "__recaug_ts", "feature_snapshot"
    if snap_col in samples.columns:
        raise ValueError(f"samples already have a {snap_col!r} column; drop or rename it first")
    snap_frame = (
        pl.DataFrame(
            {"data_cutoff": [s.data_cutoff for s in snaps], snap_col: [s.snapshot_id for s in snaps]},
            schema={"data_cutoff": pl.Int64, snap_col: pl.String},
        )
        .sort(["data_cutoff", snap_col])
        .unique("data_cutoff", keep="last", maintain_order=True)  # same cutoff: the later publish wins
    )
    keyed = samples.with_row_index(row_col).with_columns(_epoch_seconds(samples, time_col).alias(ts_col)).sort(ts_col)
    keyed = keyed.join_asof(
        snap_frame, left_on=ts_col, right_on="data_cutoff", strategy="backward", allow_exact_matches=False
    ).drop("data_cutoff")

    # every augmenter any snapshot offers gets a column, so the frame's shape does not depend on the dates
    catalogue: dict[str, tuple[str, int]] = {}
    for info in snaps:
        for name, entry in info.manifest["tables"].items():
            meta = entry.get("metadata", {})
            if entry.get("kind") == "embeddings" and (kind is None or meta.get("recaug.entity_kind") == kind):
                catalogue.setdefault(meta.get("recaug.augmenter", name), (meta.get("recaug.entity_kind", ""), int(meta.get("recaug.dim", 0))))
    wanted = _names(augmenter)
    if wanted is not None:
        unknown = sorted(wanted - set(catalogue))
        if unknown:
            raise KeyError(f"no published snapshot under {root} has embeddings for {unknown}; known: {sorted(catalogue)}")
        catalogue = {a: v for a, v in catalogue.items() if a in wanted}

    used = [s for s in keyed.get_column(snap_col).drop_nulls().unique().sort().to_list()]
    long_parts = []
    for sid in used:
        try:
            part = load(root, sid, kind=kind)
        except KeyError:
            continue  # this snapshot has none of the requested tables: its samples get nulls, counted below
        part = part.filter(pl.col("augmenter").is_in(list(catalogue)))
        if part.height:
            long_parts.append(part)
    by_augmenter: dict[tuple[str, str], list[pl.DataFrame]] = {}
    for part in long_parts:
        for (aug, ent_kind), sub in part.group_by(["augmenter", "entity_kind"]):
            by_augmenter.setdefault((aug, ent_kind), []).append(sub)
    vector_cols: list[str] = []
    for (aug, ent_kind), subs in sorted(by_augmenter.items()):
        widths = sorted({sub.schema["vector"].size for sub in subs})
        if len(widths) > 1:
            raise ValueError(f"the vector width of {aug} changes across the snapshots in range ({widths}); join one encoder era at a time")
        part = pl.concat(subs, how="vertical")
        key_col = user_col if ent_kind == "user" else item_col
        if key_col not in samples.columns:
            raise MissingVectors(f"augmenter {aug} has {ent_kind} vectors but the samples have no {key_col!r} column")
        dup = part.select(pl.struct("snapshot_id", "entity_id").is_duplicated().sum()).item()
        if dup:
            raise ValueError(f"snapshot tables of {aug} hold {dup} duplicate entity rows; the output gate should have stopped them")
        out_col = f"{aug}_vector"
        if out_col in samples.columns:
            raise ValueError(f"samples already have a {out_col!r} column")
        right = part.select(
            pl.col("snapshot_id").alias(snap_col), pl.col("entity_id").alias("__recaug_key"), pl.col("vector").alias(out_col)
        )
        keyed = (
            keyed.with_columns(pl.col(key_col).cast(pl.String).alias("__recaug_key"))
            .join(right, on=[snap_col, "__recaug_key"], how="left")
            .drop("__recaug_key")
        )
        vector_cols.append(out_col)
    for aug, (ent_kind, width) in sorted(catalogue.items()):
        out_col = f"{aug}_vector"
        if out_col not in vector_cols and width > 0:
            keyed = keyed.with_columns(pl.lit(None, dtype=pl.Array(pl.Float32, width)).alias(out_col))
            vector_cols.append(out_col)
    frame = keyed.sort(row_col).drop(row_col, ts_col)
    counts = frame.select([pl.col(snap_col).is_null().sum().alias("__none")] + [pl.col(c).is_null().sum() for c in vector_cols]).row(0, named=True)
    per_snapshot = frame.group_by(snap_col).len().drop_nulls(snap_col).sort(snap_col)
    report = {
        "samples": frame.height,
        "without_snapshot": int(counts["__none"]),
        "missing_vectors": {c: int(counts[c]) for c in vector_cols},
        "snapshots_used": dict(zip(per_snapshot.get_column(snap_col).to_list(), per_snapshot.get_column("len").to_list())),
        "vector_columns": vector_cols,
    }
    return PointInTimeResult(frame, report)
