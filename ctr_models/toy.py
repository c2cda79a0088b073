"""A small synthetic CTR world with known structure, for tests, docs and benchmarks.

Each user and item has a hidden taste vector; whether a user clicks an item depends on their
affinity (dot product), the item's popularity, the user's bias and a gender x genre effect. The
LLM-style vectors partly reveal the hidden tastes (a random projection of them plus noise), so a
model that uses them should do better than one that does not, and any working model beats a
constant predictor. The tables follow recaug's contracts (USERS, ITEMS, SPLIT_INTERACTIONS,
CTR_SAMPLES, embedding tables, SYNTHETIC_INTERACTIONS) and the splits come from the real
KAR-protocol splitter, so the CTR code sees exactly what the pipeline would give it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recaug.schemas.vectors import fixed_size_vectors
from recaug.core.config import SplitConfig
from recaug.ctr_models.splits import ctr_samples, split_interactions
from recaug.schemas import INTERACTIONS, ITEMS, SYNTHETIC_INTERACTIONS, USERS, conform, embedding_schema

GENRES = ("Action", "Comedy", "Drama", "Romance", "Sci-Fi", "Thriller")
OCCUPATIONS = ("student", "engineer", "artist", "doctor", "other")


@dataclass
class ToyWorld:
    users: pa.Table
    items: pa.Table
    split: pa.Table  # SPLIT_INTERACTIONS (the prompt rows are the history)
    samples: pa.Table  # CTR_SAMPLES
    vectors: dict[str, pa.Table]  # "user:toy_preference", "item:toy_knowledge"
    synthetic: pa.Table  # SYNTHETIC_INTERACTIONS
    user_taste: np.ndarray
    item_taste: np.ndarray


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_toy_world(
    n_users: int = 300,
    n_items: int = 200,
    per_user: int = 60,
    vector_dim: int = 32,
    latent_dim: int = 8,
    reveal: float = 0.8,
    missing_share: float = 0.05,
    n_synthetic: int = 2000,
    seed: int = 0,
) -> ToyWorld:
    rng = np.random.default_rng(seed)
    user_ids = np.array([f"u{i}" for i in range(n_users)])
    item_ids = np.array([f"i{i}" for i in range(n_items)])

    gender = rng.choice(["F", "M"], size=n_users)
    users = conform(
        pa.table(
            {
                "user_id": user_ids,
                "age": rng.integers(15, 65, size=n_users).astype(np.int32),
                "gender": gender,
                "occupation": rng.choice(OCCUPATIONS, size=n_users),
            }
        ),
        USERS,
    )
    n_genres = rng.integers(1, 4, size=n_items)
    genre_lists = [list(rng.choice(GENRES, size=k, replace=False)) for k in n_genres]
    items = conform(
        pa.table(
            {
                "item_id": item_ids,
                "title": [f"Toy movie {i}" for i in range(n_items)],
                "year": rng.integers(1950, 2000, size=n_items).astype(np.int32),
                "genres": pa.array(genre_lists, type=pa.list_(pa.string())),
            }
        ),
        ITEMS,
    )

    user_taste = rng.normal(size=(n_users, latent_dim))
    item_taste = rng.normal(size=(n_items, latent_dim))
    popularity = rng.normal(scale=1.0, size=n_items)
    user_bias = rng.normal(scale=0.5, size=n_users)
    romance = np.array(["Romance" in g for g in genre_lists])
    action = np.array(["Action" in g for g in genre_lists])

    def click_logit(u: np.ndarray, i: np.ndarray) -> np.ndarray:
        taste = (user_taste[u] * item_taste[i]).sum(axis=1) * (1.5 / np.sqrt(latent_dim))
        side = np.where(gender[u] == "F", 0.8 * romance[i], 0.8 * action[i])
        return taste + popularity[i] + user_bias[u] + side - 0.3

    # each user sees `per_user` distinct items at random times over ~4 months
    u = np.repeat(np.arange(n_users), per_user)
    i = np.concatenate([rng.choice(n_items, size=per_user, replace=False) for _ in range(n_users)])
    ts = rng.integers(1_000_000_000, 1_010_000_000, size=u.size)
    clicked = rng.random(u.size) < _sigmoid(click_logit(u, i))
    interactions = conform(
        pa.table(
            {
                "user_id": user_ids[u],
                "item_id": item_ids[i],
                "rating": np.where(clicked, 5.0, 2.0).astype(np.float32),
                "timestamp": ts.astype(np.int64),
            }
        ),
        INTERACTIONS,
    )
    split_cfg = SplitConfig(prompt_share=0.5, prompt_cap=20, valid_share=0.1, test_share=0.1, click_threshold=3.0)
    split, _ = split_interactions(interactions, split_cfg)
    samples = ctr_samples(split, split_cfg)

    def vector_table(taste: np.ndarray, ids: np.ndarray, name: str) -> pa.Table:
        projection = rng.normal(size=(taste.shape[1], vector_dim)) / np.sqrt(taste.shape[1])
        signal = taste @ projection
        noise = rng.normal(size=signal.shape)
        vec = reveal * signal + (1.0 - reveal) * noise
        vec = vec / np.linalg.norm(vec, axis=1, keepdims=True)
        keep = rng.random(len(ids)) >= missing_share  # some entities have no vector
        meta = {"recaug.encoder": "toy", "recaug.pooling": "none", "recaug.augmenter": name, "recaug.snapshot": "toy"}
        return pa.Table.from_arrays(
            [
                pa.array(ids[keep], type=pa.string()),
                fixed_size_vectors(vec[keep].astype(np.float32)),
                pa.array([f"h{k}" for k in np.flatnonzero(keep)], type=pa.string()),
            ],
            schema=embedding_schema(vector_dim, meta),
        )

    vectors = {
        "user:toy_preference": vector_table(user_taste, user_ids, "toy_preference"),
        "item:toy_knowledge": vector_table(item_taste, item_ids, "toy_knowledge"),
    }

    su = rng.integers(0, n_users, size=n_synthetic)
    si = rng.integers(0, n_items, size=n_synthetic)
    synthetic = conform(
        pa.table(
            {
                "user_id": user_ids[su],
                "item_id": item_ids[si],
                "label": (click_logit(su, si) > 0).astype(np.int8),
                "source": ["toy_llm"] * n_synthetic,
                "cache_key": [f"k{k}" for k in range(n_synthetic)],
            }
        ),
        SYNTHETIC_INTERACTIONS,
    )
    return ToyWorld(users, items, split, samples, vectors, synthetic, user_taste, item_taste)
