"""Tables built a piece at a time, kept on disk instead of in memory.

The long job's outputs (generated texts with their prompts, embedding vectors) grow with the
catalogue: at a million entities they are over a GB of Arrow buffers. `TableParts` collects the
pieces a stage produces (a chunk of entities, a slice of vectors). With a folder it appends each
piece to an Arrow IPC file as it comes and frees it, and `table()` hands back one table memory-mapped
from that file: zero-copy, so encode, the output gate and publish read it like any table, but its
pages are the page cache's (clean, file-backed, dropped by the kernel under pressure), not the job's
heap. Without a folder the pieces stay in memory (small runs, tests).

The file is anonymous (`tempfile.TemporaryFile`: unlinked from the start), so a killed run leaves
nothing behind, and it lives in a folder of the workdir, not /tmp, which may be RAM (tmpfs).
"""

from __future__ import annotations

import mmap
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc


class TableParts:
    """Pieces of one table with a fixed schema, in order; `table()` joins them.

    `sort_by` names the column the whole table is sorted on: pieces that cover ascending, disjoint
    ranges of it (the stage's chunks do) are joined as they are; otherwise `table()` re-orders the
    rows as one piece would have been sorted (a spilled table into a new spill, a block at a time).
    """

    def __init__(self, schema: pa.Schema, sort_by: str | None = None, folder: Path | None = None):
        self.schema, self.sort_by, self.folder = schema, sort_by, folder
        self.rows = 0
        self._in_memory: list[pa.Table] = []
        self._file = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._last = None
        self.in_order = True
        self._done: pa.Table | None = None

    def append(self, table: pa.Table) -> None:
        if self._done is not None:
            raise RuntimeError("TableParts.table() was already called; no more pieces can be added")
        if not table.num_rows:
            return
        table = table.cast(self.schema) if table.schema != self.schema else table
        if self.sort_by is not None:
            column = table.column(self.sort_by)
            if self._last is not None and not self._last < column[0].as_py():
                self.in_order = False
            self._last = column[-1].as_py()
        self.rows += table.num_rows
        if self.folder is None:
            self._in_memory.append(table)
            return
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=self.folder, prefix=".spill-", suffix=".tmp")
            self._writer = pa.ipc.new_file(self._file, self.schema)
        self._writer.write_table(table)

    def table(self) -> pa.Table:
        """The whole table (memory-mapped when spilled); call once, after the last piece."""
        if self._done is not None:
            return self._done
        if self._writer is not None:
            self._writer.close()
            self._file.flush()
            mapped = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._file.close()  # the mapping keeps the (unlinked) file's pages reachable
            whole = pa.ipc.open_file(pa.py_buffer(mapped)).read_all()
        elif self._in_memory:
            whole = pa.concat_tables(self._in_memory)
        else:
            whole = self.schema.empty_table()
        self._in_memory = []
        if not self.in_order and self.sort_by is not None:
            whole = self._sorted(whole)
        self._done = whole
        return whole

    def _sorted(self, whole: pa.Table) -> pa.Table:
        """`whole` in the order one sorted piece would have (see `frame_to_table`): the sort looks at
        the key columns only, and a spilled table is copied into a new spill a block of rows at a
        time, so sorting does not bring it into memory."""
        keys = _sort_keys(self.schema.names, self.sort_by)
        order = pc.sort_indices(whole.select(keys), sort_keys=[(k, "ascending") for k in keys])
        if self.folder is None:
            return whole.take(order)
        out = TableParts(self.schema, folder=self.folder)
        for start in range(0, len(order), SORT_BLOCK):
            out.append(whole.take(order.slice(start, SORT_BLOCK)))
        return out.table()


# rows per block when a spilled table is re-ordered
SORT_BLOCK = 100_000


def _sort_keys(columns: list[str], sort_by: str) -> list[str]:
    return [sort_by] + [c for c in ("item_id", "cache_key") if c in columns and c != sort_by]


def frame_to_table(df: pl.DataFrame | None, schema: pa.Schema, sort_by: str) -> pa.Table:
    """`df` as a table of `schema`, sorted on `sort_by` with ties broken by item_id and cache_key where
    present: the order every table of the augmentation stage has, however it was built."""
    if df is None or df.height == 0:
        return schema.empty_table()
    df = df.select(schema.names).sort(_sort_keys(df.columns, sort_by))
    return df.to_arrow().select(schema.names).cast(schema)


def spill_folder(workdir: Path) -> Path:
    """Where a pipeline's spilled tables live while a run builds them (anonymous files only)."""
    return Path(workdir) / "tmp"
