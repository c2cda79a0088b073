"""numpy <-> Arrow for vector columns (`fixed_size_list<float32>[d]`), without copies where possible.

`vectors_numpy` returns a view of the Arrow child buffer (no copy) when the column is one chunk
without nulls and holds float32: that is the case for a table freshly read from a Parquet file of
one row group (pyarrow writes up to 1 Mi rows per row group) and for a polars DataFrame read from
it (polars reads the column as `Array(Float32, d)`). A copy happens, and only then, when
  - the column has several chunks (several row groups, `concat_tables`, polars `vstack`),
  - the column has nulls (null rows come back as all-NaN rows so the row count stays aligned),
  - the values are not float32 (they are cast).
The view is read-only: Arrow buffers are immutable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def fixed_size_vectors(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) numpy -> `fixed_size_list<float32>[d]`, sharing the numpy buffer when it is float32 C-contiguous."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be a 2-d array (n, d), got shape {vectors.shape}")
    n, d = vectors.shape
    if d == 0:
        raise ValueError("vectors must have at least one dimension")
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), d)


def _as_arrow_column(obj: Any, column: str) -> pa.ChunkedArray | pa.Array:
    if isinstance(obj, (pa.Array, pa.ChunkedArray)):
        return obj
    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        if column not in obj.schema.names:
            raise KeyError(f"no column {column!r}; columns are {obj.schema.names}")
        return obj.column(column)
    try:
        import polars as pl
    except ImportError:  # pragma: no cover - polars is a hard dependency
        pl = None
    if pl is not None and isinstance(obj, (pl.DataFrame, pl.Series)):
        series = obj if isinstance(obj, pl.Series) else obj.get_column(column)
        # polars exports its Array buffers to Arrow without copying (one chunk, no nulls)
        return series.to_arrow()
    raise TypeError(f"expected a pyarrow Table/Array or a polars DataFrame/Series, got {type(obj).__name__}")


def _chunk_numpy(chunk: pa.Array) -> np.ndarray:
    if not pa.types.is_fixed_size_list(chunk.type):
        raise TypeError(f"vector column must be fixed_size_list<float32>[d], got {chunk.type}")
    d = chunk.type.list_size
    if chunk.null_count:
        # a null row's child slots may hold anything: fill with NaN so nothing passes for a vector
        flat = chunk.flatten()  # skips null rows
        out = np.full((len(chunk), d), np.nan, dtype=np.float32)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        out[valid] = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, d)
        return out
    flat = chunk.flatten()  # a zero-copy slice of the child that honours the chunk's offset
    if flat.null_count:
        return flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(chunk), d)
    if flat.type != pa.float32():
        return flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(chunk), d)
    return flat.to_numpy(zero_copy_only=True).reshape(len(chunk), d)


def vectors_numpy(obj: Any, column: str = "vector") -> np.ndarray:
    """An (n, d) float32 array of a vector column; a zero-copy view when possible (see module doc)."""
    col = _as_arrow_column(obj, column)
    if isinstance(col, pa.ChunkedArray):
        if not pa.types.is_fixed_size_list(col.type):
            raise TypeError(f"vector column must be fixed_size_list<float32>[d], got {col.type}")
        if col.num_chunks == 1:
            return _chunk_numpy(col.chunk(0))
        if col.num_chunks == 0:
            return np.zeros((0, col.type.list_size), dtype=np.float32)
        return np.concatenate([_chunk_numpy(c) for c in col.chunks])
    return _chunk_numpy(col)


def vector_dim(field_type: pa.DataType) -> int:
    if not pa.types.is_fixed_size_list(field_type):
        raise TypeError(f"vector column must be fixed_size_list<float32>[d], got {field_type}")
    return field_type.list_size
