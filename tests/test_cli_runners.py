"""`recaug run CONFIG --runner local|ray|beam` as a user runs it, each in a fresh workdir: the three
published snapshots hold the same features, and `recaug snapshots diff` says so.

The config is the demo's (configs/ml100k.yaml: MovieLens-100K, the packaged SmolLM2 and MiniLM)
cut to two augmenters on a few entities, so the three real-model runs fit the test budget."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from recaug.schemas.vectors import vectors_numpy
from recaug.core.config import load_config
from recaug.pipelines.snapshots import read_table, resolve_snapshot, snapshot_root

# three real-model runs and two diffs, each allowed 1800 s below: longer than the suite's default timeout
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

DEMO = Path(__file__).resolve().parent.parent / "configs" / "ml100k.yaml"
RUNNERS = ("local", "ray", "beam")


def tiny_demo_config(tmp_path: Path, runner: str) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data["workdir"] = str(tmp_path / f"work-{runner}")
    # fp32: with the demo's int8 the activation scale is per micro-batch, so the same prompt may answer
    # differently in another batch, and the runners batch differently (docs/engines.md)
    data["engine"].update(batch_size=4, quantize="none")
    data["runner"].update(shard_size=4)
    data["augmenters"] = [
        {"name": "kar_user_preference", "max_entities": 4, "max_new_tokens": 12, "history_token_budget": 200},
        {"name": "kar_item_knowledge", "max_entities": 5, "max_new_tokens": 12},
    ]
    # the demo's own gate floors name augmenters this cut-down config drops; a floor for an unlisted one is a config error
    kept = {a["name"] for a in data["augmenters"]}
    floors = data.get("output_gate", {}).get("augmenters", {})
    data["output_gate"]["augmenters"] = {name: f for name, f in floors.items() if name in kept}
    # five item answers cut at 12 tokens: two of them may say no more than the title (a dead letter by
    # text check); this test compares the runners' snapshots, not the answers, so the floor leaves room
    for name in kept:
        data["output_gate"]["augmenters"].setdefault(name, {})["max_text_rejected_share"] = 0.5
    path = tmp_path / f"ml100k-{runner}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def recaug(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RECAUG_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "recaug.pipelines.cli", *args], capture_output=True, text=True,
                          env=env, timeout=1800)


def test_run_on_ray_and_beam_publishes_the_local_snapshot(tmp_path):
    configs = {kind: tiny_demo_config(tmp_path, kind) for kind in RUNNERS}
    from recaug.pipelines.engines.transformers_engine import TransformersEngine

    TransformersEngine(load_config(configs["local"]).engine).model_dir  # convert the packaged GGUF once, up front
    snapshots = {}
    for kind in RUNNERS:
        proc = recaug("run", str(configs[kind]), "--runner", kind, "--no-progress")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"runner {kind}" in proc.stdout and "published snapshot" in proc.stdout
        cfg = load_config(configs[kind])
        snapshots[kind] = resolve_snapshot(snapshot_root(cfg))
        assert snapshots[kind].manifest["runner"] == kind

    local = snapshots["local"]
    for kind in ("ray", "beam"):
        other = snapshots[kind]
        assert sorted(other.tables) == sorted(local.tables)
        for name in ("kar_user_preference", "kar_item_knowledge"):
            gen_l = pl.from_arrow(read_table(local.path.parent, local.snapshot_id, f"generated/{name}"))
            gen_o = pl.from_arrow(read_table(other.path.parent, other.snapshot_id, f"generated/{name}"))
            assert gen_o.select("entity_id", "cache_key", "raw_text", "text").equals(
                gen_l.select("entity_id", "cache_key", "raw_text", "text")), (kind, name)
            emb_l = read_table(local.path.parent, local.snapshot_id, f"embeddings/{name}")
            emb_o = read_table(other.path.parent, other.snapshot_id, f"embeddings/{name}")
            assert emb_o.column("entity_id").equals(emb_l.column("entity_id"))
            assert emb_o.column("text_hash").equals(emb_l.column("text_hash"))
            np.testing.assert_allclose(vectors_numpy(emb_o), vectors_numpy(emb_l), atol=1e-5, rtol=0)
        dead_l = read_table(local.path.parent, local.snapshot_id, f"dead_letter/{name}")
        # every entity is a published text or a dead letter with its reason (e.g. a prompt echo)
        assert gen_l.height + dead_l.num_rows == 5 and gen_l.height >= 3
        assert all(t.strip() for t in gen_l["raw_text"])  # the model wrote the texts

        # and the user-facing check agrees: exit 0, every table the same
        proc = recaug("snapshots", "diff", str(configs["local"]), "latest", str(other.path.parent))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"runner local / {kind}" in proc.stdout and "the snapshots hold the same features" in proc.stdout
