"""Immutable feature snapshots with an atomic publish (docs/architecture.md, "Contracts").

Layout under a snapshot root (`<workdir>/snapshots` for a pipeline, see `snapshot_root`):

    LATEST                      the id of the newest committed snapshot (one line)
    <id>/manifest.json          lineage, table list with row counts and file hashes, data_cutoff
    <id>/<table name>.parquet   e.g. embeddings/kar_user_preference.parquet
    _pins/<id>/<key>.json       a pin: this snapshot is never deleted by retention
    .publish.lock               flock held while publishing, pinning or cleaning
    .tmp-<id>/ , .trash-<id>/   leftovers of a killed publish / retention; never listed, removed later

Commit protocol (one publisher at a time, under the lock):
  1. write every table and then manifest.json into `.tmp-<id>/`, fsync each file and folder;
  2. `rename(.tmp-<id>, <id>)` and fsync the root: the snapshot folder appears whole;
  3. write `LATEST` to a temporary file, fsync, `os.replace` it over `LATEST`, fsync the root.
Step 3 is the commit point. Ids grow monotonically, so a snapshot is committed iff its id is
<= the id in LATEST; a folder renamed in step 2 whose LATEST update never happened has a larger id
and is invisible to readers (and deleted by the next publish). A SIGKILL anywhere therefore leaves
`latest` on the old or the new complete snapshot; the kernel drops the flock with the process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from recaug.core.hashing import file_sha256
from recaug.core.locking import exclusive_lock
from recaug.core.timeparse import to_unix_seconds
from recaug.core.storage import PARQUET_ROW_GROUP, fsync_dir, fsync_file, write_text_atomic
from recaug.core.crashpoints import crash_point
from recaug.core.memory import release_memory
from recaug.core.errors import Locked, UsageError

FORMAT_VERSION = 1
LATEST_FILE = "LATEST"
MANIFEST_FILE = "manifest.json"
PINS_DIR = "_pins"
LOCK_FILE = ".publish.lock"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
SNAPSHOT_ID_RE = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{8}$")  # 20261122T101530123456Z-1a2b3c4d
TABLE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
RESERVED_MANIFEST_KEYS = ("snapshot_id", "created_at", "tables", "format_version", "data_cutoff_iso")
# test seam: the publishing process SIGKILLs itself at the named step (see tests/test_snapshots.py);
# RECAUG_CRASH_AT=publish.<step> does the same (core/crashpoints.py)
CRASH_ENV = "RECAUG_SNAPSHOT_CRASH_AT"
CRASH_POINTS = ("locked", "first_table", "tables_written", "manifest_written", "renamed", "committed", "retention")


T = TypeVar("T")


class SnapshotNotFound(UsageError, LookupError):
    """No such published snapshot (exit 2)."""


class SnapshotLocked(Locked, TimeoutError):
    """Another publish held the snapshot root's lock for too long (exit 6)."""


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    path: Path
    created_at: str
    data_cutoff: int  # unix seconds: the as-of time of the data the snapshot was built from
    tables: dict[str, int]  # table name -> rows
    pinned: bool = False
    removed_by_retention: tuple[str, ...] = field(default=())  # set on the result of publish_snapshot

    def table_path(self, name: str) -> Path:
        if name not in self.tables:
            raise KeyError(f"snapshot {self.snapshot_id} has no table {name!r}; it has {sorted(self.tables)}")
        return self.path / f"{name}.parquet"

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST_FILE).read_text())


def snapshot_root(cfg) -> Path:
    """Where a pipeline's snapshots live."""
    return cfg.workdir_path() / "snapshots"


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    crash_point(f"publish.{step}")


@contextlib.contextmanager
def _locked(root: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock on the root; released by the kernel if the holder dies."""

    def busy(path: Path, holder: str) -> SnapshotLocked:
        return SnapshotLocked(
            f"{path} is held by {holder} for more than {timeout:.0f} s; another publish is running "
            "(wait for it, or pass a longer lock_timeout)"
        )

    with exclusive_lock(root / LOCK_FILE, wait=timeout, busy=busy):
        yield


# --- ids, cutoffs, reading ------------------------------------------------------------------------


def _id_time(snapshot_id: str) -> dt.datetime:
    return dt.datetime.strptime(snapshot_id[:21], "%Y%m%dT%H%M%S%f").replace(tzinfo=dt.timezone.utc)


def new_snapshot_id(after: str | None = None) -> str:
    """UTC time to the microsecond + 8 random hex digits; strictly greater than `after`."""
    now = dt.datetime.now(dt.timezone.utc)
    if after is not None:
        floor = _id_time(after) + dt.timedelta(microseconds=1)
        now = max(now, floor)  # a clock that stepped back must not reorder snapshots
    return f"{now.strftime('%Y%m%dT%H%M%S%f')}Z-{uuid.uuid4().hex[:8]}"


def _iso(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_latest(root: Path) -> str | None:
    try:
        text = (root / LATEST_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return text if SNAPSHOT_ID_RE.match(text) else None


def _pinned_ids(root: Path) -> set[str]:
    pins = root / PINS_DIR
    if not pins.is_dir():
        return set()
    return {p.name for p in pins.iterdir() if p.is_dir() and any(p.glob("*.json"))}


def _committed_ids(root: Path) -> list[str]:
    latest = _read_latest(root)
    if latest is None or not root.is_dir():
        return []
    ids = [p.name for p in root.iterdir() if SNAPSHOT_ID_RE.match(p.name) and p.name <= latest]
    return sorted(i for i in ids if (root / i / MANIFEST_FILE).is_file())


def _info(root: Path, snapshot_id: str, pinned: set[str]) -> SnapshotInfo:
    path = root / snapshot_id
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    return SnapshotInfo(
        snapshot_id=snapshot_id,
        path=path,
        created_at=manifest["created_at"],
        data_cutoff=int(manifest["data_cutoff"]),
        tables={name: int(t["rows"]) for name, t in manifest["tables"].items()},
        pinned=snapshot_id in pinned,
    )


def list_snapshots(root: Path) -> list[SnapshotInfo]:
    """Committed snapshots, oldest first. Leftovers of killed publishes are never listed, and neither
    is a snapshot that retention removes while it is being listed."""
    root = Path(root)
    pinned = _pinned_ids(root)
    out = []
    for snapshot_id in _committed_ids(root):
        try:
            out.append(_info(root, snapshot_id, pinned))
        except FileNotFoundError:
            continue  # retired by a concurrent publish between the directory listing and this read
    return out


# how often a reader of `latest` starts over when publishes retire the snapshot it is reading
LATEST_READ_ATTEMPTS = 20


def resolve_snapshot(root: Path, snapshot: str = "latest") -> SnapshotInfo:
    root = Path(root)
    if snapshot != "latest":
        return _resolve_named(root, snapshot)
    for _ in range(LATEST_READ_ATTEMPTS):
        latest = _read_latest(root)
        if latest is None:
            raise SnapshotNotFound(f"no snapshot has been published under {root} yet (run the long job: `recaug run <config>`)")
        try:
            return _resolve_named(root, latest)
        except (SnapshotNotFound, FileNotFoundError):
            # a publish committed a newer snapshot and retention retired this one after LATEST was read
            if _read_latest(root) == latest:
                raise
    raise SnapshotNotFound(_too_fast(root))


def _too_fast(root: Path) -> str:
    return (f"`latest` under {root} was replaced and retired {LATEST_READ_ATTEMPTS} times while being read: publishes "
            "come faster than this reader; raise publish.keep_snapshots or read a pinned snapshot")


def read_snapshot(root: Path, snapshot: str, read: Callable[[SnapshotInfo], T]) -> T:
    """`read(info)` on one whole snapshot, for readers of several files (tables, manifest).

    Publishing never changes a snapshot, but retention deletes old ones; a read of `latest` that loses
    its snapshot to a concurrent publish's retention starts over on the new `latest`, so the result
    always comes from one complete snapshot. A named snapshot deleted while being read raises
    SnapshotNotFound (pin a snapshot with `pin_snapshot` to keep it).
    """
    root = Path(root)
    for _ in range(LATEST_READ_ATTEMPTS):
        info = resolve_snapshot(root, snapshot)
        try:
            return read(info)
        except (FileNotFoundError, SnapshotNotFound):  # (a nested resolve or pin of info's id raises the latter)
            if (info.path / MANIFEST_FILE).is_file():
                raise  # the snapshot is still there: a file is really missing (verify_snapshot says which)
            if snapshot != "latest":
                raise SnapshotNotFound(
                    f"snapshot {info.snapshot_id} under {root} was removed by retention while it was being read; "
                    "pin it (pin_snapshot) to keep it"
                ) from None
    raise SnapshotNotFound(_too_fast(root))


def _resolve_named(root: Path, snapshot: str) -> SnapshotInfo:
    if not SNAPSHOT_ID_RE.match(snapshot) or snapshot not in _committed_ids(root):
        known = [s for s in _committed_ids(root)][-5:]
        raise SnapshotNotFound(
            f"snapshot {snapshot!r} is not a published snapshot under {root}; the newest are {known or 'none'} "
            "(use 'latest' or an id from `recaug snapshots`)"
        )
    return _info(root, snapshot, _pinned_ids(root))


def read_manifest(root: Path, snapshot: str = "latest") -> dict[str, Any]:
    return read_snapshot(root, snapshot, lambda info: info.manifest)


def read_table(root: Path, snapshot: str, name: str) -> pa.Table:
    return read_snapshot(root, snapshot, lambda info: pq.read_table(info.table_path(name)))


def verify_snapshot(root: Path, snapshot: str = "latest") -> list[str]:
    """Problems found by re-hashing every file against the manifest (empty list = intact)."""
    info = resolve_snapshot(root, snapshot)
    problems = []
    for name, entry in info.manifest["tables"].items():
        path = info.path / entry["path"]
        if not path.is_file():
            problems.append(f"{name}: file {entry['path']} is missing")
            continue
        if file_sha256(path) != entry["sha256"]:
            problems.append(f"{name}: file hash differs from the manifest")
            continue
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows != entry["rows"]:
            problems.append(f"{name}: {rows} rows, manifest says {entry['rows']}")
    return problems


# --- publishing -------------------------------------------------------------------------------------


def _clean_leftovers(root: Path) -> list[str]:
    """Remove what killed publishes and retentions left behind. Call only under the lock."""
    latest = _read_latest(root)
    removed = []
    for p in root.iterdir():
        uncommitted = SNAPSHOT_ID_RE.match(p.name) and (latest is None or p.name > latest)
        stale_tmp = p.name.startswith((TMP_PREFIX, TRASH_PREFIX))
        stale_pointer = p.name.startswith(f".{LATEST_FILE}.") and p.name.endswith(".tmp")
        if p.is_dir() and (uncommitted or stale_tmp):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        elif p.is_file() and stale_pointer:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def _discard_uncommitted(root: Path, tmp: Path, snapshot_id: str) -> None:
    """Remove a publish that failed before its commit point. Call only under the lock."""
    shutil.rmtree(tmp, ignore_errors=True)
    if _read_latest(root) != snapshot_id:
        shutil.rmtree(root / snapshot_id, ignore_errors=True)
    for p in root.glob(f".{LATEST_FILE}.*.tmp"):
        p.unlink(missing_ok=True)


def clean_leftovers(root: Path, lock_timeout: float = 600.0) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    with _locked(root, lock_timeout):
        return _clean_leftovers(root)


def _check_inputs(tables: dict[str, pa.Table], manifest: dict[str, Any]) -> int:
    if not tables:
        raise ValueError("a snapshot needs at least one table")
    for name, table in tables.items():
        if not isinstance(name, str) or not TABLE_NAME_RE.match(name) or ".." in name:
            raise ValueError(f"table name {name!r} must be letters, digits, _ . - with / between folders (e.g. embeddings/kar_user)")
        if not isinstance(table, pa.Table):
            raise TypeError(f"table {name!r} must be a pyarrow.Table, got {type(table).__name__}")
    clash = sorted(k for k in RESERVED_MANIFEST_KEYS if k in manifest)
    if clash:
        raise ValueError(f"manifest keys {clash} are filled in by publish_snapshot; leave them out")
    if manifest.get("data_cutoff") is None:
        raise ValueError(
            "manifest['data_cutoff'] is required: the as-of time of the input data (unix seconds or ISO-8601); "
            "point-in-time joins use it to keep features built after a sample's time away from that sample"
        )
    return to_unix_seconds(manifest["data_cutoff"], "data_cutoff")


def _write_table(table: pa.Table, path: Path, snapshot_id: str) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    meta[b"recaug.snapshot"] = snapshot_id.encode()
    table = table.replace_schema_metadata(meta)
    # embedding tables keep pyarrow's row groups of up to 1 Mi rows: a reader then gets the vectors as one
    # chunk, which `vectors_numpy` views without a copy (docs/feature-tables.md); the others are bounded
    embeddings = meta.get(b"recaug.table") == b"embeddings"
    pq.write_table(table, path, row_group_size=None if embeddings else PARQUET_ROW_GROUP)
    fsync_file(path)
    table_meta = {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"recaug.")}
    return {
        "rows": table.num_rows,
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "kind": table_meta.get("recaug.table", ""),
        "metadata": table_meta,
    }


def publish_snapshot(
    root: Path,
    tables: dict[str, pa.Table],
    manifest: dict[str, Any],
    keep: int = 5,
    lock_timeout: float = 600.0,
    gate=None,
) -> SnapshotInfo:
    """Write `tables` + a manifest as a new immutable snapshot and make it `latest` atomically.

    `manifest` is the caller's lineage (config, code version, template hashes, model and encoder
    ids, gate results, counts, tokens) and must hold `data_cutoff`. Table names may contain `/`
    (folders), e.g. `embeddings/kar_user_preference`. Every table's schema metadata gets
    `recaug.snapshot` = the new id. Afterwards the last `keep` snapshots plus every pinned one remain.
    Pass the output gate's result as `gate`: a failed gate raises `OutputGateFailed` before anything
    is written, a passed one is recorded in the manifest under `output_gate`.
    """
    if gate is not None:
        gate.raise_for_failure()
        manifest = {**manifest, "output_gate": gate.as_dict()}
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    cutoff = _check_inputs(tables, manifest)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root, lock_timeout):
        _crash_point("locked")
        _clean_leftovers(root)
        snapshot_id = new_snapshot_id(after=_read_latest(root))
        tmp = root / f"{TMP_PREFIX}{snapshot_id}"
        try:
            tmp.mkdir()
            entries: dict[str, dict[str, Any]] = {}
            for name, table in tables.items():
                rel = f"{name}.parquet"
                entries[name] = {"path": rel, **_write_table(table, tmp / rel, snapshot_id)}
                release_memory()  # the Parquet writer's encoding buffers
                _crash_point("first_table")
            _crash_point("tables_written")
            full_manifest = {
                "format_version": FORMAT_VERSION,
                "snapshot_id": snapshot_id,
                "created_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                **manifest,
                "data_cutoff": cutoff,
                "data_cutoff_iso": _iso(cutoff),
                "tables": entries,
            }
            text = json.dumps(full_manifest, indent=2, sort_keys=False, default=str)
            with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            for folder in sorted({(tmp / e["path"]).parent for e in entries.values()} | {tmp}, key=lambda p: -len(p.parts)):
                fsync_dir(folder)
            _crash_point("manifest_written")
            os.rename(tmp, root / snapshot_id)
            fsync_dir(root)
            _crash_point("renamed")
            write_text_atomic(root / LATEST_FILE, snapshot_id + "\n")  # the commit point
        except BaseException:
            # a failed write (a full disk, a read-only remount) leaves nothing behind: neither the hidden
            # folder nor a renamed one that LATEST never named (a SIGKILL's leftovers go at the next publish)
            _discard_uncommitted(root, tmp, snapshot_id)
            raise
        _crash_point("committed")
        removed = _apply_retention(root, keep)
    return dataclasses.replace(resolve_snapshot(root, snapshot_id), removed_by_retention=tuple(removed))


# --- retention and pins -----------------------------------------------------------------------------


def _apply_retention(root: Path, keep: int) -> list[str]:
    committed = _committed_ids(root)
    pinned = _pinned_ids(root)
    latest = _read_latest(root)
    doomed = [i for i in committed[:-keep] if i not in pinned and i != latest]
    for snapshot_id in doomed:
        trash = root / f"{TRASH_PREFIX}{snapshot_id}"
        os.rename(root / snapshot_id, trash)  # atomic: readers see it whole or not at all
        _crash_point("retention")
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        fsync_dir(root)
    return doomed


def apply_retention(root: Path, keep: int, lock_timeout: float = 600.0) -> list[str]:
    """Delete committed snapshots beyond the newest `keep`, except pinned ones; returns the deleted ids."""
    with _locked(Path(root), lock_timeout):
        return _apply_retention(Path(root), keep)


def _pin_key(reason: str) -> str:
    return hashlib.sha256(reason.encode("utf-8")).hexdigest()[:16]


def pin_snapshot(root: Path, snapshot_id: str, reason: str, lock_timeout: float = 600.0) -> str:
    """Keep `snapshot_id` from retention (e.g. reason = "ctr model <run id>"); returns the pin key.

    Several pins may hold one snapshot (one per model trained on it); it stays while any remains.
    Pinning takes the publish lock so it cannot race a retention pass deleting the same snapshot.
    """
    if not reason.strip():
        raise ValueError("a pin needs a reason (e.g. the model or run that depends on the snapshot)")
    root = Path(root)
    with _locked(root, lock_timeout):
        info = resolve_snapshot(root, snapshot_id)
        folder = root / PINS_DIR / info.snapshot_id
        folder.mkdir(parents=True, exist_ok=True)
        key = _pin_key(reason)
        record = {"snapshot_id": info.snapshot_id, "reason": reason, "pinned_at": dt.datetime.now(dt.timezone.utc).isoformat()}
        write_text_atomic(folder / f"{key}.json", json.dumps(record, indent=2))
    return key


def unpin(root: Path, snapshot_id: str, reason: str | None = None, lock_timeout: float = 600.0) -> int:
    """Remove the pin with `reason` (or every pin when None); returns how many were removed."""
    root = Path(root)
    folder = root / PINS_DIR / snapshot_id
    if not folder.is_dir():
        return 0
    with _locked(root, lock_timeout):
        targets = [folder / f"{_pin_key(reason)}.json"] if reason is not None else list(folder.glob("*.json"))
        removed = 0
        for path in targets:
            if path.exists():
                path.unlink()
                removed += 1
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed


def list_pins(root: Path, snapshot_id: str | None = None) -> list[dict[str, Any]]:
    pins = Path(root) / PINS_DIR
    if not pins.is_dir():
        return []
    folders = [pins / snapshot_id] if snapshot_id else sorted(p for p in pins.iterdir() if p.is_dir())
    out = []
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            out.append(json.loads(path.read_text()))
    return out
