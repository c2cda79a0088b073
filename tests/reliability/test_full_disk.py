"""A full or read-only workdir, on real size-limited and read-only file systems.

Each test mounts its own tmpfs with a size limit (`mount -t tmpfs -o size=...`) and puts the workdir
on it; "full" is a real ENOSPC from the kernel (the free space is taken by an fallocate'd filler file
until only what the test wants to let through is left), "read-only" is the same tmpfs remounted
`ro` (a chmod would not do: the tests run as root, which ignores permissions). What must hold:

- the command exits 7 with one line on stderr: "workdir <path> is full / is not writable: <what was
  being written> failed (...); nothing was published; free space and re-run";
- nothing temporary is left (no `snapshots/.tmp-<id>`, no `.partial` run folder, no `*.tmp` file);
- the previous snapshot stays `latest` and can still be read.

Mounting needs root with CAP_SYS_ADMIN, as on CI and the development machines; where a mount is
refused the tests skip and say why (nothing else can make the kernel report a full disk reliably).
"""

from __future__ import annotations

import errno
import gc
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
import yaml

from recaug.core import errors
from recaug.pipelines import cli

PAGE = 4096
NOW_TS = 880_000_000
TEMPORARY = (".tmp-", ".trash-", ".spill-")


# --- file systems -----------------------------------------------------------------------------------------


class Mounts:
    def __init__(self, root: Path):
        self.root, self.points = root, []

    def tmpfs(self, size: str) -> Path:
        point = self.root / f"fs{len(self.points)}"
        point.mkdir(parents=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs ({proc.stderr.strip() or proc.returncode}); these tests "
                        "need root with CAP_SYS_ADMIN, as on CI")
        self.points.append(point)
        return point

    @staticmethod
    def remount(point: Path, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True, capture_output=True)

    def unmount_all(self) -> None:
        for point in reversed(self.points):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def mounts(tmp_path):
    m = Mounts(tmp_path / "mnt")
    try:
        yield m
    finally:
        m.unmount_all()


def free_bytes(point: Path) -> int:
    st = os.statvfs(point)
    return st.f_bavail * st.f_frsize


def fill(point: Path, leave: int) -> None:
    """Take the free space of `point` with a filler file until `leave` bytes (whole pages) are left."""
    take = free_bytes(point) - leave
    assert take >= 0, (free_bytes(point), leave)
    fd = os.open(point / "filler", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        if take:
            os.posix_fallocate(fd, os.fstat(fd).st_size, take)
    finally:
        os.close(fd)
    assert abs(free_bytes(point) - leave) < PAGE, (free_bytes(point), leave)


def pages(paths) -> int:
    """Bytes a tmpfs charges for these files (whole pages)."""
    return sum(math.ceil(p.stat().st_size / PAGE) * PAGE for p in paths if p.is_file())


def temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith(TEMPORARY) or p.name.endswith((".tmp", ".partial")))


# --- a small shop with enough entities that one write is many pages --------------------------------------------


def write_shop(data: Path, workdir: Path, **overrides) -> Path:
    data.mkdir(parents=True, exist_ok=True)
    n_users, n_items = 30, 60
    pl.DataFrame({"user_id": [f"u{i}" for i in range(n_users)], "age": [20 + i for i in range(n_users)]}).write_csv(data / "users.csv")
    pl.DataFrame({
        "item_id": [f"i{i}" for i in range(n_items)],
        "title": [f"Film number {i}" for i in range(n_items)],
        "genres": ["Drama|Comedy", "Action"] * (n_items // 2),
    }).write_csv(data / "items.csv")
    rows = [(f"u{u}", f"i{(u * 7 + k) % n_items}", 1 + (u + k) % 5, NOW_TS + u * 1000 + k * 100)
            for u in range(n_users) for k in range(10)]
    pl.DataFrame(rows, schema=["user_id", "item_id", "rating", "timestamp"], orient="row").write_csv(data / "interactions.csv")
    config = {
        "name": "diskshop",
        "workdir": str(workdir),
        "dataset": {"kind": "files", "domain": "movies", "users": {"path": "users.csv"}, "items": {"path": "items.csv"},
                    "interactions": {"path": "interactions.csv"}},
        "engine": {"kind": "fake"},
        "augmenters": [{"name": "kar_item_knowledge"}, {"name": "kar_user_preference", "history_token_budget": 64}],
        "encoder": {"batch_size": 32},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            config.setdefault(section, {})[field] = value
        else:
            config[section] = value
    path = data / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def latest(workdir: Path) -> str:
    return (workdir / "snapshots" / "LATEST").read_text().strip()


def run(cfg: Path, capsys) -> tuple[int, str, str]:
    code = cli.main(["run", str(cfg)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    gc.collect()  # the run's memory-mapped spill files (unlinked) hold tmpfs pages until their buffers go
    return code, out, err


def run_process(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recaug.pipelines.cli", "run", str(cfg)],
                          capture_output=True, text=True, timeout=900)


ONE_LINE = r"^recaug: workdir {workdir} is {state}: [^\n]+ failed \({why}\); nothing was published; [^\n]+ and re-run\n$"


# --- tests ----------------------------------------------------------------------------------------------------


def test_publish_on_a_full_disk_leaves_no_hidden_folder(mounts):
    """The publish step alone, deterministic: a table that cannot fit fails with ENOSPC, the hidden
    `.tmp-<id>` folder is gone at once (not only at the next publish) and `latest` is unchanged."""
    import numpy as np

    from recaug.pipelines.snapshots import list_snapshots, publish_snapshot, resolve_snapshot

    root = mounts.tmpfs("512k") / "snapshots"
    first = publish_snapshot(root, {"t": pa.table({"x": [1, 2, 3]})}, {"data_cutoff": NOW_TS})
    big = pa.table({"x": np.random.default_rng(0).random(200_000)})  # ~1.6 MB of incompressible floats
    with pytest.raises(OSError) as raised:
        publish_snapshot(root, {"t": big}, {"data_cutoff": NOW_TS})
    assert raised.value.errno == errno.ENOSPC
    assert temporaries(root) == [] and {p.name for p in root.iterdir()} == {".publish.lock", "LATEST", first.snapshot_id}
    assert resolve_snapshot(root, "latest").snapshot_id == first.snapshot_id
    assert [s.snapshot_id for s in list_snapshots(root)] == [first.snapshot_id]


def test_a_fresh_run_on_a_full_tmpfs_is_one_line_and_exit_7(mounts, tmp_path):
    point = mounts.tmpfs("1m")
    fill(point, 0)
    workdir = point / "work"
    cfg = write_shop(tmp_path / "data", workdir)
    proc = run_process(cfg)
    assert proc.returncode == errors.EXIT_WORKDIR, proc.stderr
    assert re.match(ONE_LINE.format(workdir=workdir, state="full", why="No space left on device"),
                                           proc.stderr), proc.stderr
    assert "free space and re-run" in proc.stderr
    assert temporaries(point) == []


def test_a_fresh_run_in_a_read_only_place_is_one_line_and_exit_7(mounts, tmp_path):
    point = mounts.tmpfs("1m")
    mounts.remount(point, "ro")
    workdir = point / "team" / "work"
    cfg = write_shop(tmp_path / "data", workdir)
    proc = run_process(cfg)
    assert proc.returncode == errors.EXIT_WORKDIR, proc.stderr
    assert proc.stderr.startswith(f"recaug: workdir {workdir} is not writable: creating the workdir ({point / 'team'}) "
                                  "failed (Read-only file system); nothing was published"), proc.stderr
    assert proc.stderr.count("\n") == 1 and "make it writable" in proc.stderr


@pytest.mark.slow
def test_read_only_workdir_keeps_latest_and_readers_work(mounts, tmp_path, capsys):
    point = mounts.tmpfs("64m")
    workdir = point / "work"
    cfg = write_shop(tmp_path / "data", workdir)
    first = run_process(cfg)  # a process of its own: nothing of it stays open on the mount to remount
    assert first.returncode == 0, first.stderr
    before = latest(workdir)
    mounts.remount(point, "ro")
    proc = run_process(cfg)
    assert proc.returncode == errors.EXIT_WORKDIR, proc.stderr
    assert re.match(
        ONE_LINE.format(workdir=workdir, state="not writable", why="Read-only file system"), proc.stderr), proc.stderr
    # a reader of a read-only workdir still works
    assert cli.main(["snapshots", "show", str(cfg), "latest"]) == 0
    assert f"snapshot {before}" in capsys.readouterr().out
    mounts.remount(point, "rw")
    assert latest(workdir) == before and temporaries(point) == []


def _run_folder(workdir: Path) -> Path:
    return sorted((workdir / "runs").iterdir())[-1]


def spilled(tables: list[Path]) -> int:
    """What the run's memory-mapped spill files (core/spill.py: one Arrow IPC file per table,
    uncompressed) take on the tmpfs for tables like these: their Arrow size, whole pages, plus a page
    of IPC framing each. An estimate: the tests leave slack around it."""
    import pyarrow.parquet as pq

    total = 0
    for path in tables:
        table = pq.read_table(path)
        if table.num_rows:
            total += (math.ceil(table.nbytes / PAGE) + 1) * PAGE
    return total


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["generation", "encoding", "publish"])
def test_disk_full_mid_run_leaves_latest_and_no_temporaries(stage, mounts, tmp_path, capsys):
    """A first run publishes; the second meets a full disk at `stage` (only the free space that the
    writes before that stage need is left). Exit 7, one line naming what was being written, no
    temporaries, `latest` unchanged; after space is freed the same command publishes."""
    point = mounts.tmpfs("64m")
    workdir = point / "work"
    data = tmp_path / "data"
    cfg = write_shop(data, workdir)
    code, out, err = run(cfg, capsys)
    assert code == 0, err
    before = latest(workdir)
    # what the second run writes before each stage, measured on the first run's files: the quarantine
    # (written beside the old one, then renamed), the generated tables spilled while augmenting, the run
    # folder, the embedding tables spilled while encoding, the gate report
    quarantine = pages([workdir / "quarantine" / "latest.parquet"])
    run_dir = _run_folder(workdir)
    run_folder = pages(run_dir.rglob("*"))
    spill_generated = spilled([*run_dir.glob("generated/*.parquet"), *run_dir.glob("dead_letter/*.parquet")])
    snapshot = workdir / "snapshots" / before
    spill_vectors = spilled(list(snapshot.glob("embeddings/*.parquet")))
    # the window each stage writes into is ~100+ KB (360 vectors of 384 floats do not compress); the
    # slack absorbs the lock's line, the write test and the estimate's error
    slack = 12 * PAGE
    if stage == "generation":
        # a new max_new_tokens: every kar_item_knowledge prompt is a cache miss, written to the generation cache
        cfg = write_shop(data, workdir, augmenters=[{"name": "kar_item_knowledge", "max_new_tokens": 40},
                                                    {"name": "kar_user_preference", "history_token_budget": 64}])
        leave, expect = quarantine + 2 * PAGE, "the generation cache under"
    elif stage == "encoding":
        # a new encoder max_length: every text is an encoding-cache miss; the run folder is written before
        cfg = write_shop(data, workdir, **{"encoder": {"batch_size": 32, "max_length": 128}})
        leave, expect = quarantine + spill_generated + run_folder + slack, "the encoding cache under"
    else:
        # everything is cached: the snapshot is the last and largest write
        leave = quarantine + spill_generated + run_folder + spill_vectors + 2 * PAGE + slack
        expect = "the new snapshot under"
    fill(point, leave)
    if stage == "publish":
        # a real process, as cron runs it: its stderr is the one line and nothing else
        proc = run_process(cfg)
        code, err = proc.returncode, proc.stderr
    else:
        code, out, err = run(cfg, capsys)
        err = err.splitlines(keepends=True)[-1]  # (a model library imported by an earlier test may draw a bar)
    assert code == errors.EXIT_WORKDIR, (code, err)
    assert re.match(ONE_LINE.format(workdir=workdir, state="full", why="No space left on device"), err), err
    assert expect in err, err
    assert latest(workdir) == before
    assert temporaries(point) == [], temporaries(point)
    # free the space: the same command now publishes
    (point / "filler").unlink()
    code, out, err = run(cfg, capsys)
    assert code == 0, err
    assert latest(workdir) != before and temporaries(point) == []
