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
    overlapping after a crash) is harmless, so keys are not de-duplicated (that was 3/4 of the build)."""

    def __init__(self, keys: pl.Series):
        frame = pl.DataFrame({"key": keys}).with_columns(_prefix(pl.col("key")).alias("p"))
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
