"""Data contracts (pyarrow schemas) and the great-expectations gates that enforce them."""

from recaug.schemas.tables import (  # noqa: F401
    ALL,
    CTR_SAMPLES,
    DEAD_LETTER,
    EMBEDDING_METADATA_KEYS,
    GENERATED_TEXTS,
    INTERACTIONS,
    ITEMS,
    QUARANTINE,
    REQUIRED_COLUMNS,
    SPLIT_INTERACTIONS,
    SPLITS,
    SYNTHETIC_INTERACTIONS,
    SYNTHETIC_ITEMS,
    USERS,
    conform,
    embedding_schema,
    empty,
)
