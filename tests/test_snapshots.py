"""Snapshots: atomic publish under SIGKILL, retries, leftovers, ids, manifest, locking, pins, retention.

Kills are real: a subprocess publishes and is SIGKILLed either at a named step (the crash hook
RECAUG_SNAPSHOT_CRASH_AT) or at random moments while it writes a ~60 MB snapshot.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recaug.schemas.vectors import fixed_size_vectors, vectors_numpy
from recaug.pipelines.snapshots import (
    CRASH_ENV,
    CRASH_POINTS,
    LATEST_FILE,
    SNAPSHOT_ID_RE,
    SnapshotNotFound,
    apply_retention,
    list_pins,
    list_snapshots,
    new_snapshot_id,
    pin_snapshot,
    publish_snapshot,
    read_manifest,
    read_table,
    resolve_snapshot,
    unpin,
    verify_snapshot,
)
from recaug.schemas.tables import embedding_schema

PUBLISHER = r"""
import sys
import numpy as np
import pyarrow as pa
from pathlib import Path
from recaug.schemas.vectors import fixed_size_vectors
from recaug.pipelines.snapshots import publish_snapshot
from recaug.schemas.tables import embedding_schema

root, rows, n_tables, dim, keep, tag = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
rng = np.random.default_rng(int(sys.argv[7]))
tables = {}
for t in range(n_tables):
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    schema = embedding_schema(dim, {"recaug.augmenter": f"aug{t}", "recaug.entity_kind": "user"})
    tables[f"embeddings/aug{t}"] = pa.Table.from_arrays(
        [pa.array([f"u{i}" for i in range(rows)]), fixed_size_vectors(vectors), pa.array([tag] * rows)], schema=schema)
print("publishing", flush=True)
info = publish_snapshot(root, tables, {"data_cutoff": 1_700_000_000, "tag": tag}, keep=keep)
print(info.snapshot_id, flush=True)
"""


def make_tables(rows: int = 20, n_tables: int = 2, dim: int = 8, tag: str = "x", seed: int = 0) -> dict[str, pa.Table]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in range(n_tables):
        schema = embedding_schema(dim, {"recaug.augmenter": f"aug{t}", "recaug.entity_kind": "user"})
        out[f"embeddings/aug{t}"] = pa.Table.from_arrays(
            [pa.array([f"u{i}" for i in range(rows)]), fixed_size_vectors(rng.standard_normal((rows, dim), dtype=np.float32)),
             pa.array([tag] * rows)],
            schema=schema,
        )
    return out


def publish(root: Path, tag: str, keep: int = 5, cutoff: int = 1_700_000_000, **kw):
    return publish_snapshot(root, make_tables(tag=tag, **kw), {"data_cutoff": cutoff, "tag": tag}, keep=keep)


@pytest.fixture
def publisher_script(tmp_path):
    path = tmp_path / "publisher.py"
    path.write_text(PUBLISHER)
    return path


def run_publisher(script: Path, root: Path, tag: str, rows=200, n_tables=2, dim=8, keep=5, crash_at=None, seed=1):
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    cmd = [sys.executable, str(script), str(root), str(rows), str(n_tables), str(dim), str(keep), tag, str(seed)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_no_partial_visible(root: Path) -> None:
    """Every listed snapshot is complete: all files present and matching the manifest hashes."""
    for info in list_snapshots(root):
        assert verify_snapshot(root, info.snapshot_id) == []


def leftovers(root: Path) -> list[str]:
    latest = (root / LATEST_FILE).read_text().strip() if (root / LATEST_FILE).exists() else ""
    return sorted(
        p.name
        for p in root.iterdir()
        if p.name.startswith((".tmp-", ".trash-")) or (SNAPSHOT_ID_RE.match(p.name) and p.name > latest)
    )


# --- basics -------------------------------------------------------------------------------------------


def test_publish_writes_tables_manifest_and_latest(tmp_path):
    root = tmp_path / "snaps"
    tables = make_tables(rows=30, tag="a")
    info = publish_snapshot(
        root, tables, {"data_cutoff": "2026-11-01T00:00:00Z", "config": {"name": "x"}, "code_version": "abc"}, keep=3
    )
    assert SNAPSHOT_ID_RE.match(info.snapshot_id)
    assert resolve_snapshot(root, "latest").snapshot_id == info.snapshot_id
    manifest = read_manifest(root, info.snapshot_id)
    assert manifest["snapshot_id"] == info.snapshot_id
    assert manifest["data_cutoff"] == 1_793_491_200 and manifest["data_cutoff_iso"] == "2026-11-01T00:00:00Z"
    assert manifest["config"] == {"name": "x"} and manifest["code_version"] == "abc"
    assert manifest["created_at"].endswith("Z")
    for name, table in tables.items():
        entry = manifest["tables"][name]
        assert entry["rows"] == table.num_rows and len(entry["sha256"]) == 64 and entry["kind"] == "embeddings"
        back = read_table(root, "latest", name)
        assert back.schema.metadata[b"recaug.snapshot"] == info.snapshot_id.encode()  # stamped at publish
        np.testing.assert_array_equal(vectors_numpy(back), vectors_numpy(table))
    assert verify_snapshot(root) == []


def test_data_cutoff_is_required_and_reserved_keys_refused(tmp_path):
    with pytest.raises(ValueError, match="data_cutoff"):
        publish_snapshot(tmp_path, make_tables(), {"config": {}})
    with pytest.raises(ValueError, match="filled in by publish_snapshot"):
        publish_snapshot(tmp_path, make_tables(), {"data_cutoff": 1, "snapshot_id": "mine"})
    with pytest.raises(ValueError, match="table name"):
        publish_snapshot(tmp_path, {"../escape": make_tables()["embeddings/aug0"]}, {"data_cutoff": 1})
    assert list_snapshots(tmp_path) == []
    with pytest.raises(SnapshotNotFound, match="no snapshot has been published"):
        resolve_snapshot(tmp_path, "latest")


def test_ids_are_unique_and_sort_in_publish_order(tmp_path):
    ids = [publish(tmp_path, f"t{i}", keep=10, rows=2, n_tables=1).snapshot_id for i in range(6)]
    assert ids == sorted(ids) and len(set(ids)) == 6
    assert [s.snapshot_id for s in list_snapshots(tmp_path)] == ids
    # a clock that stepped back still yields a larger id
    future = "29991231T235959999999Z-0000abcd"
    assert new_snapshot_id(after=future) > future


def test_unknown_snapshot_id_is_a_clear_error(tmp_path):
    publish(tmp_path, "a")
    with pytest.raises(SnapshotNotFound, match="not a published snapshot"):
        resolve_snapshot(tmp_path, "20000101T000000000000Z-deadbeef")


# --- kills ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_kill_at_each_step_leaves_latest_whole_and_a_retry_succeeds(tmp_path, publisher_script, crash_at):
    root = tmp_path / "snaps"
    first = publish(root, "old", keep=1)
    # keep=1 so that the killed publish also reaches the retention step
    proc = run_publisher(publisher_script, root, "new", keep=1, crash_at=crash_at)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"publisher did not die at {crash_at}"

    latest = resolve_snapshot(root, "latest")
    if crash_at in ("committed", "retention"):  # killed after the commit point: the new one is latest
        assert latest.snapshot_id > first.snapshot_id
        assert read_manifest(root)["tag"] == "new"
    else:
        assert latest.snapshot_id == first.snapshot_id
        assert read_manifest(root)["tag"] == "old"
    assert_no_partial_visible(root)
    assert read_table(root, "latest", "embeddings/aug0").num_rows == latest.tables["embeddings/aug0"]

    retry = run_publisher(publisher_script, root, "retry", keep=1)
    out, err = retry.communicate(timeout=120)
    assert retry.returncode == 0, err
    assert resolve_snapshot(root, "latest").snapshot_id == out.strip().splitlines()[-1]
    assert read_manifest(root)["tag"] == "retry"
    assert leftovers(root) == []  # the retry cleaned up what the kill left
    assert [s.snapshot_id for s in list_snapshots(root)] == [resolve_snapshot(root).snapshot_id]  # keep=1
    assert_no_partial_visible(root)


def test_kill_at_random_moments_of_a_large_publish(tmp_path, publisher_script):
    root = tmp_path / "snaps"
    big = dict(rows=20_000, n_tables=6, dim=128)  # ~60 MB of vectors
    proc = run_publisher(publisher_script, root, "base", **big)
    assert proc.stdout.readline().strip() == "publishing"
    started = time.perf_counter()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    duration = time.perf_counter() - started

    rng = random.Random(7)
    outcomes = []
    previous_tag = "base"
    for attempt in range(5):
        tag = f"killed{attempt}"
        proc = run_publisher(publisher_script, root, tag, seed=attempt + 2, **big)
        assert proc.stdout.readline().strip() == "publishing"
        time.sleep(rng.uniform(0.0, duration))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        # latest is the previous complete snapshot, or the new one if the kill came after the commit
        now_tag = read_manifest(root)["tag"]
        assert now_tag in (previous_tag, tag)
        outcomes.append(("new" if now_tag == tag else "old") + ("+leftovers" if leftovers(root) else ""))
        previous_tag = now_tag
        assert_no_partial_visible(root)
    retry = run_publisher(publisher_script, root, "retry", **big)
    _, err = retry.communicate(timeout=300)
    assert retry.returncode == 0, err
    assert read_manifest(root)["tag"] == "retry" and leftovers(root) == []
    assert_no_partial_visible(root)
    print("random-kill outcomes:", outcomes, f"(publish took {duration:.2f} s)")


def test_two_publishers_at_once_serialise(tmp_path, publisher_script):
    root = tmp_path / "snaps"
    procs = [run_publisher(publisher_script, root, f"p{i}", rows=5000, n_tables=3, dim=64, seed=i) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    ids = sorted(r[0].strip().splitlines()[-1] for r in results)
    assert [s.snapshot_id for s in list_snapshots(root)] == ids
    assert resolve_snapshot(root).snapshot_id == ids[-1]
    assert_no_partial_visible(root)


# --- pins and retention -----------------------------------------------------------------------------------


def test_retention_keeps_the_newest_and_every_pinned_snapshot(tmp_path):
    ids = [publish(tmp_path, "s0", keep=2, rows=3, n_tables=1).snapshot_id]
    key = pin_snapshot(tmp_path, ids[0], "ctr model deepfm run 1")
    pin_snapshot(tmp_path, ids[0], "ctr model dcn run 1")
    for i in range(1, 4):
        info = publish(tmp_path, f"s{i}", keep=2, rows=3, n_tables=1)
        ids.append(info.snapshot_id)
    listed = list_snapshots(tmp_path)
    assert [s.snapshot_id for s in listed] == [ids[0], ids[2], ids[3]]  # s1 went, the pinned s0 stayed
    assert listed[0].pinned and not listed[1].pinned
    assert {p["reason"] for p in list_pins(tmp_path, ids[0])} == {"ctr model deepfm run 1", "ctr model dcn run 1"}

    # one model's unpin leaves the other's pin in force
    assert unpin(tmp_path, ids[0], "ctr model deepfm run 1") == 1 and key
    assert apply_retention(tmp_path, keep=2) == []
    assert unpin(tmp_path, ids[0]) == 1
    assert apply_retention(tmp_path, keep=2) == [ids[0]]
    assert [s.snapshot_id for s in list_snapshots(tmp_path)] == ids[2:]
    assert leftovers(tmp_path) == []


def test_pin_needs_a_published_snapshot_and_a_reason(tmp_path):
    info = publish(tmp_path, "a")
    with pytest.raises(SnapshotNotFound):
        pin_snapshot(tmp_path, "20000101T000000000000Z-deadbeef", "model x")
    with pytest.raises(ValueError, match="reason"):
        pin_snapshot(tmp_path, info.snapshot_id, "  ")


def test_manifest_is_json_and_lists_every_file(tmp_path):
    info = publish(tmp_path, "a", n_tables=3)
    manifest = json.loads((info.path / "manifest.json").read_text())
    files = sorted(str(p.relative_to(info.path)) for p in info.path.rglob("*.parquet"))
    assert files == sorted(e["path"] for e in manifest["tables"].values())
    for entry in manifest["tables"].values():
        assert pq.ParquetFile(info.path / entry["path"]).metadata.num_rows == entry["rows"]
