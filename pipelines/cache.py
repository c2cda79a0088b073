"""Content-addressed generation cache (DESIGN.md §5).

Raw LLM outputs are stored by request key in small Parquet shards, each written to a temporary
name and renamed into place, so a kill at any moment leaves only whole shards. Resume is simply
"look up every key first": finished shards are never regenerated, an unfinished shard is regenerated
whole, and readers de-duplicate by key so an overlap after a crash can never duplicate a row.
Engine errors are not cached (the next run retries them); parse results are not cached either, so a
new parser re-parses cached raw text without any LLM call.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recaug.pipelines.crashpoints import crash_point
from recaug.pipelines.engines.base import FINISH_ERROR, GenerationResult

CACHE_SCHEMA = pa.schema(
    [
        pa.field("cache_key", pa.string(), nullable=False),
        pa.field("augmenter", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("raw_text", pa.string(), nullable=False),
        pa.field("input_tokens", pa.int32(), nullable=False),
        pa.field("output_tokens", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("latency_s", pa.float32(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def request_key(parts: dict[str, Any]) -> str:
    """sha256 over a canonical JSON of everything that changes the model's answer."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# rows per row group of the tables a run writes whole (pyarrow's default, a million rows, makes the
# writer hold a whole million-row table's encoded pages before it flushes them)
PARQUET_ROW_GROUP = 131_072


def write_parquet_atomic(table: pa.Table, path: Path, crash_at: str | None = None) -> None:
    """`crash_at` names the crash point (pipelines/crashpoints.py) between the write and the rename."""
    _write_atomic(path, lambda tmp: pq.write_table(table, tmp, row_group_size=PARQUET_ROW_GROUP), crash_at)


def concat_parquet_atomic(
    sources: list[Path], schema: pa.Schema, path: Path, crash_at: str | None = None, rows_per_group: int = 65_536
) -> None:
    """The rows of `sources` as one Parquet file, read a row group at a time and written in row groups
    of about `rows_per_group` rows (memory: one output row group, not the whole set)."""

    def write(tmp: Path) -> None:
        pending: list[pa.Table] = []
        rows = 0
        with pq.ParquetWriter(tmp, schema) as writer:
            for src in sources:
                pf = pq.ParquetFile(src)
                for i in range(pf.num_row_groups):
                    part = pf.read_row_group(i).cast(schema)
                    pending.append(part)
                    rows += part.num_rows
                    if rows >= rows_per_group:
                        writer.write_table(pa.concat_tables(pending))
                        pending, rows = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending))

    _write_atomic(path, write, crash_at)


def compact_shards(folder: Path, schema: pa.Schema, min_shards: int, crash_at: str | None = None) -> bool:
    """Merge the small Parquet shards of a cache folder into one, once there are `min_shards` of them.

    Earlier merges ("-compacted-" files) stay as they are, so the work is bounded by what was committed
    since the last compaction, and rows are copied a row group at a time, duplicates included. Safe
    under a kill: the merged shard is whole before any source is removed (`crash_at` fires after each
    removal). Also removes the temporary files of writes killed long ago."""
    remove_stale_temporaries(folder)
    shards = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".") and "-compacted-" not in p.name)
    if len(shards) < min_shards:
        return False
    name = f"{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S%f')}-compacted-{uuid.uuid4().hex[:8]}.parquet"
    concat_parquet_atomic(shards, schema, folder / name)
    for shard in shards:
        shard.unlink(missing_ok=True)
        if crash_at:
            crash_point(crash_at)
    return True


def _write_atomic(path: Path, write: Callable[[Path], None], crash_at: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if crash_at:
            crash_point(crash_at)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# A writer's temporary file lives for the seconds of one write; one this old was left by a killed process.
STALE_TEMPORARY_S = 3600.0


def remove_stale_temporaries(folder: Path, older_than_s: float = STALE_TEMPORARY_S) -> list[str]:
    """Delete what killed writers left in `folder`: hidden `.*.tmp` files and `.*.partial` folders older
    than `older_than_s`. Age, not a lock, tells a leftover from a write in progress, so this is safe
    while other processes (Beam workers, a second cache user) write into the same folder."""
    removed = []
    if not folder.is_dir():
        return removed
    horizon = time.time() - older_than_s
    for p in folder.iterdir():
        if not p.name.startswith("."):
            continue
        try:
            if p.stat().st_mtime >= horizon:
                continue
            if p.is_file() and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
            elif p.is_dir() and p.name.endswith(".partial"):
                shutil.rmtree(p, ignore_errors=True)
            else:
                continue
        except FileNotFoundError:
            continue  # its writer finished (renamed it) or another cleaner was first
        removed.append(p.name)
    return removed


@dataclass(frozen=True)
class CacheSink:
    """A picklable handle that lets a remote worker (Beam) commit finished shards itself."""

    root: str
    augmenter: str
    model: str

    def contains(self, keys: list[str] | pl.Series) -> pl.Series:
        """A boolean per key: is it in the cache? Reads only the `cache_key` column of shards it has
        not read before (other processes may add shards at any time; a vanished shard, e.g. after a
        compaction, makes it re-read all), and answers by binary search over the keys' first 60 bits
        (sorted integers) confirmed by comparing the whole key, so checking a chunk of keys does not
        scan the cache again. Keys that are not hex digests are compared as strings."""
        keys = pl.Series("cache_key", keys, dtype=pl.String)
        shards = set(self.shards())
        if not shards >= self._index_files:
            self._index_files, self._index = set(), []
        new = sorted(shards - self._index_files)
        if new:
            self._index.append(_KeyIndex(pl.scan_parquet(new).select("cache_key").collect()["cache_key"]))
            self._index_files |= set(new)
            if len(self._index) > 8:  # keep the number of searches per call small: merge all but the
                # largest piece (the keys found at the start), which is never rebuilt for a few new shards
                big = max(self._index, key=lambda piece: len(piece.keys))
                rest = [piece.keys for piece in self._index if piece is not big]
                self._index = [big, _KeyIndex(pl.concat(rest))]
        found = pl.Series("found", [False] * len(keys), dtype=pl.Boolean)
        for piece in self._index:
            found = found | piece.contains(keys)
        return found

    def commit(self, results: list[GenerationResult]) -> int:
        return GenerationCache(Path(self.root)).commit(results, self.augmenter, self.model)


class _KeyIndex:
    """Cache keys, unique and sorted by their first 60 bits (15 hex digits) as int64, for numpy's
    binary search; the whole key confirms a match. Two keys sharing 60 bits (about one pair in 10^6
    at 10^9 keys) can make one of them look absent: it is then generated again, never mistaken."""

    def __init__(self, keys: pl.Series):
        frame = pl.DataFrame({"key": keys.unique()}).with_columns(_prefix(pl.col("key")).alias("p"))
        self.hex = frame["p"].null_count() == 0
        frame = frame.sort("p" if self.hex else "key")
        self.keys = frame["key"]
        self.prefix = frame["p"].to_numpy() if self.hex else None

    def contains(self, keys: pl.Series) -> pl.Series:
        if not len(self.keys) or not len(keys):
            return pl.Series("found", [False] * len(keys), dtype=pl.Boolean)
        wanted = pl.DataFrame({"key": keys}).select(_prefix(pl.col("key")))["key"]
        if self.hex and wanted.null_count() == 0:
            at = np.searchsorted(self.prefix, wanted.to_numpy(), side="left").clip(0, len(self.keys) - 1)
        else:  # sorted by the whole key (not hex digests), or a query key that is not one
            keys_sorted = self.keys if not self.hex else self.keys.sort()
            at = keys_sorted.search_sorted(keys, side="left").clip(0, len(keys_sorted) - 1)
            return keys_sorted.gather(at) == keys
        return self.keys.gather(at) == keys


def _prefix(key: pl.Expr) -> pl.Expr:
    return key.str.slice(0, 15).str.to_integer(base=16, strict=False)


class GenerationCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.dir = self.root / "generations"
        self.dir.mkdir(parents=True, exist_ok=True)
        # which keys the shards hold: sorted pieces, one per batch of shards read (see `contains`)
        self._index_files: set[Path] = set()
        self._index: list[pl.Series] = []

    def sink(self, augmenter: str, model: str) -> CacheSink:
        return CacheSink(str(self.root), augmenter, model)

    def shards(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.parquet") if not p.name.startswith("."))

    def lookup(self, keys: Iterable[str]) -> pl.DataFrame:
        """Cached rows for the given keys (one per key: the first committed)."""
        keys = list(keys)
        shards = self.shards()
        if not keys or not shards:
            return pl.from_arrow(CACHE_SCHEMA.empty_table())
        wanted = pl.Series("cache_key", keys, dtype=pl.String).unique()
        found = (
            pl.scan_parquet(shards)
            .filter(pl.col("cache_key").is_in(wanted.implode()))
            .collect()
            .sort("created_at")
            .unique("cache_key", keep="first", maintain_order=True)
        )
        return found

    def contains(self, keys: list[str] | pl.Series) -> pl.Series:
        """A boolean per key: is it in the cache? Reads only the `cache_key` column of shards it has
        not read before (other processes may add shards at any time; a vanished shard, e.g. after a
        compaction, makes it re-read all), and answers by binary search over the keys' first 60 bits
        (sorted integers) confirmed by comparing the whole key, so checking a chunk of keys does not
        scan the cache again. Keys that are not hex digests are compared as strings."""
        keys = pl.Series("cache_key", keys, dtype=pl.String)
        shards = set(self.shards())
        if not shards >= self._index_files:
            self._index_files, self._index = set(), []
        new = sorted(shards - self._index_files)
        if new:
            self._index.append(_KeyIndex(pl.scan_parquet(new).select("cache_key").collect()["cache_key"]))
            self._index_files |= set(new)
            if len(self._index) > 8:  # keep the number of searches per call small: merge all but the
                # largest piece (the keys found at the start), which is never rebuilt for a few new shards
                big = max(self._index, key=lambda piece: len(piece.keys))
                rest = [piece.keys for piece in self._index if piece is not big]
                self._index = [big, _KeyIndex(pl.concat(rest))]
        found = pl.Series("found", [False] * len(keys), dtype=pl.Boolean)
        for piece in self._index:
            found = found | piece.contains(keys)
        return found

    def commit(self, results: list[GenerationResult], augmenter: str, model: str) -> int:
        """Write finished results as one shard; returns how many were stored (errors are not)."""
        ok = [r for r in results if r.finish_reason != FINISH_ERROR]
        if not ok:
            return 0
        now = dt.datetime.now(dt.timezone.utc)
        table = pa.table(
            {
                "cache_key": [r.key for r in ok],
                "augmenter": [augmenter] * len(ok),
                "model": [model] * len(ok),
                "raw_text": [r.text for r in ok],
                "input_tokens": [r.input_tokens for r in ok],
                "output_tokens": [r.output_tokens for r in ok],
                "finish_reason": [r.finish_reason for r in ok],
                "latency_s": [r.latency_s for r in ok],
                "created_at": [now] * len(ok),
            },
            schema=CACHE_SCHEMA,
        )
        name = f"{now.strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        write_parquet_atomic(table, self.dir / name, crash_at="generate.cache_write")
        crash_point("generate.shard_committed")
        return len(ok)

    def compact(self, min_shards: int = 64) -> bool:
        """Merge many small shards into one (see `compact_shards`); duplicates in between are
        de-duplicated by `lookup`, which keeps the first committed row per key."""
        return compact_shards(self.dir, CACHE_SCHEMA, min_shards, crash_at="generate.compact")
