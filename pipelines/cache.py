"""Content-addressed generation cache (docs/architecture.md, "Contracts").

Raw LLM outputs are stored by request key in small Parquet shards, each written to a temporary
name and renamed into place, so a kill at any moment leaves only whole shards. Resume is simply
"look up every key first": finished shards are never regenerated, an unfinished shard is regenerated
whole, and readers de-duplicate by key so an overlap after a crash can never duplicate a row.
Engine errors are not cached (the next run retries them); parse results are not cached either, so a
new parser re-parses cached raw text without any LLM call.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recaug.core.crashpoints import crash_point
from recaug.core.hashing import json_sha256
from recaug.core.storage import compact_shards, write_parquet_atomic
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


# Rows per row group of a merged shard: a lookup decodes whole row groups, so a few keys cost a few
# groups of this size (at 65,536 rows, each looked-up key cost a decode of ~13 MB of answers).
COMPACTED_ROWS_PER_GROUP = 4_096


def request_key(parts: dict[str, Any]) -> str:
    """sha256 over a canonical JSON of everything that changes the model's answer."""
    return json_sha256(parts)


@dataclass(frozen=True)
class CacheSink:
    """A picklable handle that lets a remote worker (Beam) commit finished shards itself."""

    root: str
    augmenter: str
    model: str

    def commit(self, results: list[GenerationResult]) -> int:
        return GenerationCache(Path(self.root)).commit(results, self.augmenter, self.model)


class _KeyIndex:
    """Cache keys sorted by their first 60 bits (15 hex digits) as int64, for numpy's binary search;
    the whole key confirms a match. Two keys sharing 60 bits (about one pair in 10^6 at 10^9 keys) can
    make one of them look absent: it is then generated again, never mistaken. A key held twice (shards
    overlapping after a crash) is harmless, so keys are not de-duplicated (that was 3/4 of the build).
    Each key keeps where it is stored (`where`: shard number << 32 | row group), so a lookup reads
    the few row groups holding its keys instead of scanning every shard."""

    def __init__(self, keys: pl.Series, where: np.ndarray):
        frame = pl.DataFrame({"key": keys, "where": where}).with_columns(_prefix(pl.col("key")).alias("p"))
        self.hex = frame["p"].null_count() == 0
        frame = frame.sort("p" if self.hex else "key")
        self.keys = frame["key"]
        self.where = frame["where"].to_numpy()
        self.prefix = frame["p"].to_numpy() if self.hex else None

    def _query(self, keys: pl.Series) -> np.ndarray | None:
        """The query keys' prefixes when the index is sorted by prefix and every key is a hex digest."""
        if not self.hex:
            return None
        wanted = pl.DataFrame({"key": keys}).select(_prefix(pl.col("key")))["key"]
        return wanted.to_numpy() if wanted.null_count() == 0 else None

    def _candidates(self, keys: pl.Series, query: np.ndarray | None, side: str) -> np.ndarray:
        """Where each query key would sit in the sorted index (an index sorted by whole keys, or a
        prefix query); the caller has ruled out a non-hex query on a prefix-sorted index."""
        if query is not None:
            return np.searchsorted(self.prefix, query, side=side).astype(np.int64)
        return self.keys.search_sorted(keys, side=side).to_numpy().astype(np.int64)

    def contains(self, keys: pl.Series) -> pl.Series:
        if not len(self.keys) or not len(keys):
            return pl.Series("found", [False] * len(keys), dtype=pl.Boolean)
        query = self._query(keys)
        if query is None and self.hex:  # sorted by prefix, but a query key is not a hex digest
            keys_sorted = self.keys.sort()
            at = keys_sorted.search_sorted(keys, side="left").clip(0, len(keys_sorted) - 1)
            return keys_sorted.gather(at) == keys
        return self.keys.gather(self._candidates(keys, query, "left").clip(0, len(self.keys) - 1)) == keys

    def locations(self, keys: pl.Series) -> np.ndarray:
        """`where` of every stored copy of the given keys (duplicates included: a lookup keeps the
        first committed), or None when the keys cannot be searched (then the caller scans)."""
        if not len(self.keys) or not len(keys):
            return np.empty(0, np.int64)
        query = self._query(keys)
        if query is None and self.hex:
            return None
        lo, hi = self._candidates(keys, query, "left"), self._candidates(keys, query, "right")
        counts = hi - lo  # entries sharing the query's prefix: almost always 0 or 1
        n = int(counts.sum())
        if not n:
            return np.empty(0, np.int64)
        starts = np.repeat(lo, counts)
        offsets = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
        at = starts + offsets
        same = (self.keys.gather(at) == keys.gather(np.repeat(np.arange(len(keys)), counts))).to_numpy()
        return self.where[at[same]]


def _prefix(key: pl.Expr) -> pl.Expr:
    return key.str.slice(0, 15).str.to_integer(base=16, strict=False)


class GenerationCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.dir = self.root / "generations"
        self.dir.mkdir(parents=True, exist_ok=True)
        # which keys the shards hold: sorted pieces, one per batch of shards read (see `contains`)
        self._index_files: set[str] = set()  # shard file names
        self._index: list[_KeyIndex] = []
        self._files: list[tuple[Path, pq.FileMetaData]] = []  # shard number -> (path, its footer)

    def sink(self, augmenter: str, model: str) -> CacheSink:
        return CacheSink(str(self.root), augmenter, model)

    def shards(self) -> list[Path]:
        return [self.dir / name for name in self._shard_names()]

    def _shard_names(self) -> list[str]:
        # names, not Paths: a 1% changed re-run at 1M entities lists ~1,400 shards ~300 times, and
        # sorting Paths (pathlib's comparisons) took 2.4 s of its 21 s
        with os.scandir(self.dir) as entries:
            return sorted(e.name for e in entries if e.name.endswith(".parquet") and not e.name.startswith("."))

    def lookup(self, keys: Iterable[str]) -> pl.DataFrame:
        """Cached rows for the given keys (one per key: the first committed). Reads only the row
        groups the key index places them in; scans every shard when it cannot (a shard vanished in
        between, e.g. compacted by another process)."""
        keys = list(keys)
        if not keys:
            return pl.from_arrow(CACHE_SCHEMA.empty_table())
        wanted = pl.Series("cache_key", keys, dtype=pl.String).unique()
        self._refresh()
        if not self._files:
            return pl.from_arrow(CACHE_SCHEMA.empty_table())
        found = self._read_located(wanted)
        if found is None:
            shards = self.shards()
            if not shards:
                return pl.from_arrow(CACHE_SCHEMA.empty_table())
            found = pl.scan_parquet(shards).filter(pl.col("cache_key").is_in(wanted.implode())).collect()
        return found.sort("created_at", maintain_order=True).unique("cache_key", keep="first", maintain_order=True)

    def _read_located(self, wanted: pl.Series) -> pl.DataFrame | None:
        places = []
        for piece in self._index:
            where = piece.locations(wanted)
            if where is None:
                return None
            places.append(where)
        where = np.unique(np.concatenate(places)) if places else np.empty(0, np.int64)
        tables = []
        try:
            for shard in np.unique(where >> 32):
                path, meta = self._files[int(shard)]
                groups = (where[(where >> 32) == shard] & 0xFFFFFFFF).tolist()
                with pq.ParquetFile(path, metadata=meta) as shard_file:
                    table = shard_file.read_row_groups(groups, use_threads=False)
                tables.append(table.select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA))
        except (OSError, pa.ArrowException):
            return None
        if not tables:
            return pl.from_arrow(CACHE_SCHEMA.empty_table())
        rows = pl.from_arrow(pa.concat_tables(tables))
        return rows.filter(pl.col("cache_key").is_in(wanted.implode()))

    def _refresh(self) -> None:
        """Bring the key index up to date: read the `cache_key` column (and footer) of shards not read
        before; a vanished shard (e.g. after a compaction) makes it re-read all."""
        names = set(self._shard_names())
        if not names >= self._index_files:
            self._index_files, self._index, self._files = set(), [], []
        new_names = sorted(names - self._index_files)
        if not new_names:
            return
        new = [self.dir / name for name in new_names]
        where, files = [], []
        for path in new:  # taken into the index only once every new shard was read
            meta = pq.read_metadata(path)
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            number = len(self._files) + len(files)
            files.append((path, meta))
            where.append(np.repeat((number << 32) | np.arange(len(sizes), dtype=np.int64), sizes))
        keys = pl.scan_parquet(new).select("cache_key").collect()["cache_key"]
        self._index.append(_KeyIndex(keys, np.concatenate(where)))
        self._files.extend(files)
        self._index_files |= set(new_names)
        if len(self._index) > 8:  # keep the number of searches per call small: merge all but the
            # largest piece (the keys found at the start), which is never rebuilt for a few new shards
            big = max(self._index, key=lambda piece: len(piece.keys))
            rest = [piece for piece in self._index if piece is not big]
            self._index = [big, _KeyIndex(pl.concat([p.keys for p in rest]), np.concatenate([p.where for p in rest]))]

    def contains(self, keys: list[str] | pl.Series) -> pl.Series:
        """A boolean per key: is it in the cache? Reads only the `cache_key` column of shards it has
        not read before (other processes may add shards at any time; a vanished shard, e.g. after a
        compaction, makes it re-read all), and answers by binary search over the keys' first 60 bits
        (sorted integers) confirmed by comparing the whole key, so checking a chunk of keys does not
        scan the cache again. Keys that are not hex digests are compared as strings."""
        keys = pl.Series("cache_key", keys, dtype=pl.String)
        self._refresh()
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
        return compact_shards(self.dir, CACHE_SCHEMA, min_shards, crash_at="generate.compact",
                              rows_per_group=COMPACTED_ROWS_PER_GROUP)
