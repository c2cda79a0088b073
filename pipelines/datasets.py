"""Dataset loaders: MovieLens-100K from the installed recbole package, or bring-your-own files.

Loaders only read and rename; they never coerce values. Every value goes to the input gate as it
was in the source (CSV columns as strings) so that a bad value becomes a quarantine row with its
reason instead of a crash or a silent NULL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from recaug.core.config import DatasetConfig, PipelineConfig, TableSource
from recaug.core.packaged import ml100k_dir
from recaug.schemas import ITEMS, REQUIRED_COLUMNS, USERS, INTERACTIONS
from recaug.schemas.input_gate import InputSchemaError

TABLES = ("users", "items", "interactions")
_KNOWN_COLUMNS = {"users": USERS.names, "items": ITEMS.names, "interactions": INTERACTIONS.names}


@dataclass
class RawDataset:
    tables: dict[str, pa.Table]  # our column names, source types
    list_separator: str  # how a text genres column is split
    sources: dict[str, str]  # table -> where it came from (for reports)


def _read_recbole(path: Path, rename: dict[str, str]) -> pa.Table:
    # recbole atomic files: tab-separated, header "name:type"; read everything as text so the
    # gate sees exactly what the file holds.
    df = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None)
    df = df.rename({c: c.split(":", 1)[0] for c in df.columns})
    return df.select([pl.col(src).alias(dst) for src, dst in rename.items()]).to_arrow()


def load_ml100k() -> RawDataset:
    root = ml100k_dir()
    files = {t: root / f"ml-100k.{ext}" for t, ext in (("users", "user"), ("items", "item"), ("interactions", "inter"))}
    users = _read_recbole(
        files["users"],
        {"user_id": "user_id", "age": "age", "gender": "gender", "occupation": "occupation", "zip_code": "region"},
    )
    items = _read_recbole(
        files["items"],
        {"item_id": "item_id", "movie_title": "title", "release_year": "year", "class": "genres"},
    )
    interactions = _read_recbole(
        files["interactions"],
        {"user_id": "user_id", "item_id": "item_id", "rating": "rating", "timestamp": "timestamp"},
    )
    # The packaged item file has two known defects in the optional year: item 267 reads 'unkonwn'
    # and item 1412 'V' (a leftover of the original "(V)" title suffix). A year is optional, so for
    # this dataset they are read as unknown instead of quarantining the items and their ratings.
    items = pl.from_arrow(items).with_columns(
        pl.when(pl.col("year").str.contains(r"^\d{4}$")).then(pl.col("year")).otherwise(None).alias("year")
    ).to_arrow()
    # genres are space-separated tokens there ("Children's", "Sci-Fi" and "Film-Noir" have no spaces)
    return RawDataset(
        tables={"users": users, "items": items, "interactions": interactions},
        list_separator=" ",
        sources={t: str(p) for t, p in files.items()},
    )


def _read_source(table: str, src: TableSource, cfg: PipelineConfig) -> pa.Table:
    path = cfg.resolve_path(src.path)
    if not path.exists():
        raise InputSchemaError(f"{table}: file not found: {path}")
    fmt = src.format or {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv"}.get(
        path.suffix.lower()
    )
    if fmt is None:
        raise InputSchemaError(f"{table}: cannot tell the format of {path}; set dataset.{table}.format to parquet or csv")
    separator = "\t" if path.suffix.lower() == ".tsv" and src.csv_delimiter == "," else src.csv_delimiter
    try:
        if fmt == "parquet":
            df = pl.read_parquet(path)
        else:
            # utf8-lossy: invalid bytes become U+FFFD, which the gate quarantines with a reason
            # instead of the whole file failing to load.
            df = pl.read_csv(path, separator=separator, infer_schema=False, encoding="utf8-lossy")
    except (pl.exceptions.PolarsError, OSError) as exc:
        why = _csv_problem(path, separator) if fmt == "csv" else None
        # polars' own advice names polars options, not ours: keep its first line only
        raise InputSchemaError(f"{table}: cannot read {path}: {why or str(exc).strip().splitlines()[0]}") from None

    unknown = sorted(set(src.columns) - set(_KNOWN_COLUMNS[table]))
    if unknown:
        raise InputSchemaError(
            f"dataset.{table}.columns maps unknown column(s) {unknown}; ours are {list(_KNOWN_COLUMNS[table])}"
        )
    missing = sorted({theirs for theirs in src.columns.values() if theirs not in df.columns})
    if missing:
        raise InputSchemaError(
            f"{table}: {path.name} has no column(s) {missing} named in dataset.{table}.columns; "
            f"its columns are {df.columns}"
        )
    # ours <- theirs; unmapped columns that already carry one of our names are taken as they are
    select = [pl.col(theirs).alias(ours) for ours, theirs in src.columns.items()]
    select += [pl.col(ours) for ours in _KNOWN_COLUMNS[table] if ours not in src.columns and ours in df.columns]
    out = df.select(select)
    absent = [c for c in REQUIRED_COLUMNS[table] if c not in out.columns]
    if absent:
        # name the file's own columns (not what was selected from them) and the likely cause
        raise InputSchemaError(
            f"{table}: required column(s) {absent} not found in {path}; map them with dataset.{table}.columns "
            f"(ours: theirs); the file has {df.columns}{_header_hint(table, df.columns, fmt, src)}"
        )
    if table == "interactions" and src.timestamp_format and "timestamp" in out.columns and out["timestamp"].dtype == pl.String:
        # a parse failure stays the original string so the gate quarantines it with the value
        parsed = out["timestamp"].str.strptime(pl.Datetime("us", "UTC"), src.timestamp_format, strict=False)
        out = out.with_columns(
            pl.when(parsed.is_not_null())
            .then(parsed.dt.epoch("s").cast(pl.String))
            .otherwise(pl.col("timestamp"))
            .alias("timestamp")
        )
    return out.to_arrow()


def _csv_problem(path: Path, separator: str) -> str | None:
    """Say which line breaks a CSV that polars refused (only on that error path: it reads the file)."""
    import csv

    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        rows = csv.reader(fh, delimiter=separator)
        header = next(rows, None)
        if header is None:
            return "the file is empty (not even a header line)"
        for n, row in enumerate(rows):
            if len(row) > len(header):
                return (
                    f"data line {n} (0-based, after the header) has {len(row)} fields but the header has "
                    f"{len(header)}: a {separator!r} inside an unquoted value? quote that value or fix the line"
                )
    return None


def _header_hint(table: str, columns: list[str], fmt: str, src: TableSource) -> str:
    """Why a header lacks our columns, when the header itself says: bytes that are not UTF-8
    (a Latin-1 or UTF-16 export), or a single column holding another delimiter."""
    if any("\ufffd" in c or "\x00" in c for c in columns):
        return "; the header holds bytes that are not UTF-8: save the file as UTF-8"
    if fmt == "csv" and len(columns) == 1:
        for sep in (";", "\t", "|", ","):
            if sep != src.csv_delimiter and sep in columns[0]:
                return f"; the header looks {sep!r}-separated: set dataset.{table}.csv_delimiter to {sep!r}"
    return ""


def load_files(cfg: PipelineConfig) -> RawDataset:
    ds: DatasetConfig = cfg.dataset
    tables, sources = {}, {}
    for table in TABLES:
        src: TableSource = getattr(ds, table)
        tables[table] = _read_source(table, src, cfg)  # raises when a required column is absent
        sources[table] = str(cfg.resolve_path(src.path))
    return RawDataset(tables=tables, list_separator=ds.items.list_separator, sources=sources)


def load_raw(cfg: PipelineConfig) -> RawDataset:
    if cfg.dataset.kind == "ml100k":
        return load_ml100k()
    return load_files(cfg)
