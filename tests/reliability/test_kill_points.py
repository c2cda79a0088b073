"""kill -9 a real `recaug run` across generate, encode and publish; re-running publishes what an
uninterrupted run publishes.

Every kill is a real SIGKILL of a real `python -m recaug.pipelines.cli run` subprocess: either the
process kills itself at a named crash point (RECAUG_CRASH_AT, core/crashpoints.py), or the test
kills it from outside at a seeded random moment found by watching its progress. After each kill:
no half snapshot is visible (`latest` is a complete, hash-verified snapshot or there is none),
readers load it, and every cache shard a reader can see is whole. At the end the same command runs
to completion and its published tables equal an uninterrupted reference run's: the same keys, texts
and dead letters, vectors allclose, no row lost or duplicated, and the generation cache holds exactly
the reference's keys.

Each test is a chain on one workdir (the run after a kill is the re-run, and it dies at the next
point): repeated crashes also pile up leftovers the way a flaky machine does, and the file stays at
about twenty processes. The engine is the deterministic fake (engine.kind fake), the encoder the
hash encoder of tests/fake_encoder.py (the CLI runs through it; its batches pass the same
`encode.batch` crash point and take 0.1 s each, so a kill from outside can land inside encoding).
tests/test_resume_real.py kills runs of the real packaged SmolLM2 and MiniLM, encoding included.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

import recaug
from fake_encoder import CLI as RECAUG_CLI, DELAY_ENV as ENCODE_DELAY_ENV
from recaug.schemas.vectors import vectors_numpy
from recaug.core.config import load_config
from recaug.core.crashpoints import CRASH_ENV, POINTS
from recaug.pipelines.snapshots import (
    CRASH_ENV as SNAPSHOT_CRASH_ENV,
    LATEST_FILE,
    SNAPSHOT_ID_RE,
    SnapshotNotFound,
    list_snapshots,
    read_table,
    resolve_snapshot,
    snapshot_root,
    verify_snapshot,
)
from shop_data import Shop

AUGMENTERS = [
    {"name": "kar_user_preference"},
    {"name": "kar_item_knowledge"},
    {"name": "once_content_summary"},
    # JSON answers: the fake engine's plain text fails to parse, is retried once and dead-lettered,
    # so the chains also cover retry keys and dead-letter rows (not encoded, so not gated)
    {"name": "llmrec_implicit_feedback", "max_entities": 6},
]
VOLATILE = {"created_at", "latency_s"}  # wall-clock facts of the run that wrote the row
RUN_TIMEOUT = 600
# a chain is up to eight runs of up to RUN_TIMEOUT each: longer than the suite's default timeout
pytestmark = pytest.mark.timeout(3600)
# each encoder batch of the hash encoder takes this long, so that encoding lasts long enough
# (13 batches) for the kill from outside to land inside it
ENCODE_BATCH_SECONDS = 0.1


# --- the dataset, the config and a `recaug run` subprocess ----------------------------------------------


def write_shop(folder: Path) -> None:
    Shop().write(folder)


def write_config(data_dir: Path, workdir: Path) -> Path:
    cfg = {
        "name": "shop",
        "workdir": str(workdir),
        "dataset": Shop().dataset(data_dir, domain="movies"),
        "engine": {"kind": "fake"},
        # one request per shard: ~120 cache shards per run, so compaction (>= 64 shards) happens too
        "runner": {"shard_size": 1},
        "encoder": {"batch_size": 8},
        "augmenters": AUGMENTERS,
        "publish": {"keep_snapshots": 1},  # so a publish also runs retention
    }
    path = workdir.parent / f"{workdir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class Run:
    """A `recaug run` subprocess whose output lines are collected as they come."""

    def __init__(self, config: Path, crash_at: str | None = None):
        env = {k: v for k, v in os.environ.items() if k not in (CRASH_ENV, SNAPSHOT_CRASH_ENV)}
        env["PYTHONUNBUFFERED"] = "1"
        env[ENCODE_DELAY_ENV] = str(ENCODE_BATCH_SECONDS)
        if crash_at:
            env[CRASH_ENV] = crash_at
        self.crash_at = crash_at
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*RECAUG_CLI, "run", str(config), "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, condition, timeout: float = RUN_TIMEOUT) -> bool:
        """Poll until `condition()` holds (True) or the process exits (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return bool(condition())
            time.sleep(0.01)
        raise AssertionError(f"nothing happened within {timeout} s:\n{self.output}")

    def saw(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in list(self.lines))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"recaug run did not finish within {timeout} s:\n{self.output}") from None
        self._pump.join(timeout=30)
        return self.proc.returncode


def run_killed_at(config: Path, point: str) -> Run:
    run = Run(config, crash_at=point)
    rc = run.finish()
    assert rc == -signal.SIGKILL, f"the run was to die by SIGKILL at {point}, but exited with {rc}:\n{run.output}"
    return run


def run_to_completion(config: Path) -> Run:
    run = Run(config)
    rc = run.finish()
    assert rc == 0, run.output
    assert "Traceback" not in run.output, run.output
    return run


# --- what a kill may leave and what a reader sees -----------------------------------------------------


def assert_consistent(config: Path) -> str | None:
    """No half snapshot is visible, readers load `latest`, every visible cache shard is whole.
    Returns the id of `latest` (None when nothing is published)."""
    cfg = load_config(config)
    root = snapshot_root(cfg)
    snaps = list_snapshots(root) if root.exists() else []
    latest = None
    if not (root / LATEST_FILE).exists():
        assert snaps == []
        with pytest.raises(SnapshotNotFound):
            recaug.features.load(config)
    else:
        info = resolve_snapshot(root, "latest")
        latest = info.snapshot_id
        assert latest in [s.snapshot_id for s in snaps]
        for snap in snaps:
            assert verify_snapshot(root, snap.snapshot_id) == [], f"snapshot {snap.snapshot_id} is not whole"
        for name, rows in info.tables.items():
            assert read_table(root, latest, name).num_rows == rows, name
        feats = recaug.features.load(config)
        assert feats.height == sum(r for n, r in info.tables.items() if n.startswith("embeddings/"))
        assert feats["snapshot_id"].unique().to_list() == [latest]
    # a folder renamed into place but never committed is not listed (its id is newer than LATEST)
    for p in root.iterdir() if root.exists() else []:
        if SNAPSHOT_ID_RE.match(p.name) and (latest is None or p.name > latest):
            assert p.name not in [s.snapshot_id for s in snaps]
    cache = cfg.workdir_path() / "cache"
    for shard in [*cache.glob("generations/*.parquet"), *cache.glob("encodings/*/*.parquet")]:
        if not shard.name.startswith("."):
            pq.read_table(shard)  # readers skip temporary names; anything else must be a whole file
    for run_dir in (cfg.workdir_path() / "runs").glob("*"):
        if not run_dir.name.startswith("."):
            assert (run_dir / "report.json").is_file(), f"run folder {run_dir} is visible but incomplete"
    return latest


def cache_keys(config: Path) -> pl.Series:
    shards = [p for p in (load_config(config).workdir_path() / "cache" / "generations").glob("*.parquet")
              if not p.name.startswith(".")]
    return pl.read_parquet(shards, columns=["cache_key"])["cache_key"].unique().sort()


def _frame(root: Path, snapshot_id: str, name: str) -> tuple[pl.DataFrame, np.ndarray | None, dict]:
    table = read_table(root, snapshot_id, name)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"recaug.snapshot"}
    df = pl.from_arrow(table)
    keys = [c for c in ("entity_id", "user_id", "item_id", "cache_key", "text_hash") if c in df.columns]
    df = df.sort(keys) if keys else df
    vectors = None
    if "vector" in df.columns:
        vectors = vectors_numpy(df.select("vector").to_arrow())
        df = df.drop("vector")
    return df.drop([c for c in df.columns if c in VOLATILE]), vectors, meta


def assert_same_tables(reference: Path, config: Path) -> None:
    """The latest snapshot of `config` holds the reference's tables: same names, rows, keys, texts."""
    ref_root, root = snapshot_root(load_config(reference)), snapshot_root(load_config(config))
    ref, got = resolve_snapshot(ref_root, "latest"), resolve_snapshot(root, "latest")
    assert sorted(got.tables) == sorted(ref.tables)
    assert got.tables == ref.tables  # row counts
    for name in ref.tables:
        a, va, ma = _frame(ref_root, ref.snapshot_id, name)
        b, vb, mb = _frame(root, got.snapshot_id, name)
        assert ma == mb, name
        for key in ("entity_id", "cache_key"):
            if key in b.columns and name.split("/")[0] in ("generated", "embeddings", "dead_letter"):
                assert b[key].n_unique() == b.height, f"{name}: duplicated {key}"
        assert b.equals(a), f"{name} differs from the uninterrupted run's"
        if va is not None:
            np.testing.assert_allclose(vb, va, rtol=0, atol=1e-5, err_msg=name)
    assert cache_keys(config).equals(cache_keys(reference))


def age_leftovers(config: Path) -> list[Path]:
    """The temporary files and folders killed writers left in the caches and runs, dated two hours
    back (the age after which a run removes them; a younger one may belong to a live writer)."""
    workdir = load_config(config).workdir_path()
    folders = [workdir / "cache" / "generations", *(workdir / "cache" / "encodings").glob("*"), workdir / "runs"]
    old = time.time() - 2 * 3600
    found = [p for folder in folders if folder.is_dir() for p in folder.glob(".*")]
    for p in found:
        os.utime(p, (old, old))
    return found


def assert_resumes_to_reference(reference: Path, config: Path) -> list[Path]:
    """Run to completion, compare with the reference; returns the killed writers' leftovers it removed."""
    leftovers = age_leftovers(config)
    run_to_completion(config)
    assert [p for p in leftovers if p.exists()] == [], "the run left old temporaries of killed writers behind"
    latest = assert_consistent(config)
    assert latest is not None
    assert_same_tables(reference, config)
    root = snapshot_root(load_config(config))
    stale = [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))
             or (SNAPSHOT_ID_RE.match(p.name) and p.name > latest)]
    assert stale == [], "the completed run left the killed publishes' leftovers behind"
    return leftovers


# --- the reference: one uninterrupted run, shared by every chain -------------------------------------------


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill_points")
    write_shop(base / "data")

    class Shop:
        def config(self, name: str) -> Path:
            return write_config(base / "data", base / name)

    shop = Shop()
    shop.reference = shop.config("reference")
    run = run_to_completion(shop.reference)
    shop.reference_seconds = time.monotonic() - run.started
    shop.reference_shards = len(cache_keys(shop.reference))
    encoded = re.search(r"(\d+) encoded, \d+ from the encoding cache, ([\d.]+) s", run.output)
    assert encoded and int(encoded.group(1)) == 100, run.output
    shop.encode_seconds = float(encoded.group(2))
    assert "0 dead-letter" not in run.output  # the JSON augmenter's rows are dead-lettered as planned
    assert assert_consistent(shop.reference) is not None
    return shop


def test_every_crash_point_is_documented():
    from recaug.pipelines.snapshots import CRASH_POINTS

    assert {f"publish.{step}" for step in CRASH_POINTS} <= set(POINTS)
    used = set(GENERATE + ENCODE + PUBLISH)
    assert {p.split(":")[0] for p in used} == set(POINTS), "every crash point is exercised by a chain below"


# --- the chains --------------------------------------------------------------------------------------------

# with shard_size 1 each generation-cache shard is one request; the reference writes ~120
GENERATE = [
    "generate.cache_write:3",  # two shards committed, the third written under its temporary name
    "generate.shard_committed:25",  # 25 more shards committed
    "generate.compact",  # generation finished; compaction merged and removed one source shard
    "generate.run_written",  # all cache hits; the run folder is in place, nothing encoded
]
ENCODE = [
    "encode.batch:2",  # the first augmenter's texts: two batches of 8 computed, nothing stored
    "encode.cache_write:2",  # the first augmenter's vectors committed, the second's temporary shard written
    "encode.cache_committed",  # the second augmenter's vectors committed, the third not encoded
    "gate.passed",  # everything encoded and gated, nothing published
]
PUBLISH = [
    "publish.first_table",  # nothing published yet: readers find no snapshot
    "publish.tables_written",
    "publish.manifest_written",
    "publish.renamed",  # the folder is in place but LATEST was never written: still invisible
    "publish.committed",  # LATEST names it: the first snapshot is out, retention not run
    "publish.retention",  # a second snapshot committed, the first one moved to the trash
    "publish.locked",  # a third publish dies holding the lock: LATEST stays on the second
]


def _chain(shop, workdir: str, points: list[str]) -> tuple[list[str | None], list[Path]]:
    config = shop.config(workdir)
    seen = []
    for point in points:
        run_killed_at(config, point)
        seen.append(assert_consistent(config))
    return seen, assert_resumes_to_reference(shop.reference, config)


def test_kills_during_generation(shop):
    published, leftovers = _chain(shop, "generate", GENERATE)
    assert published == [None] * len(GENERATE)  # nothing is published before generation ends
    assert any(p.parent.name == "generations" for p in leftovers)  # the shard killed before its rename


def test_kills_during_encoding(shop):
    published, leftovers = _chain(shop, "encode", ENCODE)
    assert published == [None] * len(ENCODE)
    assert any(p.parent.parent.name == "encodings" for p in leftovers)


def test_kills_during_publish(shop):
    published, _ = _chain(shop, "publish", PUBLISH)
    # killed before the commit point: nothing (then the previous snapshot) stays latest
    assert published[:4] == [None] * 4
    first, second, third = published[4:]
    assert first is not None and second > first and third == second


def test_kills_from_outside_at_random_moments(shop):
    """SIGKILL sent by the test while the run works: after a seeded random number of cache shards,
    at a seeded random moment of encoding, and at a seeded random moment around publishing."""
    rng = random.Random(20261123)
    config = shop.config("outside")
    shards = load_config(config).workdir_path() / "cache" / "generations"
    outcomes = []

    def count_shards() -> int:
        return len([p for p in shards.glob("*.parquet") if not p.name.startswith(".")]) if shards.exists() else 0

    # 1. while generating: once at least k shards are committed
    k = rng.randint(5, shop.reference_shards // 2)
    run = Run(config)
    assert run.wait_until(lambda: count_shards() >= k), f"the run ended before {k} shards:\n{run.output}"
    run.kill()
    assert run.finish() == -signal.SIGKILL
    assert k <= len(cache_keys(config)) < shop.reference_shards
    outcomes.append(assert_consistent(config))

    # 2. while encoding (the re-run generates the rest first)
    run = Run(config)
    assert run.wait_until(lambda: run.saw(r"^encode: ")), run.output
    time.sleep(rng.uniform(0.0, shop.encode_seconds / 2))
    run.kill()
    rc = run.finish()
    assert rc in (-signal.SIGKILL, 0), run.output
    outcomes.append(assert_consistent(config))

    # 3. around publishing: a random moment after the gate passed (the process may have finished)
    run = Run(config)
    assert run.wait_until(lambda: run.saw(r"output gate PASSED")), run.output
    time.sleep(rng.uniform(0.0, 0.3))
    run.kill()
    rc = run.finish()
    assert rc in (-signal.SIGKILL, 0), run.output
    outcomes.append(assert_consistent(config))

    assert outcomes[0] is None
    assert_resumes_to_reference(shop.reference, config)


def test_only_old_temporaries_are_removed(tmp_path):
    """A temporary younger than the horizon may be a live writer's (a Beam worker's, another run's)."""
    from recaug.core.storage import remove_stale_temporaries

    old = time.time() - 2 * 3600
    (tmp_path / ".a.parquet.1.tmp").write_text("killed writer")
    (tmp_path / ".b.parquet.2.tmp").write_text("live writer")
    (tmp_path / ".run.partial").mkdir()
    (tmp_path / ".run.partial" / "x.parquet").write_text("killed run")
    (tmp_path / "c.parquet").write_text("a shard")
    (tmp_path / ".hidden-but-not-ours").write_text("kept")
    for name in (".a.parquet.1.tmp", ".run.partial", "c.parquet", ".hidden-but-not-ours"):
        os.utime(tmp_path / name, (old, old))
    assert sorted(remove_stale_temporaries(tmp_path)) == [".a.parquet.1.tmp", ".run.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.parquet.2.tmp", ".hidden-but-not-ours", "c.parquet"]
