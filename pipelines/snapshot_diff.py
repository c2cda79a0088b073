"""Compare two published snapshots table by table (`recaug snapshots diff`).

For users who move a pipeline to another runner (local -> Ray / Beam) or another machine and want to
know that the features did not change. Two snapshots hold the same features when they have the same
tables and, per table, the same rows under the same keys with equal values, where
  - `created_at` and `latency_s` are ignored (when a row was made and how long the model took),
  - float columns and vectors (`fixed_size_list<float32>[d]`) may differ by at most `atol`,
  - schema metadata is compared except `recaug.snapshot` (each snapshot stamps its own id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recaug.pipelines.snapshots import LATEST_FILE, MANIFEST_FILE, SnapshotInfo, SnapshotNotFound, resolve_snapshot

VOLATILE_COLUMNS = ("created_at", "latency_s")
KEY_COLUMNS = ("entity_id", "user_id", "item_id", "for_user_id", "row", "cache_key")
IGNORED_METADATA = ("recaug.snapshot", "recaug.verdicts")  # lineage, not content
DEFAULT_ATOL = 1e-5

IDENTICAL, WITHIN_TOLERANCE, DIFFERENT, ONLY_IN_A, ONLY_IN_B = (
    "identical", "equal within tolerance", "different", "only in A", "only in B",
)


@dataclass
class TableDiff:
    name: str
    status: str
    rows: tuple[int | None, int | None]
    details: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None  # over float columns and vectors, when the rows line up

    @property
    def same(self) -> bool:
        return self.status in (IDENTICAL, WITHIN_TOLERANCE)


@dataclass
class SnapshotDiff:
    a: SnapshotInfo
    b: SnapshotInfo
    atol: float
    tables: list[TableDiff]
    notes: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return all(t.same for t in self.tables)

    def table(self, name: str) -> TableDiff:
        return next(t for t in self.tables if t.name == name)

    def summary(self) -> str:
        lines = [f"A: {self.a.snapshot_id}  ({self.a.path})", f"B: {self.b.snapshot_id}  ({self.b.path})"]
        lines += [f"   {n}" for n in self.notes]
        width = max([len(t.name) for t in self.tables] + [5])
        for t in self.tables:
            rows = "/".join("-" if r is None else f"{r:,}" for r in t.rows)
            result = t.status
            if t.max_abs_diff is not None and t.status != ONLY_IN_A and t.status != ONLY_IN_B:
                result += f" (max |diff| {t.max_abs_diff:.1e})"
            lines.append(f"{t.name:<{width}}  {rows:>13}  {result}")
            lines += [f"{'':<{width}}  {'':>13}    {d}" for d in t.details]
        differing = [t.name for t in self.tables if not t.same]
        if differing:
            lines.append(f"the snapshots differ in {len(differing)} of {len(self.tables)} table(s)")
        else:
            lines.append(
                f"the snapshots hold the same features: {len(self.tables)} table(s), texts and keys equal, "
                f"vectors within {self.atol:g} (created_at and latency_s ignored)"
            )
        return "\n".join(lines)


def locate_snapshot(root: Path, ref: str) -> SnapshotInfo:
    """`ref` is a snapshot id or 'latest' under `root`, or a path: a snapshot folder (holding
    manifest.json) or another snapshot root (its latest)."""
    path = Path(ref).expanduser()
    if path.exists():
        path = path.resolve()  # reports show where the snapshot really is
    if (path / MANIFEST_FILE).is_file():
        return resolve_snapshot(path.parent, path.name)
    if (path / LATEST_FILE).is_file():
        return resolve_snapshot(path, "latest")
    if path.exists():
        raise SnapshotNotFound(f"{ref} is neither a snapshot folder (with {MANIFEST_FILE}) nor a snapshot root (with {LATEST_FILE})")
    return resolve_snapshot(root, ref)


def _is_float(t: pa.DataType) -> bool:
    """Float scalars and vectors: compared within a tolerance; everything else exactly."""
    return pa.types.is_floating(t) or (pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type))


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """(rows, width) float64; null rows are NaN."""
    t = column.type
    col = column.combine_chunks()
    width = t.list_size if pa.types.is_fixed_size_list(t) else 1
    out = np.full((len(col), width), np.nan)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    values = col.flatten() if pa.types.is_fixed_size_list(t) else col.drop_null()
    out[valid] = values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, width)
    return out


def _metadata(table: pa.Table) -> dict[str, str]:
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return {k: v for k, v in meta.items() if k not in IGNORED_METADATA}


def compare_tables(name: str, a: pa.Table, b: pa.Table, atol: float = DEFAULT_ATOL) -> TableDiff:
    diff = TableDiff(name, IDENTICAL, (a.num_rows, b.num_rows))
    cols_a = [c for c in a.column_names if c not in VOLATILE_COLUMNS]
    cols_b = [c for c in b.column_names if c not in VOLATILE_COLUMNS]
    if set(cols_a) != set(cols_b):
        diff.status = DIFFERENT
        diff.details.append(f"columns only in A: {sorted(set(cols_a) - set(cols_b))}, only in B: {sorted(set(cols_b) - set(cols_a))}")
        return diff
    b = b.select(cols_a)
    a = a.select(cols_a)
    mismatched = [c for c in cols_a if a.schema.field(c).type != b.schema.field(c).type]
    if mismatched:
        diff.status = DIFFERENT
        diff.details.append("column types differ: " + ", ".join(
            f"{c} ({a.schema.field(c).type} / {b.schema.field(c).type})" for c in mismatched))
        return diff
    meta_a, meta_b = _metadata(a), _metadata(b)
    if meta_a != meta_b:
        diff.status = DIFFERENT
        keys = sorted(k for k in set(meta_a) | set(meta_b) if meta_a.get(k) != meta_b.get(k))
        diff.details.append(f"schema metadata differs: {', '.join(keys)}")

    float_cols = [c for c in cols_a if _is_float(a.schema.field(c).type)]
    exact_cols = [c for c in cols_a if c not in float_cols]
    keys = [c for c in KEY_COLUMNS if c in exact_cols]
    nested = {c for c in exact_cols if pa.types.is_nested(a.schema.field(c).type)}
    order = keys + [c for c in exact_cols if c not in keys and c not in nested]

    def exact_frame(t: pa.Table) -> pl.DataFrame:
        df = pl.from_arrow(t.select(exact_cols)) if exact_cols else pl.DataFrame({"__row": range(t.num_rows)})
        return df.with_row_index("__pos")

    fa, fb = exact_frame(a), exact_frame(b)
    if keys:
        ka = fa.group_by(keys).len()
        kb = fb.group_by(keys).len()
        joined = ka.join(kb, on=keys, how="full", coalesce=True, nulls_equal=True, suffix="_b")
        joined = joined.with_columns(pl.col("len", "len_b").fill_null(0).cast(pl.Int64))  # counts are u32
        only_a = int((joined["len"] - joined["len_b"]).clip(lower_bound=0).sum())
        only_b = int((joined["len_b"] - joined["len"]).clip(lower_bound=0).sum())
        if only_a or only_b:
            diff.status = DIFFERENT
            diff.details.append(f"keys ({', '.join(keys)}): {only_a} only in A, {only_b} only in B")
    if a.num_rows != b.num_rows:
        diff.status = DIFFERENT
        diff.details.append(f"row counts differ: {a.num_rows:,} / {b.num_rows:,}")
        return diff
    if diff.status == DIFFERENT and any(d.startswith("keys") for d in diff.details):
        return diff  # rows do not line up: per-column counts would only repeat the key difference

    if order:
        fa, fb = fa.sort(order, nulls_last=True, maintain_order=True), fb.sort(order, nulls_last=True, maintain_order=True)
    for c in exact_cols:
        n = int(fa[c].ne_missing(fb[c]).sum())
        if n:
            diff.status = DIFFERENT
            diff.details.append(f"{c}: {n:,} of {a.num_rows:,} rows differ")
    if float_cols and a.num_rows:
        pos_a, pos_b = fa["__pos"].to_numpy(), fb["__pos"].to_numpy()
        worst = 0.0
        for c in float_cols:
            va, vb = _floats(a.column(c).take(pa.array(pos_a))), _floats(b.column(c).take(pa.array(pos_b)))
            if va.shape != vb.shape:
                diff.status = DIFFERENT
                diff.details.append(f"{c}: shapes differ ({va.shape} / {vb.shape})")
                continue
            nan_a, nan_b = np.isnan(va), np.isnan(vb)
            if (nan_a != nan_b).any():
                diff.status = DIFFERENT
                diff.details.append(f"{c}: NaN in different places")
            both = ~(nan_a | nan_b)
            d = float(np.max(np.abs(va[both] - vb[both]), initial=0.0))
            worst = max(worst, d)
            if d > atol:
                diff.status = DIFFERENT
                rows = np.abs(np.where(both, va - vb, 0.0)).reshape(len(va), -1).max(axis=1) > atol
                diff.details.append(f"{c}: {int(rows.sum()):,} of {a.num_rows:,} rows differ by more than {atol:g} (max {d:.2e})")
        diff.max_abs_diff = worst
        if diff.status == IDENTICAL and worst > 0:
            diff.status = WITHIN_TOLERANCE
    elif float_cols:
        diff.max_abs_diff = 0.0
    return diff


def diff_snapshots(a: SnapshotInfo, b: SnapshotInfo, atol: float = DEFAULT_ATOL) -> SnapshotDiff:
    """Every table of `a` and `b`, compared (see the module doc for what counts as the same)."""
    tables = []
    for name in sorted(set(a.tables) | set(b.tables)):
        if name not in b.tables:
            tables.append(TableDiff(name, ONLY_IN_A, (a.tables[name], None)))
        elif name not in a.tables:
            tables.append(TableDiff(name, ONLY_IN_B, (None, b.tables[name])))
        else:
            tables.append(compare_tables(name, pq.read_table(a.table_path(name)), pq.read_table(b.table_path(name)), atol))
    result = SnapshotDiff(a, b, atol, tables)
    ma, mb = a.manifest, b.manifest
    result.notes.append(f"runner {ma.get('runner')} / {mb.get('runner')}; data cutoff "
                        + ("equal" if ma.get("data_cutoff") == mb.get("data_cutoff") else f"{ma.get('data_cutoff')} / {mb.get('data_cutoff')}"))
    for key in ("model", "encoder", "templates", "parsers"):
        if ma.get(key) != mb.get(key):
            result.notes.append(f"{key} differs: {ma.get(key)} / {mb.get(key)}")
    return result
