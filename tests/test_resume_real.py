"""Kill -9 a real `recaug run` (packaged SmolLM2) mid-generation; the same command resumes with no
lost and no duplicated rows, and its published tables equal an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from recaug.pipelines.config import load_config
from recaug.pipelines.snapshots import read_table, resolve_snapshot, snapshot_root

pytestmark = pytest.mark.slow

CONFIG = {
    "name": "resume",
    "dataset": {"kind": "ml100k"},
    "engine": {"kind": "transformers", "model": "smollm2", "batch_size": 4, "max_new_tokens": 12},
    "runner": {"shard_size": 4},
    "augmenters": [{"name": "kar_item_knowledge", "max_entities": 24}],
}


def _run(config_path, **kw):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-m", "recaug.pipelines.cli", "run", str(config_path), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def _generated(cfg):
    root = snapshot_root(cfg)
    info = resolve_snapshot(root, "latest")
    return pl.from_arrow(read_table(root, info.snapshot_id, "generated/kar_item_knowledge")).sort("entity_id")


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

    resumed = _run(killed_cfg)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out
    calls = int(out.split("augmentation: ")[1].split(" LLM calls")[0].replace(",", ""))
    assert calls == 24 - 4 * committed  # only the missing shards were generated again

    clean = _run(clean_cfg)
    out, _ = clean.communicate(timeout=900)
    assert clean.returncode == 0, out

    a, b = _generated(load_config(killed_cfg)), _generated(load_config(clean_cfg))
    assert a.height == 24 and a["entity_id"].n_unique() == 24
    cols = ["entity_id", "cache_key", "prompt", "raw_text", "text", "input_tokens", "output_tokens", "finish_reason"]
    assert a.select(cols).equals(b.select(cols))
