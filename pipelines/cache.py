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


class GenerationCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.dir = self.root / "generations"
        self.dir.mkdir(parents=True, exist_ok=True)

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
