"""Two `recaug run` on one workdir at once, and readers while publishes happen.

- Two real `recaug run` subprocesses started together: one runs and publishes; the other either
  fails at once with exit code 6 and a one-line message (no --wait), or waits for the lock and then
  runs on cache hits only (--wait). No traceback, one consistent cache, only whole snapshots.
- A publisher subprocess publishes snapshots in a loop (keep 1, so every publish also retires the
  previous one) while reader threads load `latest` through `recaug.features.load`, the snapshot API
  and `list_snapshots`: every read is one whole snapshot, its tables' rows are what its manifest says
  and every value comes from that one publish.

The runs encode with the hash encoder of tests/fake_encoder.py (what is under test is the lock, the
caches and the snapshots, not the vectors).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import recaug
from fake_encoder import CLI as RECAUG_CLI
from recaug.schemas.vectors import fixed_size_vectors, vectors_numpy
from recaug.core.config import load_config
from recaug.pipelines.snapshots import (
    SnapshotNotFound,
    list_snapshots,
    publish_snapshot,
    read_manifest,
    read_snapshot,
    read_table,
    resolve_snapshot,
    snapshot_root,
    verify_snapshot,
)
from recaug.schemas.tables import embedding_schema
from shop_data import Shop

RUN_TIMEOUT = 600
# 30 users, 20 items, 10 ratings each, in the shop's own column names
SHOP = Shop(n_users=30, n_items=20, per_user=10, seed=11, first_age=20, first_year=1990, title="Film {i}",
            genres=("Action", "Drama|Comedy"))
# in-process runs encode with the hash encoder too; the two-run tests wait up to RUN_TIMEOUT per run,
# longer than the suite's default timeout
pytestmark = [pytest.mark.usefixtures("fake_encoder"), pytest.mark.timeout(1800)]


def write_shop(folder: Path) -> None:
    SHOP.write(folder)


def shop_config(tmp_path: Path) -> Path:
    write_shop(tmp_path / "data")
    data = tmp_path / "data"
    cfg = {
        "name": "shop",
        "workdir": str(tmp_path / "work"),
        "dataset": SHOP.dataset(data),
        "engine": {"kind": "fake"},
        "runner": {"shard_size": 4},
        "augmenters": [{"name": "kar_user_preference"}, {"name": "kar_item_knowledge"}],
    }
    path = tmp_path / "shop.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_run(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*RECAUG_CLI, "run", str(config), "--no-progress", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    return proc.returncode, out, err


def llm_calls(out: str) -> int:
    return int(re.search(r"augmentation: ([\d,]+) LLM calls", out).group(1).replace(",", ""))


def assert_workdir_consistent(config: Path, expected_keys: int) -> list:
    cfg = load_config(config)
    root = snapshot_root(cfg)
    snaps = list_snapshots(root)
    for snap in snaps:
        assert verify_snapshot(root, snap.snapshot_id) == []
    shards = [p for p in (cfg.workdir_path() / "cache" / "generations").glob("*.parquet") if not p.name.startswith(".")]
    keys = pl.concat([pl.from_arrow(pq.read_table(p, columns=["cache_key"])) for p in shards])["cache_key"]
    assert keys.n_unique() == expected_keys == keys.len(), "each request was generated and stored exactly once"
    lock = cfg.workdir_path() / "run.lock"
    assert lock.read_text() == "", "the lock file still names a holder after both runs ended"
    return snaps


def test_a_second_run_without_wait_fails_cleanly(tmp_path):
    config = shop_config(tmp_path)
    procs = [start_run(config), start_run(config)]
    results = [finish(p) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 6], results
    _, out, err = next(r for r in results if r[0] == 0)
    assert llm_calls(out) == 30 + 20 and "published snapshot" in out, (out, err)
    _, out, err = next(r for r in results if r[0] == 6)
    assert "Traceback" not in err and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recaug: ") and "another run is in progress" in lines[0]
    assert "--wait" in lines[0]  # says what to do about it
    snaps = assert_workdir_consistent(config, expected_keys=50)
    assert len(snaps) == 1


def test_a_second_run_with_wait_runs_after_the_first_on_cache_hits(tmp_path):
    config = shop_config(tmp_path)
    root = snapshot_root(load_config(config))
    seen, errors, done = set(), [], threading.Event()

    def reader():  # a modeler loading `latest` all along: nothing, or one whole snapshot
        while not done.wait(0.05):  # (not a busy loop: the two runs need the cores)
            try:
                frame = recaug.features.load(config)
            except SnapshotNotFound:
                continue
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            sid = frame["snapshot_id"].unique().to_list()
            rows = resolve_snapshot(root, sid[0]).tables
            if len(sid) != 1 or frame.height != sum(n for t, n in rows.items() if t.startswith("embeddings/")):
                errors.append(f"a partial read: {sid}, {frame.height} rows, manifest {rows}")
            seen.add(sid[0])

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    procs = [start_run(config, "--wait", str(RUN_TIMEOUT)), start_run(config, "--wait", str(RUN_TIMEOUT))]
    try:
        results = [finish(p) for p in procs]
    finally:
        done.set()
        thread.join(timeout=60)
    assert errors == []
    assert [r[0] for r in results] == [0, 0], results
    for _, out, err in results:
        assert "Traceback" not in err, err
    # the lock serialised them: one generated everything, the other said it waited, then found every answer cached
    first, second = sorted(results, key=lambda r: -llm_calls(r[1]))
    assert llm_calls(first[1]) == 50 and llm_calls(second[1]) == 0
    assert "waiting up to" in second[2] and "is held by pid" in second[2], second[2]
    assert "waiting" not in first[2]
    snaps = assert_workdir_consistent(config, expected_keys=50)
    assert len(snaps) == 2
    assert seen and seen <= {s.snapshot_id for s in snaps}
    first, second = (pl.from_arrow(read_table(root, s.snapshot_id, "embeddings/kar_user_preference")) for s in snaps)
    assert first["entity_id"].equals(second["entity_id"]) and first["text_hash"].equals(second["text_hash"])
    np.testing.assert_allclose(vectors_numpy(second.select("vector").to_arrow()),
                               vectors_numpy(first.select("vector").to_arrow()), atol=1e-5)


# --- readers while publishing ------------------------------------------------------------------------------

PUBLISHER = r"""
import sys
import time
from pathlib import Path
import numpy as np
import pyarrow as pa
from recaug.schemas.vectors import fixed_size_vectors
from recaug.pipelines.snapshots import publish_snapshot
from recaug.schemas.tables import embedding_schema

root, n = Path(sys.argv[1]), int(sys.argv[2])
for k in range(n):
    tables = {}
    for t, kind in enumerate(("user", "item")):
        rows = 200 + 37 * k + t  # every publish and table has its own row count ...
        schema = embedding_schema(16, {"recaug.augmenter": f"aug{t}", "recaug.entity_kind": kind})
        vectors = np.full((rows, 16), float(k), dtype=np.float32)  # ... and its own values
        tables[f"embeddings/aug{t}"] = pa.Table.from_arrays(
            [pa.array([f"e{i}" for i in range(rows)]), fixed_size_vectors(vectors), pa.array([f"p{k}"] * rows)], schema=schema)
    publish_snapshot(root, tables, {"data_cutoff": 1_700_000_000 + k, "publish": k}, keep=1)
    print(k, flush=True)
    # publishes back to back with no pause let a reader on a loaded 2-core box lose 20 races in a row
    # (it then fails cleanly, "publishes come faster than this reader"); real ones are days apart
    time.sleep(0.2)
"""


def _expect_whole(snapshot_id: str, publish: int, frames: dict[str, pl.DataFrame], manifest_rows: dict[str, int]) -> None:
    for t in (0, 1):
        name = f"embeddings/aug{t}"
        frame = frames[name]
        assert frame.height == manifest_rows[name] == 200 + 37 * publish + t, (snapshot_id, name)
        assert frame["text_hash"].unique().to_list() == [f"p{publish}"], (snapshot_id, name)
        values = vectors_numpy(frame.select("vector").to_arrow())
        assert (values == publish).all(), (snapshot_id, name)


def test_readers_during_publishes_see_one_whole_snapshot(tmp_path):
    root = tmp_path / "snapshots"
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER)
    n_publishes = 30
    publisher = subprocess.Popen([sys.executable, str(script), str(root), str(n_publishes)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()
    reads = {"features": set(), "api": set(), "list": 0, "single": 0}
    errors: list[str] = []

    def guarded(body):
        def loop():
            while not done.is_set():
                published = (root / "LATEST").exists()
                try:
                    try:
                        body()
                    except SnapshotNotFound:
                        if published:  # once there is a snapshot, `latest` must always resolve
                            raise
                except Exception as exc:  # noqa: BLE001  (any failure is the finding)
                    errors.append(f"{body.__name__}: {type(exc).__name__}: {exc}")
                    return
        return threading.Thread(target=loop, daemon=True)

    def via_features():
        frame = recaug.features.load(root)
        sid = frame["snapshot_id"].unique().to_list()
        assert len(sid) == 1, sid
        publish = int(frame["text_hash"][0][1:])
        parts = {f"embeddings/{a}": frame.filter(pl.col("augmenter") == a) for a in ("aug0", "aug1")}
        _expect_whole(sid[0], publish, parts, {n: parts[n].height for n in parts})
        reads["features"].add(sid[0])

    def via_api():
        # several files of one snapshot: read_snapshot hands them all from one whole snapshot
        def read(info):
            frames = {n: pl.from_arrow(pq.read_table(info.table_path(n))) for n in info.tables}
            return info.snapshot_id, info.manifest["publish"], frames, info.tables

        sid, publish, frames, rows = read_snapshot(root, "latest", read)
        _expect_whole(sid, publish, frames, rows)
        reads["api"].add(sid)

    def via_single_calls():
        # one call, one file: each answer is whole, though two calls may see two publishes
        frame = pl.from_arrow(read_table(root, "latest", "embeddings/aug1"))
        publish = int(frame["text_hash"][0][1:])
        assert frame.height == 200 + 37 * publish + 1
        assert (vectors_numpy(frame.select("vector").to_arrow()) == publish).all()
        assert read_manifest(root)["publish"] >= 0
        reads["single"] += 1

    def via_list():
        snaps = list_snapshots(root)
        assert len(snaps) <= 2, [s.snapshot_id for s in snaps]  # keep 1, plus one between commit and retention
        reads["list"] += 1

    threads = [guarded(via_features), guarded(via_api), guarded(via_list), guarded(via_single_calls)]
    for t in threads:
        t.start()
    try:
        _, err = publisher.communicate(timeout=RUN_TIMEOUT)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert publisher.returncode == 0, err
    assert errors == [], errors
    # the reads overlapped the publishes
    assert len(reads["features"]) > 1 and len(reads["api"]) > 1 and reads["list"] > 1 and reads["single"] > 1
    final = resolve_snapshot(root, "latest")
    assert final.manifest["publish"] == n_publishes - 1
    assert [s.snapshot_id for s in list_snapshots(root)] == [final.snapshot_id]


def _publish(root: Path, k: int, keep: int = 1) -> str:
    schema = embedding_schema(4, {"recaug.augmenter": "aug0", "recaug.entity_kind": "user"})
    table = pa.Table.from_arrays([pa.array(["e0"]), fixed_size_vectors(np.full((1, 4), k, np.float32)), pa.array([f"p{k}"])],
                                 schema=schema)
    return publish_snapshot(root, {"embeddings/aug0": table}, {"data_cutoff": 1_700_000_000, "publish": k}, keep=keep).snapshot_id


def test_a_read_of_latest_that_loses_its_snapshot_to_retention_reads_the_new_one(tmp_path):
    """The race the reader threads above hit, made deterministic: a publish with keep 1 retires the
    snapshot a reader resolved as `latest` before the reader opened its files."""
    root = tmp_path / "snapshots"
    first = _publish(root, 0)
    seen = []

    def read(info):
        seen.append(info.snapshot_id)
        if len(seen) == 1:
            _publish(root, 1)  # commits a newer snapshot and deletes `info`'s folder
        return info.manifest["publish"], pq.read_table(info.table_path("embeddings/aug0"))

    publish, table = read_snapshot(root, "latest", read)
    assert seen[0] == first and seen[1] != first and publish == 1
    assert table.column("text_hash").to_pylist() == ["p1"]


def test_a_named_snapshot_removed_while_read_is_a_clear_error(tmp_path):
    root = tmp_path / "snapshots"
    first = _publish(root, 0)

    def read(info):
        _publish(root, 1)
        return pq.read_table(info.table_path("embeddings/aug0"))

    with pytest.raises(SnapshotNotFound, match="removed by retention while it was being read; pin it"):
        read_snapshot(root, first, read)
    # a file missing from a snapshot that is still there is not a race: that error is not hidden
    second = resolve_snapshot(root, "latest")
    (second.path / "embeddings" / "aug0.parquet").unlink()
    with pytest.raises(FileNotFoundError):
        read_table(root, "latest", "embeddings/aug0")


def test_a_publish_while_a_model_trains_keeps_the_snapshot_it_trains_on(tmp_path, monkeypatch):
    """With keep_snapshots 1 a long job publishing during `recaug train` used to delete the snapshot
    the model was training on, and pinning it for the checkpoint then failed after the training.
    The trainer now pins the snapshot before reading it; the training pin goes when the model's stays."""
    import types

    import recaug.ctr_models as ctr_models
    from recaug.pipelines.experiment import train_model
    from recaug.pipelines import cli
    from recaug.pipelines.snapshots import list_pins

    config = shop_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["publish"] = {"keep_snapshots": 1}
    config.write_text(yaml.safe_dump(data))
    assert cli.main(["run", str(config), "--no-progress"]) == 0
    cfg = load_config(config)
    root = snapshot_root(cfg)
    trained_on = resolve_snapshot(root, "latest")

    def train_during_a_publish(*args, checkpoint_dir, **kwargs):
        # the weekly long job publishes a new snapshot while the model trains; retention keeps 1
        tables = {n: read_table(root, trained_on.snapshot_id, n) for n in trained_on.tables}
        publish_snapshot(root, tables, {"data_cutoff": trained_on.data_cutoff}, keep=1)
        assert {p["reason"] for p in list_pins(root, trained_on.snapshot_id)} == {f"training run {checkpoint_dir.name}"}
        checkpoint_dir.mkdir(parents=True)
        (checkpoint_dir / "model.pt").write_text("weights")
        return types.SimpleNamespace(checkpoint_path=checkpoint_dir / "model.pt")

    monkeypatch.setattr(ctr_models, "train_ctr", train_during_a_publish)
    inputs, result = train_model(cfg, "latest", "deepfm", 0, log=lambda *a: None)
    assert inputs.snapshot_id == trained_on.snapshot_id
    snaps = list_snapshots(root)
    assert trained_on.snapshot_id in [s.snapshot_id for s in snaps] and len(snaps) == 2  # the new latest, and ours
    assert verify_snapshot(root, trained_on.snapshot_id) == []
    assert [p["reason"] for p in list_pins(root, trained_on.snapshot_id)] == [f"model {result.checkpoint_path}"]
