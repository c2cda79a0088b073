"""The data contracts of every table recaug reads or writes (docs/architecture.md, "Data flow" and "Contracts").

One place defines them; loaders, gates, augmenters, encoders, snapshots and the CTR side all
import from here. Ids are strings everywhere (a bring-your-own catalogue may use SKUs), timestamps
are UTC seconds as int64 so that point-in-time comparisons are plain integer comparisons.
"""

from __future__ import annotations

import pyarrow as pa

# users and items may carry extra text columns (dataset.<table>.attributes), named with this prefix in
# the canonical tables: `attr_author`, `attr_publisher`
ATTRIBUTE_PREFIX = "attr_"

ID = pa.string()
TS = pa.int64()  # unix seconds, UTC

# --- raw inputs -------------------------------------------------------------------------------

USERS = pa.schema(
    [
        pa.field("user_id", ID, nullable=False),
        pa.field("age", pa.int32()),
        pa.field("gender", pa.string()),
        pa.field("occupation", pa.string()),
        pa.field("region", pa.string()),
    ],
    metadata={"recaug.table": "users"},
)

ITEMS = pa.schema(
    [
        pa.field("item_id", ID, nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("year", pa.int32()),
        pa.field("genres", pa.list_(pa.string())),
        pa.field("description", pa.string()),
    ],
    metadata={"recaug.table": "items"},
)

INTERACTIONS = pa.schema(
    [
        pa.field("user_id", ID, nullable=False),
        pa.field("item_id", ID, nullable=False),
        pa.field("rating", pa.float32()),
        pa.field("timestamp", TS, nullable=False),
    ],
    metadata={"recaug.table": "interactions"},
)

# Columns a bring-your-own table must provide (after column mapping); the rest are optional.
REQUIRED_COLUMNS = {
    "users": ["user_id"],
    "items": ["item_id", "title"],
    "interactions": ["user_id", "item_id", "timestamp"],
}

QUARANTINE = pa.schema(
    [
        pa.field("table", pa.string(), nullable=False),
        pa.field("row_number", pa.int64(), nullable=False),  # 0-based row in the source file
        pa.field("check", pa.string(), nullable=False),  # which expectation the row failed
        pa.field("reason", pa.string(), nullable=False),  # human-readable
        pa.field("record", pa.string(), nullable=False),  # the raw row as JSON
    ],
    metadata={"recaug.table": "quarantine"},
)

# --- splits -------------------------------------------------------------------------------------

SPLITS = ("prompt", "train", "valid", "test")

# Interactions annotated with their split; `prompt` rows feed prompts only, never CTR samples.
SPLIT_INTERACTIONS = INTERACTIONS.append(pa.field("split", pa.string(), nullable=False)).with_metadata(
    {"recaug.table": "split_interactions"}
)

CTR_SAMPLES = pa.schema(
    [
        pa.field("user_id", ID, nullable=False),
        pa.field("item_id", ID, nullable=False),
        pa.field("timestamp", TS, nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # train | valid | test
        pa.field("synthetic", pa.bool_(), nullable=False),  # LLM-made samples; train only
    ],
    metadata={"recaug.table": "ctr_samples"},
)

# --- generation ---------------------------------------------------------------------------------

GENERATED_TEXTS = pa.schema(
    [
        pa.field("entity_id", ID, nullable=False),
        pa.field("entity_kind", pa.string(), nullable=False),  # user | item
        pa.field("augmenter", pa.string(), nullable=False),
        pa.field("template_hash", pa.string(), nullable=False),
        pa.field("parser_version", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("cache_key", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("raw_text", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),  # what gets encoded
        pa.field("parsed_json", pa.string(), nullable=False),  # the validated record, as JSON
        pa.field("input_tokens", pa.int32(), nullable=False),
        pa.field("output_tokens", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # stop | length | error
        pa.field("latency_s", pa.float32(), nullable=False),
        pa.field("attempts", pa.int16(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"recaug.table": "generated_texts"},
)

DEAD_LETTER = pa.schema(
    [
        pa.field("entity_id", ID, nullable=False),
        pa.field("entity_kind", pa.string(), nullable=False),
        pa.field("augmenter", pa.string(), nullable=False),
        pa.field("template_hash", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("cache_key", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("raw_text", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("attempts", pa.int16(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"recaug.table": "dead_letter"},
)

# ONCE-style generated items for cold users: never mixed into the real catalogue.
SYNTHETIC_ITEMS = pa.schema(
    [
        pa.field("item_id", ID, nullable=False),  # "syn:<user>:<n>"
        pa.field("for_user_id", ID, nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("abstract", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("augmenter", pa.string(), nullable=False),
        pa.field("cache_key", pa.string(), nullable=False),
    ],
    metadata={"recaug.table": "synthetic_items", "recaug.synthetic": "true"},
)

# LLMRec implicit-feedback edges and ONCE generated histories: training-only by contract.
SYNTHETIC_INTERACTIONS = pa.schema(
    [
        pa.field("user_id", ID, nullable=False),
        pa.field("item_id", ID, nullable=False),
        pa.field("label", pa.int8(), nullable=False),  # 1 = LLM says liked, 0 = disliked
        pa.field("source", pa.string(), nullable=False),  # augmenter name
        pa.field("cache_key", pa.string(), nullable=False),
    ],
    metadata={"recaug.table": "synthetic_interactions", "recaug.synthetic": "true"},
)

# --- encoding -----------------------------------------------------------------------------------


def embedding_schema(dim: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    """An embedding table: one vector per entity, fixed width so readers get zero-copy arrays."""
    if dim <= 0:
        raise ValueError(f"embedding dimension must be positive, got {dim}")
    meta = {"recaug.table": "embeddings", "recaug.dim": str(dim)}
    meta.update(metadata or {})
    return pa.schema(
        [
            pa.field("entity_id", ID, nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("text_hash", pa.string(), nullable=False),
        ],
        metadata=meta,
    )


# Keys an embedding table's schema metadata must carry (docs/architecture.md, "Contracts").
EMBEDDING_METADATA_KEYS = ("recaug.encoder", "recaug.pooling", "recaug.dim", "recaug.augmenter", "recaug.snapshot")

ALL = {
    "users": USERS,
    "items": ITEMS,
    "interactions": INTERACTIONS,
    "quarantine": QUARANTINE,
    "split_interactions": SPLIT_INTERACTIONS,
    "ctr_samples": CTR_SAMPLES,
    "generated_texts": GENERATED_TEXTS,
    "dead_letter": DEAD_LETTER,
    "synthetic_items": SYNTHETIC_ITEMS,
    "synthetic_interactions": SYNTHETIC_INTERACTIONS,
}


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table` to `schema`, adding missing nullable columns as nulls.

    Raises ValueError naming the column when a non-nullable column is absent or a cast fails,
    so that callers can report it instead of a bare pyarrow traceback.
    """
    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            if col.type != field.type:
                try:
                    col = col.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise ValueError(f"column {field.name!r}: cannot cast {col.type} to {field.type}: {exc}") from exc
            cols.append(col)
        elif field.nullable:
            cols.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"missing required column {field.name!r}")
    return pa.Table.from_arrays(cols, schema=schema)
