"""Durable files: the one way recaug writes a file that readers may see.

Every write goes to a hidden temporary name beside its target, is fsynced, renamed into place and the
folder fsynced (one durability level for caches, run tables, snapshots and pointers), so a kill at any
moment leaves either the old file or the new one, never half of one. Killed writers leave only hidden
`.*.tmp` files (and `.*.partial` folders), which `remove_stale_temporaries` clears by age.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from recaug.core.crashpoints import crash_point


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_text_atomic(path: Path, text: str, crash_at: str | None = None) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    write_atomic(path, write, crash_at)


# rows per row group of the tables a run writes whole (pyarrow's default, a million rows, makes the
# writer hold a whole million-row table's encoded pages before it flushes them)
PARQUET_ROW_GROUP = 131_072


def write_parquet_atomic(table: pa.Table, path: Path, crash_at: str | None = None) -> None:
    """`crash_at` names the crash point (core/crashpoints.py) between the write and the rename."""
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, row_group_size=PARQUET_ROW_GROUP), crash_at)


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
                        writer.write_table(pa.concat_tables(pending), row_group_size=rows_per_group)
                        pending, rows = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=rows_per_group)

    write_atomic(path, write, crash_at)


def compact_shards(folder: Path, schema: pa.Schema, min_shards: int, crash_at: str | None = None,
                   rows_per_group: int = 65_536) -> bool:
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
    concat_parquet_atomic(shards, schema, folder / name, rows_per_group=rows_per_group)
    for shard in shards:
        shard.unlink(missing_ok=True)
        if crash_at:
            crash_point(crash_at)
    return True


def write_atomic(path: Path, write: Callable[[Path], None], crash_at: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        if crash_at:
            crash_point(crash_at)
        os.replace(tmp, path)
        fsync_dir(path.parent)
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
