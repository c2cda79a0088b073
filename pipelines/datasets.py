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

from recaug.pipelines.config import DatasetConfig, PipelineConfig, TableSource
from recaug.pipelines.packaged import ml100k_dir
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
    try:
        if fmt == "parquet":
            df = pl.read_parquet(path)
        else:
            # utf8-lossy: invalid bytes become U+FFFD, which the gate quarantines with a reason
            # instead of the whole file failing to load.
            df = pl.read_csv(
                path,
                separator="\t" if path.suffix.lower() == ".tsv" and src.csv_delimiter == "," else src.csv_delimiter,
                infer_schema=False,
                encoding="utf8-lossy",
            )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputSchemaError(f"{table}: cannot read {path}: {exc}") from None

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


def load_files(cfg: PipelineConfig) -> RawDataset:
    ds: DatasetConfig = cfg.dataset
    tables, sources = {}, {}
    for table in TABLES:
        src: TableSource = getattr(ds, table)
        tables[table] = _read_source(table, src, cfg)
        sources[table] = str(cfg.resolve_path(src.path))
        absent = [c for c in REQUIRED_COLUMNS[table] if c not in tables[table].column_names]
        if absent:
            raise InputSchemaError(
                f"{table}: required column(s) {absent} not found in {sources[table]}; map them with "
                f"dataset.{table}.columns (ours: theirs); the file has {tables[table].column_names}"
            )
    return RawDataset(tables=tables, list_separator=ds.items.list_separator, sources=sources)


def load_raw(cfg: PipelineConfig) -> RawDataset:
    if cfg.dataset.kind == "ml100k":
        return load_ml100k()
    return load_files(cfg)
