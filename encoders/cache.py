"""Content-addressed encoding cache: (encoder_id, sha256 of the text) -> vector.

One folder per encoder id (a hash of it, the full id is in every shard's metadata) holding Parquet
shards of (text_hash, vector). A shard is written under a temporary name, fsynced and renamed, so a
kill leaves only whole shards; readers skip temporary names. The same text under the same encoder
is never encoded twice, whichever augmenter or run it came from.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from recaug.schemas.vectors import fixed_size_vectors, vectors_numpy
from recaug.core.storage import compact_shards, write_parquet_atomic
from recaug.core.crashpoints import crash_point


def text_hashes(texts: Sequence[str]) -> list[str]:
    return [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]


def shard_schema(dim: int, encoder_id: str) -> pa.Schema:
    return pa.schema(
        [pa.field("text_hash", pa.string(), nullable=False), pa.field("vector", pa.list_(pa.float32(), dim), nullable=False)],
        metadata={"recaug.encoder": encoder_id, "recaug.dim": str(dim)},
    )


class EncodingCache:
    """Counters `hits` / `misses` count distinct texts over this object's life."""

    def __init__(self, root: Path, encoder_id: str, dim: int):
        self.root = Path(root)
        self.encoder_id = encoder_id
        self.dim = dim
        self.dir = self.root / hashlib.sha256(encoder_id.encode()).hexdigest()[:20]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def shards(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.parquet") if not p.name.startswith("."))

    def lookup(self, hashes: Sequence[str]) -> pa.Table:
        """Cached (text_hash, vector) rows for the given hashes, one row per hash found."""
        schema = shard_schema(self.dim, self.encoder_id)
        shards = self.shards()
        if not shards or not hashes:
            return schema.empty_table()
        try:
            dataset = pads.dataset([str(p) for p in shards], format="parquet", schema=schema)
            # one shard's row group at a time: the default read-ahead decoded up to 4 shards x 16
            # batches at once, a transient that grew with the cache (+280 MB at a million vectors)
            found = dataset.to_table(filter=pc.field("text_hash").isin(pa.array(hashes, pa.string())),
                                     batch_readahead=1, fragment_readahead=1, use_threads=False)
        except (pa.ArrowInvalid, OSError) as exc:
            raise RuntimeError(
                f"the encoding cache {self.dir} has an unreadable shard ({exc}); delete that folder to rebuild it "
                "(vectors are recomputed on the next run)"
            ) from exc
        if found.num_rows == 0:
            return schema.empty_table()
        # the same text can sit in two shards after a crash between a write and compaction
        first = pc.index_in(pa.array(hashes, pa.string()), value_set=found.column("text_hash"))
        keep = pc.unique(first.drop_null())
        return found.take(keep).combine_chunks()

    def commit(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        if not len(hashes):
            return
        table = pa.Table.from_arrays(
            [pa.array(hashes, pa.string()), fixed_size_vectors(vectors)], schema=shard_schema(self.dim, self.encoder_id)
        )
        name = f"{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        write_parquet_atomic(table, self.dir / name, crash_at="encode.cache_write")
        crash_point("encode.cache_committed")

    def get_or_encode(
        self, texts: Sequence[str] | pa.Array | pa.ChunkedArray, encode: Callable[[list[str]], np.ndarray]
    ) -> tuple[np.ndarray, list[str]]:
        """Vectors for `texts` (rows in input order) and their hashes; only unseen texts reach `encode`."""
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        texts_arr = texts if isinstance(texts, pa.Array) else pa.array(list(texts), pa.string())
        hashes = text_hashes(texts_arr.to_pylist())
        if not hashes:
            return np.zeros((0, self.dim), dtype=np.float32), hashes
        hash_arr = pa.array(hashes, pa.string())
        unique = pc.unique(hash_arr)
        cached = self.lookup(unique.to_pylist())
        missing_mask = pc.invert(pc.is_in(unique, value_set=cached.column("text_hash")))
        missing = unique.filter(missing_mask)
        self.hits += cached.num_rows
        self.misses += len(missing)
        if len(missing):
            # the first row carrying each missing hash supplies the text
            first_row = pc.index_in(missing, value_set=hash_arr)
            new_vectors = encode(texts_arr.take(first_row).to_pylist())
            if new_vectors.shape != (len(missing), self.dim):
                raise ValueError(f"encoder returned shape {new_vectors.shape}, expected {(len(missing), self.dim)}")
            self.commit(missing.to_pylist(), new_vectors)
            known_hashes = pa.concat_arrays([cached.column("text_hash").combine_chunks(), missing])
            known_vectors = np.concatenate([vectors_numpy(cached), new_vectors.astype(np.float32, copy=False)])
        else:
            known_hashes = cached.column("text_hash").combine_chunks()
            known_vectors = vectors_numpy(cached)
        row_of = pc.index_in(hash_arr, value_set=known_hashes).to_numpy(zero_copy_only=False)
        return np.ascontiguousarray(known_vectors[row_of], dtype=np.float32), hashes

    def compact(self, min_shards: int = 32) -> bool:
        """Merge many small shards into one (see `compact_shards`); `lookup` keeps one vector per text."""
        return compact_shards(self.dir, shard_schema(self.dim, self.encoder_id), min_shards)
