"""TableParts: pieces of a table appended to an anonymous Arrow file and read back memory-mapped
(core/spill.py), equal to the same pieces held in memory."""

from __future__ import annotations

import pyarrow as pa
import pytest

from recaug.core.spill import TableParts

SCHEMA = pa.schema([("entity_id", pa.string()), ("text", pa.string()), ("n", pa.int32())], metadata={"k": "v"})


def piece(ids: list[int]) -> pa.Table:
    return pa.table({"entity_id": [f"e{i:06d}" for i in ids], "text": ["x" * (i % 50) for i in ids],
                     "n": pa.array(ids, pa.int32())}, schema=SCHEMA)


@pytest.mark.parametrize("spilled", [False, True])
def test_pieces_in_order_are_joined_as_they_are(tmp_path, spilled):
    parts = TableParts(SCHEMA, "entity_id", tmp_path / "spill" if spilled else None)
    for start in range(0, 30_000, 10_000):
        parts.append(piece(list(range(start, start + 10_000))))
    parts.append(piece([]))  # an empty piece changes nothing
    whole = parts.table()
    assert parts.rows == whole.num_rows == 30_000 and parts.in_order
    assert whole.equals(piece(list(range(30_000))))
    assert whole.schema.metadata == SCHEMA.metadata
    assert whole.column("entity_id").num_chunks == 3  # no copy into one chunk
    if spilled:
        assert list((tmp_path / "spill").iterdir()) == []  # anonymous file: nothing to clean up after a kill


def test_a_spilled_table_is_memory_mapped_not_allocated(tmp_path):
    parts = TableParts(SCHEMA, "entity_id", tmp_path)
    for start in range(0, 200_000, 50_000):
        parts.append(piece(list(range(start, start + 50_000))))
    before = pa.total_allocated_bytes()
    whole = parts.table()
    assert whole.nbytes > 5_000_000
    assert pa.total_allocated_bytes() - before < whole.nbytes / 10  # the buffers point into the mapping


@pytest.mark.parametrize("spilled", [False, True])
def test_pieces_out_of_order_are_sorted_like_one_piece(tmp_path, spilled):
    parts = TableParts(SCHEMA, "entity_id", tmp_path if spilled else None)
    parts.append(piece([5, 6, 7]))
    parts.append(piece([1, 2, 9]))
    whole = parts.table()
    assert not parts.in_order
    assert whole.column("entity_id").to_pylist() == [f"e{i:06d}" for i in (1, 2, 5, 6, 7, 9)]
    assert whole.column("n").to_pylist() == [1, 2, 5, 6, 7, 9]


def test_no_piece_gives_the_empty_table_and_no_piece_after_table(tmp_path):
    parts = TableParts(SCHEMA, "entity_id", tmp_path)
    assert parts.table().equals(SCHEMA.empty_table()) and parts.rows == 0
    with pytest.raises(RuntimeError, match="already called"):
        parts.append(piece([1]))
