"""Optional PCA on an embedding table (`encoder.pca_dim`), stored with the snapshot so it can be re-applied.

The projection is fitted per embedding table (one augmenter's vectors of one snapshot) with an
exact SVD of the centred vectors, and stored as a small Parquet table: one `mean` row and one row
per component, each a `fixed_size_list<float32>[d_in]`. When the encoder normalises, the reduced
vectors are L2-normalised again so the output gate's norm range holds for both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recaug.schemas.vectors import fixed_size_vectors, vector_dim, vectors_numpy


@dataclass(frozen=True)
class PCAProjection:
    components: np.ndarray  # (k, d_in) float32, rows orthonormal
    mean: np.ndarray  # (d_in,) float32
    explained_variance_ratio: np.ndarray  # (k,)
    renormalize: bool

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        if vectors.ndim != 2 or vectors.shape[1] != self.input_dim:
            raise ValueError(f"PCA expects vectors of width {self.input_dim}, got shape {vectors.shape}")
        reduced = (vectors - self.mean) @ self.components.T
        if self.renormalize:
            norms = np.linalg.norm(reduced, axis=1, keepdims=True)
            reduced = reduced / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(reduced, dtype=np.float32)

    def to_table(self) -> pa.Table:
        rows = np.vstack([self.mean[None, :], self.components]).astype(np.float32)
        names = ["mean"] + [f"pc{i}" for i in range(self.dim)]
        meta = {
            "recaug.table": "pca",
            "recaug.pca_dim": str(self.dim),
            "recaug.pca_input_dim": str(self.input_dim),
            "recaug.pca_renormalize": str(self.renormalize).lower(),
            "recaug.pca_explained_variance_ratio": json.dumps([round(float(x), 8) for x in self.explained_variance_ratio]),
        }
        return pa.table({"row": pa.array(names, pa.string()), "vector": fixed_size_vectors(rows)}).replace_schema_metadata(meta)

    @classmethod
    def from_table(cls, table: pa.Table) -> "PCAProjection":
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("recaug.table") != "pca":
            raise ValueError("not a PCA table (schema metadata recaug.table != 'pca')")
        names = table.column("row").to_pylist()
        if not names or names[0] != "mean":
            raise ValueError("PCA table must start with the 'mean' row")
        rows = vectors_numpy(table)
        return cls(
            components=np.ascontiguousarray(rows[1:]),
            mean=np.ascontiguousarray(rows[0]),
            explained_variance_ratio=np.asarray(json.loads(meta.get("recaug.pca_explained_variance_ratio", "[]"))),
            renormalize=meta.get("recaug.pca_renormalize") == "true",
        )


def fit_pca(vectors: np.ndarray, dim: int, renormalize: bool, label: str = "vectors") -> PCAProjection:
    n, d = vectors.shape
    if dim > min(n, d):
        raise ValueError(
            f"encoder.pca_dim={dim} needs at least {dim} rows and dimensions; {label} has {n} rows of width {d}. "
            "Lower encoder.pca_dim or remove it."
        )
    x = vectors.astype(np.float64)
    mean = x.mean(axis=0)
    # exact SVD: deterministic up to sign, which we fix so refits on the same data give the same table
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:dim]
    signs = np.sign(comps[np.arange(dim), np.argmax(np.abs(comps), axis=1)])
    comps = comps * signs[:, None]
    var = s**2
    ratio = var[:dim] / var.sum() if var.sum() > 0 else np.zeros(dim)
    return PCAProjection(comps.astype(np.float32), mean.astype(np.float32), ratio, renormalize)


def apply_pca(embeddings: pa.Table, projection: PCAProjection) -> pa.Table:
    """The same embedding table with reduced vectors; metadata records the reduction."""
    d_in = vector_dim(embeddings.schema.field("vector").type)
    if d_in != projection.input_dim:
        raise ValueError(f"PCA was fitted on width {projection.input_dim}, the table's vectors have width {d_in}")
    reduced = projection.apply(vectors_numpy(embeddings))
    meta = {k.decode(): v.decode() for k, v in (embeddings.schema.metadata or {}).items()}
    meta.update({"recaug.dim": str(projection.dim), "recaug.pca": f"{d_in}->{projection.dim}"})
    from recaug.schemas.tables import embedding_schema

    schema = embedding_schema(projection.dim, meta)
    return pa.Table.from_arrays([embeddings.column("entity_id"), fixed_size_vectors(reduced), embeddings.column("text_hash")], schema=schema)
