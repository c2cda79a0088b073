"""Kill -9 a real `recaug run` (packaged SmolLM2) mid-generation, and its re-run at a crash point
while it writes the encoding cache; the same command then finishes with no lost and no duplicated
rows, and its published tables equal an uninterrupted run's. (tests/reliability/test_kill_points.py
drives every crash point with the deterministic fake engine.)"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

import recaug
from recaug.schemas.vectors import vectors_numpy
from recaug.core.config import load_config
from recaug.core.crashpoints import CRASH_ENV
from recaug.pipelines.snapshots import SnapshotNotFound, list_snapshots, read_table, resolve_snapshot, snapshot_root

# three real-model runs, each allowed 900 s below: longer than the suite's default timeout
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]

CONFIG = {
    "name": "resume",
    "dataset": {"kind": "ml100k"},
    "engine": {"kind": "transformers", "model": "smollm2", "batch_size": 4, "max_new_tokens": 12},
    "runner": {"shard_size": 4},
    "augmenters": [{"name": "kar_item_knowledge", "max_entities": 24}],
    # answers cut at 12 tokens from a 135M model: some are prompt echoes (dead letters by the text
    # check); the test is about resuming, so the floors only ask for most items to publish
    "output_gate": {"min_coverage": 0.5, "min_parse_rate": 0.5, "max_dead_letter_share": 0.5, "max_text_rejected_share": 0.5},
}


def _run(config_path, crash_at=None, **kw):
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env.update(OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")  # a killed run's lines are kept
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen([sys.executable, "-m", "recaug.pipelines.cli", "run", str(config_path), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def _table(cfg, name):
    root = snapshot_root(cfg)
    info = resolve_snapshot(root, "latest")
    return pl.from_arrow(read_table(root, info.snapshot_id, name)).sort("entity_id")


def _generated(cfg):
    return _table(cfg, "generated/kar_item_knowledge")


def _nothing_published(cfg):
    assert list_snapshots(snapshot_root(cfg)) == []
    with pytest.raises(SnapshotNotFound):
        recaug.features.load(cfg)


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, write_config):
    killed_cfg = write_config({**CONFIG, "workdir": str(tmp_path / "killed")}, name="killed.yaml")
    clean_cfg = write_config({**CONFIG, "workdir": str(tmp_path / "clean")}, name="clean.yaml")
    shards = tmp_path / "killed" / "cache" / "generations"

    proc = _run(killed_cfg)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if shards.exists() and len([p for p in shards.glob("*.parquet")]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(shards.glob("*.parquet")))
    assert 2 <= committed < 6  # killed mid-run, with whole shards only
    assert not (tmp_path / "killed" / "snapshots" / "LATEST").exists()  # nothing half-published
    _nothing_published(load_config(killed_cfg))

    # the re-run generates the missing shards, encodes, and dies writing the encoding-cache shard
    resumed = _run(killed_cfg, crash_at="encode.cache_write")
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == -signal.SIGKILL, out
    calls = int(out.split("kar_item_knowledge")[1].split(" LLM calls")[0].split()[-1].replace(",", ""))
    assert calls == 24 - 4 * committed  # only the missing shards were generated again
    _nothing_published(load_config(killed_cfg))

    finished = _run(killed_cfg)
    out, _ = finished.communicate(timeout=900)
    assert finished.returncode == 0, out
    assert "augmentation: 0 LLM calls" in out  # every answer was in the cache

    clean = _run(clean_cfg)
    out, _ = clean.communicate(timeout=900)
    assert clean.returncode == 0, out

    a, b = _generated(load_config(killed_cfg)), _generated(load_config(clean_cfg))
    # every item is published or a dead letter with its reason (a prompt echo), once, in both workdirs
    dead_a, dead_b = (_table(load_config(c), "dead_letter/kar_item_knowledge") for c in (killed_cfg, clean_cfg))
    assert a.height + dead_a.height == 24 and a["entity_id"].n_unique() == a.height and a.height >= 12
    cols = ["entity_id", "cache_key", "prompt", "raw_text", "text", "input_tokens", "output_tokens", "finish_reason"]
    assert a.select(cols).equals(b.select(cols))
    assert dead_a.select("entity_id", "cache_key", "reason").equals(dead_b.select("entity_id", "cache_key", "reason"))
    ea, eb = (_table(load_config(c), "embeddings/kar_item_knowledge") for c in (killed_cfg, clean_cfg))
    assert ea.select("entity_id", "text_hash").equals(eb.select("entity_id", "text_hash"))
    np.testing.assert_allclose(vectors_numpy(ea.select("vector").to_arrow()), vectors_numpy(eb.select("vector").to_arrow()),
                               atol=1e-5)
