"""Text -> vectors, written as embedding tables.

Light imports only at package level (numpy/pyarrow); `TextEncoder` pulls in torch and
transformers on first access.
"""

from recaug.encoders.cache import EncodingCache, text_hashes  # noqa: F401
from recaug.encoders.pca import PCAProjection, apply_pca, fit_pca  # noqa: F401
from recaug.encoders.tables import UNPUBLISHED, EncodingResult, embedding_metadata, encode_outputs, encode_table  # noqa: F401
from recaug.schemas.vectors import fixed_size_vectors, vector_dim, vectors_numpy  # noqa: F401


def __getattr__(name):
    if name in ("TextEncoder", "pool", "resolve_model_dir"):
        from recaug.encoders import text_encoder

        return getattr(text_encoder, name)
    raise AttributeError(name)
