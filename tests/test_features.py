"""The modeler API on real published snapshots: `load` and the point-in-time join."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import recaug
from recaug.schemas.vectors import fixed_size_vectors
from recaug.core.config import parse_config
from recaug.pipelines.snapshots import publish_snapshot
from recaug.schemas.tables import embedding_schema

DIM = 4


def emb_table(augmenter: str, kind: str, ids: list[str], value: float) -> pa.Table:
    """Every vector of a table is filled with `value`, so a joined vector says where it came from."""
    vectors = np.full((len(ids), DIM), value, dtype=np.float32)
    vectors[:, 1] = np.arange(len(ids), dtype=np.float32)  # and which row
    meta = {"recaug.encoder": "enc", "recaug.pooling": "mean", "recaug.augmenter": augmenter,
            "recaug.entity_kind": kind, "recaug.snapshot": "unpublished"}
    return pa.Table.from_arrays([pa.array(ids), fixed_size_vectors(vectors), pa.array(["h"] * len(ids))],
                                schema=embedding_schema(DIM, meta))


@pytest.fixture
def three_snapshots(tmp_path):
    """Cutoffs 100, 200, 300. User 'u3' only exists from the second snapshot on; item 'i9' never."""
    root = tmp_path / "snaps"
    ids = []
    for n, cutoff in enumerate((100, 200, 300), start=1):
        users = ["u1", "u2"] + (["u3"] if n >= 2 else [])
        tables = {
            "embeddings/kar_user": emb_table("kar_user", "user", users, float(n)),
            "embeddings/kar_item": emb_table("kar_item", "item", ["i1", "i2"], float(10 * n)),
        }
        ids.append(publish_snapshot(root, tables, {"data_cutoff": cutoff}, keep=5).snapshot_id)
    return root, ids


def test_load_returns_one_long_frame_of_the_latest_snapshot(three_snapshots):
    root, ids = three_snapshots
    frame = recaug.features.load(root)
    assert frame.columns == ["snapshot_id", "augmenter", "entity_kind", "entity_id", "vector", "text_hash"]
    assert frame.schema["vector"] == pl.Array(pl.Float32, DIM)
    assert set(frame.get_column("snapshot_id")) == {ids[-1]}
    assert frame.filter(pl.col("augmenter") == "kar_user").height == 3
    users = recaug.features.load(root, snapshot=ids[0], kind="user")
    assert set(users.get_column("entity_id")) == {"u1", "u2"}
    assert recaug.features.vectors_numpy(users)[:, 0].tolist() == [1.0, 1.0]

    arrow = recaug.features.load(root, augmenter="kar_item", as_="arrow")
    assert isinstance(arrow, pa.Table) and arrow.schema.metadata[b"recaug.snapshot"] == ids[-1].encode()
    assert b"kar_item" in arrow.schema.metadata[b"recaug.tables"]
    with pytest.raises(KeyError, match="kar_nope"):
        recaug.features.load(root, augmenter="kar_nope")


def test_load_views_vectors_without_copying(three_snapshots):
    root, _ = three_snapshots
    frame = recaug.features.load(root, augmenter="kar_user")
    view = recaug.features.vectors_numpy(frame)
    assert np.shares_memory(view, frame.get_column("vector").to_numpy())


def test_load_accepts_a_pipeline_config(tmp_path):
    cfg = parse_config({"name": "demo", "workdir": str(tmp_path / "work")})
    root = recaug.features.snapshot_root(cfg)
    publish_snapshot(root, {"embeddings/kar_user": emb_table("kar_user", "user", ["u1"], 1.0)}, {"data_cutoff": 5})
    assert recaug.features.load(cfg).height == 1


def test_point_in_time_join_uses_the_newest_snapshot_strictly_before_each_sample(three_snapshots):
    root, ids = three_snapshots
    samples = pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u3", "u3", "u1", "u2", "u9"],
            "item_id": ["i1", "i2", "i1", "i2", "i1", "i9", "i2", "i1"],
            "timestamp": [50, 100, 101, 150, 250, 300, 301, 999],
            "label": [1, 0, 1, 0, 1, 1, 0, 1],
        }
    )
    joined, report = recaug.features.join_point_in_time(samples, root)
    # order and row count kept; sample columns untouched
    assert joined.select(samples.columns).equals(samples)
    expected_snapshot = [None, None, ids[0], ids[0], ids[1], ids[1], ids[2], ids[2]]
    assert joined.get_column("feature_snapshot").to_list() == expected_snapshot

    def first_component(col):
        return [None if v is None else v[0] for v in joined.get_column(col).to_list()]

    # t=50, t=100: no snapshot is strictly older (cutoff 100 is not < 100)
    # t=150: u3 is not in snapshot 1 -> null; t=250: snapshot 2 has u3
    assert first_component("kar_user_vector") == [None, None, 1.0, None, 2.0, 2.0, 3.0, None]
    assert first_component("kar_item_vector") == [None, None, 10.0, 10.0, 20.0, None, 30.0, 30.0]
    # the row component shows the right entity's vector was picked
    assert joined.get_column("kar_user_vector").to_list()[2][1] == 1.0  # u2 is row 1
    assert report == {
        "samples": 8,
        "without_snapshot": 2,
        "missing_vectors": {"kar_item_vector": 3, "kar_user_vector": 4},
        "snapshots_used": {ids[0]: 2, ids[1]: 2, ids[2]: 2},
        "vector_columns": ["kar_item_vector", "kar_user_vector"],
    }


def test_point_in_time_join_with_datetime_times_and_one_augmenter(three_snapshots):
    root, ids = three_snapshots
    samples = pl.DataFrame(
        {"user_id": ["u1", "u2"], "item_id": ["i1", "i1"],
         "timestamp": [dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(tzinfo=None) for t in (150, 5000)]}
    )
    joined, report = recaug.features.join_point_in_time(samples, root, augmenter="kar_user")
    assert joined.columns == ["user_id", "item_id", "timestamp", "feature_snapshot", "kar_user_vector"]
    assert joined.get_column("feature_snapshot").to_list() == [ids[0], ids[2]]
    assert report["missing_vectors"] == {"kar_user_vector": 0}


def test_point_in_time_join_before_any_snapshot_still_has_the_columns(three_snapshots):
    root, _ = three_snapshots
    samples = pl.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "timestamp": [1]})
    joined, report = recaug.features.join_point_in_time(samples, root)
    assert joined.schema["kar_user_vector"] == pl.Array(pl.Float32, DIM)
    assert joined.get_column("kar_user_vector").null_count() == 1
    assert report["without_snapshot"] == 1 and report["snapshots_used"] == {}
