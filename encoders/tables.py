"""Generated-text tables -> embedding tables (docs/architecture.md, "Contracts").

An embedding table has one row per generated row (same order): `entity_id`, `vector`
(`fixed_size_list<float32>[d]`) and `text_hash` (sha256 of the encoded text), and its schema
metadata names the encoder, pooling, dimension, augmenter, entity kind, template hash(es) and the
snapshot (stamped with the final id when the snapshot is published).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recaug.encoders.cache import EncodingCache
from recaug.encoders.pca import PCAProjection, apply_pca, fit_pca
from recaug.schemas.vectors import fixed_size_vectors, vectors_numpy
from recaug.core.memory import release_memory
from recaug.core.spill import TableParts
from recaug.schemas.tables import embedding_schema

# placeholder until publish_snapshot stamps the id it assigns
UNPUBLISHED = "unpublished"


def _single_value(table: pa.Table, column: str, what: str) -> str | None:
    values = pc.unique(table.column(column)).to_pylist()
    if len(values) > 1:
        raise ValueError(f"a generated-text table must hold one {what}; found {sorted(map(str, values))}")
    return values[0] if values else None


def embedding_metadata(table: pa.Table) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}


# texts per cache lookup and encode call (each is one execute on a Ray/Beam encode stage)
ENCODE_CHUNK = 100_000


def encode_table(
    generated: pa.Table,
    encoder,
    cache_dir: Path | EncodingCache,
    augmenter: str,
    snapshot_id: str = UNPUBLISHED,
    encode: Callable[[list[str]], np.ndarray] | None = None,
    spill_dir: Path | None = None,
) -> pa.Table:
    """Encode the `text` column of one augmenter's GENERATED_TEXTS table.

    `cache_dir` may be a folder or an `EncodingCache` (pass one to read its hits/misses counters).
    Texts already in the cache for this encoder id are not encoded again. `encode` computes the
    vectors of the cache misses (default `encoder.encode`; a runner's encode stage plugs in here).
    With `spill_dir` the table is memory-mapped from an anonymous file there instead of held in memory.
    """
    for col in ("entity_id", "entity_kind", "augmenter", "template_hash", "text"):
        if col not in generated.column_names:
            raise ValueError(f"generated-text table lacks column {col!r}; expected the GENERATED_TEXTS schema")
    found_aug = _single_value(generated, "augmenter", "augmenter")
    if found_aug is not None and found_aug != augmenter:
        raise ValueError(f"generated-text table is for augmenter {found_aug!r}, not {augmenter!r}")
    kind = _single_value(generated, "entity_kind", "entity kind") or ""
    text_col = generated.column("text")
    if text_col.null_count:
        raise ValueError(f"{augmenter}: {text_col.null_count} generated rows have a null text; they belong in the dead-letter table")
    cache = cache_dir if isinstance(cache_dir, EncodingCache) else EncodingCache(Path(cache_dir), encoder.encoder_id, encoder.dim)
    if cache.encoder_id != encoder.encoder_id:
        raise ValueError(f"cache is for encoder {cache.encoder_id!r}, not {encoder.encoder_id!r}")
    templates = sorted(set(pc.unique(generated.column("template_hash")).to_pylist()))
    cfg = encoder.cfg
    meta = {
        "recaug.encoder": encoder.encoder_id,
        "recaug.model": encoder.model_id,
        "recaug.pooling": cfg.pooling,
        "recaug.normalize": str(cfg.normalize).lower(),
        "recaug.max_length": str(cfg.max_length),
        "recaug.dim": str(encoder.dim),
        "recaug.augmenter": augmenter,
        "recaug.entity_kind": kind,
        "recaug.snapshot": snapshot_id,
        "recaug.template_hash": ",".join(templates),
    }
    schema = embedding_schema(encoder.dim, meta)
    ids = generated.column("entity_id").cast(pa.string())
    # a slice of texts at a time: the cache lookup and the hashes are Python lists per text, which at
    # a million texts held ~0.5 KB per entity beyond the vectors kept; with `spill_dir` each slice's
    # rows go to disk as they are done (core/spill.py)
    parts = TableParts(schema, folder=spill_dir)
    for start in range(0, len(text_col), ENCODE_CHUNK):
        vectors, hashes = cache.get_or_encode(text_col.slice(start, ENCODE_CHUNK), encode or encoder.encode)
        parts.append(pa.Table.from_arrays(
            [ids.slice(start, ENCODE_CHUNK), fixed_size_vectors(vectors), pa.array(hashes, pa.string())], schema=schema,
        ))
        del vectors, hashes
        release_memory()  # the slice's texts and hashes as Python objects
    return parts.table()


@dataclass
class EncodingResult:
    embeddings: dict[str, pa.Table]  # augmenter -> embedding table
    pca: dict[str, pa.Table] = field(default_factory=dict)  # augmenter -> PCA table (when pca_dim is set)
    cache_hits: int = 0
    cache_misses: int = 0
    seconds: float = 0.0

    def snapshot_tables(self) -> dict[str, pa.Table]:
        """Tables named as publish_snapshot lays them out: embeddings/<augmenter>, pca/<augmenter>."""
        out = {f"embeddings/{a}": t for a, t in self.embeddings.items()}
        out.update({f"pca/{a}": t for a, t in self.pca.items()})
        return out

    def stats(self) -> dict[str, float]:
        rows = sum(t.num_rows for t in self.embeddings.values())
        return {"rows": rows, "cache_hits": self.cache_hits, "cache_misses": self.cache_misses, "seconds": self.seconds}


def encode_outputs(
    generated: dict[str, pa.Table],
    encoder,
    cache_dir: Path,
    snapshot_id: str = UNPUBLISHED,
    encode: Callable[[list[str]], np.ndarray] | None = None,
    spill_dir: Path | None = None,
) -> EncodingResult:
    """Encode every augmenter's generated texts; with `encoder.cfg.pca_dim`, fit and apply PCA per table.
    `encode` and `spill_dir` are passed to `encode_table` (which texts get encoded, and the cache, stay the same)."""
    started = time.perf_counter()
    cache = EncodingCache(Path(cache_dir), encoder.encoder_id, encoder.dim)
    result = EncodingResult({})
    for augmenter, table in generated.items():
        emb = encode_table(table, encoder, cache, augmenter, snapshot_id, encode, spill_dir)
        pca_dim = encoder.cfg.pca_dim
        if pca_dim:
            projection = fit_pca(vectors_numpy(emb), pca_dim, encoder.cfg.normalize, label=f"augmenter {augmenter}")
            emb = apply_pca(emb, projection)
            result.pca[augmenter] = projection.to_table()
        result.embeddings[augmenter] = emb
    cache.compact()
    result.cache_hits, result.cache_misses = cache.hits, cache.misses
    result.seconds = time.perf_counter() - started
    return result


def load_projection(table: pa.Table) -> PCAProjection:
    return PCAProjection.from_table(table)
