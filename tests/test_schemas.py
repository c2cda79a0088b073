import pyarrow as pa
import pytest

from recaug import schemas
from recaug.schemas import tables


@pytest.mark.parametrize("name", sorted(tables.ALL))
def test_every_schema_round_trips_through_conform(name):
    schema = tables.ALL[name]
    assert schema.metadata[b"recaug.table"] == name.encode()
    empty = tables.empty(schema)
    assert empty.schema.equals(schema)
    assert tables.conform(empty, schema).schema.equals(schema)


def test_conform_casts_adds_optional_and_rejects_missing_required():
    raw = pa.table({"user_id": ["1", "2"], "item_id": ["a", "b"], "timestamp": ["10", "20"]})
    out = tables.conform(raw, schemas.INTERACTIONS)
    assert out.schema.equals(schemas.INTERACTIONS)
    assert out.column("timestamp").to_pylist() == [10, 20]
    assert out.column("rating").null_count == 2  # optional and absent -> nulls
    with pytest.raises(ValueError, match="missing required column 'timestamp'"):
        tables.conform(raw.drop(["timestamp"]), schemas.INTERACTIONS)
    with pytest.raises(ValueError, match="column 'timestamp': cannot cast"):
        tables.conform(raw.set_column(2, "timestamp", pa.array(["x", "y"])), schemas.INTERACTIONS)


def test_embedding_schema_is_fixed_width_float32_with_metadata():
    s = schemas.embedding_schema(384, {"recaug.encoder": "minilm"})
    assert s.field("vector").type == pa.list_(pa.float32(), 384)
    assert s.metadata[b"recaug.dim"] == b"384"
    assert s.metadata[b"recaug.encoder"] == b"minilm"
    assert set(schemas.EMBEDDING_METADATA_KEYS) >= {"recaug.encoder", "recaug.pooling", "recaug.dim"}
    with pytest.raises(ValueError):
        schemas.embedding_schema(0)


def test_split_and_synthetic_contracts():
    assert schemas.SPLIT_INTERACTIONS.names == schemas.INTERACTIONS.names + ["split"]
    assert schemas.SYNTHETIC_ITEMS.metadata[b"recaug.synthetic"] == b"true"
    assert schemas.SYNTHETIC_INTERACTIONS.metadata[b"recaug.synthetic"] == b"true"
    assert "synthetic" in schemas.CTR_SAMPLES.names
    for required in ("entity_id", "augmenter", "template_hash", "model", "input_tokens", "output_tokens",
                     "finish_reason", "created_at", "raw_text"):
        assert required in schemas.GENERATED_TEXTS.names  # docs/architecture.md, Contracts: every generated row carries these
