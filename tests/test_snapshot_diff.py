"""`recaug snapshots diff`: what counts as the same features, and what a difference looks like."""

import numpy as np
import pyarrow as pa
import pytest

from recaug.schemas.vectors import fixed_size_vectors
from recaug.pipelines import cli
from recaug.pipelines.snapshot_diff import (
    DIFFERENT,
    IDENTICAL,
    ONLY_IN_A,
    WITHIN_TOLERANCE,
    diff_snapshots,
    locate_snapshot,
)
from recaug.pipelines.snapshots import publish_snapshot, resolve_snapshot
from recaug.schemas.tables import embedding_schema


def tables(texts=("warm family story", "dark crime drama", "space journey"), vectors=None, created=0, latency=0.5,
           order=(0, 1, 2), extra_table=False):
    ids = ["u1", "u2", "u3"]
    vectors = np.eye(3, 4, dtype=np.float32) if vectors is None else vectors
    generated = pa.table({
        "entity_id": [ids[i] for i in order],
        "cache_key": [f"k{i}" for i in order],
        "text": [texts[i] for i in order],
        "latency_s": pa.array([latency] * 3, pa.float32()),
        "created_at": pa.array([1_700_000_000_000_000 + created] * 3, pa.timestamp("us", tz="UTC")),
    })
    emb = pa.Table.from_arrays(
        [pa.array(ids), fixed_size_vectors(vectors), pa.array([f"h{i}" for i in range(3)])],
        schema=embedding_schema(4, {"recaug.encoder": "enc@1", "recaug.augmenter": "a"}),
    )
    out = {"generated/a": generated, "embeddings/a": emb}
    if extra_table:
        out["dead_letter/a"] = pa.table({"entity_id": pa.array([], pa.string())})
    return out


def publish(root, tabs, runner="local"):
    return publish_snapshot(root, tabs, {"data_cutoff": 1_700_000_000, "runner": runner})


def test_same_features_despite_timing_row_order_and_tiny_float_noise(tmp_path):
    a = publish(tmp_path / "a", tables())
    noisy = np.eye(3, 4, dtype=np.float32) + np.float32(3e-7)
    b = publish(tmp_path / "b", tables(vectors=noisy, created=123, latency=9.0, order=(2, 0, 1)), runner="beam")
    result = diff_snapshots(a, b)
    assert result.same, result.summary()
    assert result.table("generated/a").status == IDENTICAL
    emb = result.table("embeddings/a")
    assert emb.status == WITHIN_TOLERANCE and 2e-7 < emb.max_abs_diff < 4e-7
    summary = result.summary()
    assert "runner local / beam" in summary and "the snapshots hold the same features" in summary


def test_texts_vectors_keys_and_tables_that_differ_are_named(tmp_path):
    a = publish(tmp_path / "a", tables())
    far = np.eye(3, 4, dtype=np.float32)
    far[1, 2] = 0.01
    b = publish(tmp_path / "b", tables(texts=("warm family story", "dark crime DRAMA", "space journey"), vectors=far,
                                       extra_table=True))
    result = diff_snapshots(a, b)
    assert not result.same
    gen = result.table("generated/a")
    assert gen.status == DIFFERENT and gen.details == ["text: 1 of 3 rows differ"]
    emb = result.table("embeddings/a")
    assert emb.status == DIFFERENT and "vector: 1 of 3 rows differ by more than 1e-05" in emb.details[0]
    assert result.table("dead_letter/a").status == "only in B"
    assert diff_snapshots(b, a).table("dead_letter/a").status == ONLY_IN_A

    other_keys = tables()
    other_keys["generated/a"] = other_keys["generated/a"].set_column(0, "entity_id", pa.array(["u1", "u2", "u9"]))
    c = publish(tmp_path / "c", other_keys)
    keyed = diff_snapshots(a, c).table("generated/a")
    assert keyed.status == DIFFERENT and keyed.details == ["keys (entity_id, cache_key): 1 only in A, 1 only in B"]


def test_locate_accepts_ids_latest_snapshot_folders_and_other_roots(tmp_path):
    first = publish(tmp_path / "a", tables())
    second = publish(tmp_path / "a", tables())
    other = publish(tmp_path / "b", tables())
    root = tmp_path / "a"
    assert locate_snapshot(root, "latest").snapshot_id == second.snapshot_id
    assert locate_snapshot(root, first.snapshot_id).snapshot_id == first.snapshot_id
    assert locate_snapshot(root, str(other.path)).path == other.path
    assert locate_snapshot(root, str(tmp_path / "b")).path == other.path  # another root: its latest
    with pytest.raises(LookupError):
        locate_snapshot(root, str(tmp_path))  # a folder that is neither


def test_cli_diff_exit_codes(tmp_path, write_config, capsys):
    path = write_config({"name": "d", "dataset": {"kind": "ml100k"}})
    root = tmp_path / "work" / "snapshots"
    a = publish(root, tables())
    same = publish(tmp_path / "elsewhere", tables(created=5))
    assert cli.main(["snapshots", "diff", str(path), a.snapshot_id, str(same.path)]) == 0
    assert "the snapshots hold the same features" in capsys.readouterr().out
    publish(root, tables(texts=("x", "y", "z")))
    assert cli.main(["snapshots", "diff", str(path), a.snapshot_id]) == 1  # B defaults to latest
    out = capsys.readouterr().out
    assert "text: 3 of 3 rows differ" in out and "the snapshots differ in 1 of 2 table(s)" in out
    assert cli.main(["snapshots", "diff", str(path)]) == 2
    assert cli.main(["snapshots", "diff", str(path), "20990101T000000000000Z-00000000"]) == 2
    assert resolve_snapshot(root).snapshot_id != a.snapshot_id
