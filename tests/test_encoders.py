"""Encoders with the real packaged all-MiniLM-L6-v2: pooling parity with sentence-transformers,
input order, the encoding cache, embedding-table format, zero-copy vector views, PCA."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recaug.encoders import EncodingCache, TextEncoder, encode_outputs, encode_table, pool, vectors_numpy
from recaug.encoders.pca import PCAProjection, apply_pca, fit_pca
from recaug.schemas.vectors import fixed_size_vectors
from recaug.core.config import EncoderConfig
from recaug.core.packaged import minilm_dir
from recaug.schemas.tables import EMBEDDING_METADATA_KEYS, GENERATED_TEXTS

TEXTS = [
    "Toy Story (1995): Animation, Children's, Comedy.",
    "",
    "A user who rates science fiction and thrillers highly, prefers the 1990s and dislikes musicals. " * 12,  # > 256 tokens
    "Heat",
    "GoldenEye (1995) is a spy action film; Pierce Brosnan's first outing as James Bond.",
    "Comedy, romance",
    "Twelve Monkeys (1995): Drama, Sci-Fi — time travel, a plague, and Bruce Willis.",
]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(EncoderConfig(batch_size=3), progress=False)


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


def generated(texts: list[str], augmenter: str = "kar_user", kind: str = "user", ids: list[str] | None = None) -> pa.Table:
    n = len(texts)
    ids = ids or [str(i) for i in range(n)]
    now = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    cols = {
        "entity_id": ids, "entity_kind": [kind] * n, "augmenter": [augmenter] * n, "template_hash": ["tmpl1"] * n,
        "parser_version": ["p1"] * n, "model": ["m"] * n, "cache_key": ids, "prompt": ["p"] * n, "raw_text": texts,
        "text": texts, "parsed_json": ["{}"] * n, "input_tokens": [1] * n, "output_tokens": [1] * n,
        "finish_reason": ["stop"] * n, "latency_s": [0.1] * n, "attempts": [1] * n, "created_at": [now] * n,
    }
    return pa.table(cols, schema=GENERATED_TEXTS)


# --- pooling ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mean_pooling_matches_sentence_transformers(encoder, sentence_transformer):
    ours = encoder.encode(TEXTS)
    theirs = sentence_transformer.encode(TEXTS, batch_size=3, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


@pytest.mark.slow
def test_unnormalised_mean_matches_the_transformer_and_pooling_modules_alone(sentence_transformer):
    from sentence_transformers import SentenceTransformer

    raw_st = SentenceTransformer(modules=[sentence_transformer[0], sentence_transformer[1]], device="cpu")
    ours = TextEncoder(EncoderConfig(normalize=False, batch_size=4), progress=False).encode(TEXTS)
    np.testing.assert_allclose(ours, raw_st.encode(TEXTS, batch_size=4, convert_to_numpy=True), atol=2e-5)
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0)


@pytest.mark.slow
def test_rows_come_back_in_input_order_whatever_the_batching(encoder):
    forward = encoder.encode(TEXTS)
    backward = encoder.encode(TEXTS[::-1], batch_size=2)
    one_by_one = np.vstack([encoder.encode([t], batch_size=1) for t in TEXTS[:3]])
    np.testing.assert_allclose(backward[::-1], forward, atol=2e-5)
    np.testing.assert_allclose(one_by_one, forward[:3], atol=2e-5)


def test_pool_cls_and_last_follow_the_mask_for_both_padding_sides():
    import torch

    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pool(tokens, right, "last"), torch.stack([tokens[0, 1], tokens[1, 3]]))
    assert torch.equal(pool(tokens, left, "last"), torch.stack([tokens[0, 3], tokens[1, 3]]))
    assert torch.equal(pool(tokens, right, "cls"), tokens[:, 0])
    assert torch.allclose(pool(tokens, right, "mean")[0], tokens[0, :2].mean(0))


@pytest.mark.slow
def test_padding_places_ids_and_mask_on_the_tokenizer_side(encoder):
    tok = encoder.tokenizer
    pad = tok.pad_token_id
    side = tok.padding_side
    try:
        for padding_side, expected_ids, expected_mask in (
            ("right", [[7, 8, 9], [5, pad, pad]], [[1, 1, 1], [1, 0, 0]]),
            ("left", [[7, 8, 9], [pad, pad, 5]], [[1, 1, 1], [0, 0, 1]]),
        ):
            tok.padding_side = padding_side
            batch = encoder._pad([[7, 8, 9], [5]], [[0, 0, 0], [1]])
            assert batch["input_ids"].tolist() == expected_ids
            assert batch["attention_mask"].tolist() == expected_mask
            assert batch["token_type_ids"].sum().item() == 1
    finally:
        tok.padding_side = side


@pytest.mark.slow
def test_other_poolings_run_on_the_real_model():
    for pooling in ("cls", "last"):
        enc = TextEncoder(EncoderConfig(pooling=pooling, batch_size=4), progress=False)
        v = enc.encode(TEXTS[:4])
        assert v.shape == (4, 384) and np.isfinite(v).all()
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_encoder_id_names_model_pooling_normalisation_and_length(tmp_path):
    base = TextEncoder(EncoderConfig())
    assert base.encoder_id.startswith("sentence-transformers/all-MiniLM-L6-v2@")
    ids = {
        base.encoder_id,
        TextEncoder(EncoderConfig(pooling="cls")).encoder_id,
        TextEncoder(EncoderConfig(normalize=False)).encoder_id,
        TextEncoder(EncoderConfig(max_length=128)).encoder_id,
    }
    assert len(ids) == 4
    # a local folder is identified by a hash of its weights and tokenisation files
    folder = tmp_path / "my-encoder"
    folder.mkdir()
    for p in minilm_dir().iterdir():
        if p.is_file():
            os.symlink(p, folder / p.name)
    a = TextEncoder(EncoderConfig(model=str(folder))).encoder_id
    (folder / "config.json").unlink()
    shutil.copy(minilm_dir() / "config.json", folder / "config.json")
    with open(folder / "config.json", "a") as fh:
        fh.write("\n")
    b = TextEncoder(EncoderConfig(model=str(folder))).encoder_id
    assert a.startswith("my-encoder@") and a != b
    with pytest.raises(FileNotFoundError, match="local model folder"):
        TextEncoder(EncoderConfig(model=str(tmp_path / "nowhere")))


# --- the encoding cache ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reencoding_hits_the_cache_and_never_calls_the_model(encoder, tmp_path):
    texts = TEXTS + [TEXTS[0]]  # a duplicate text is encoded once
    gen = generated(texts)
    first_cache = EncodingCache(tmp_path / "cache", encoder.encoder_id, encoder.dim)
    before = encoder.texts_encoded
    first = encode_table(gen, encoder, first_cache, "kar_user")
    assert (first_cache.hits, first_cache.misses) == (0, len(TEXTS))
    assert encoder.texts_encoded - before == len(TEXTS)

    second_cache = EncodingCache(tmp_path / "cache", encoder.encoder_id, encoder.dim)
    encoded_so_far = encoder.texts_encoded
    second = encode_table(gen, encoder, second_cache, "kar_user")
    assert (second_cache.hits, second_cache.misses) == (len(TEXTS), 0)
    assert encoder.texts_encoded == encoded_so_far
    np.testing.assert_array_equal(vectors_numpy(second), vectors_numpy(first))

    # one changed text: exactly one miss
    changed = generated(texts[:-1] + ["a brand new text"])
    third_cache = EncodingCache(tmp_path / "cache", encoder.encoder_id, encoder.dim)
    encode_table(changed, encoder, third_cache, "kar_user")
    assert third_cache.misses == 1


@pytest.mark.slow
def test_cache_is_keyed_by_encoder_id(encoder, tmp_path):
    gen = generated(TEXTS[:3])
    encode_table(gen, encoder, tmp_path, "kar_user")
    cls = TextEncoder(EncoderConfig(pooling="cls"), progress=False)
    cache = EncodingCache(tmp_path, cls.encoder_id, cls.dim)
    encode_table(gen, cls, cache, "kar_user")
    assert cache.misses == 3 and cache.hits == 0


@pytest.mark.slow
def test_leftover_temp_files_are_ignored_and_a_corrupt_shard_is_reported(encoder, tmp_path):
    cache = EncodingCache(tmp_path, encoder.encoder_id, encoder.dim)
    encode_table(generated(TEXTS[:2]), encoder, cache, "kar_user")
    # what a kill during a shard write leaves behind: a dot-named partial file
    (cache.dir / ".20261101-1-abc.parquet.123.tmp").write_bytes(b"PAR1 partial")
    again = EncodingCache(tmp_path, encoder.encoder_id, encoder.dim)
    encode_table(generated(TEXTS[:2]), encoder, again, "kar_user")
    assert (again.hits, again.misses) == (2, 0)

    (cache.dir / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(RuntimeError, match="delete that folder"):
        EncodingCache(tmp_path, encoder.encoder_id, encoder.dim).lookup(["x"])


CACHE_WRITER = r"""
import hashlib, sys
import numpy as np
from pathlib import Path
from recaug.encoders.cache import EncodingCache

def encode(texts):  # the cache layer alone: a vector that is a pure function of its text
    return np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).standard_normal(64, dtype=np.float32)
                     for t in texts])

cache = EncodingCache(Path(sys.argv[1]), "kill-test-encoder", 64)
print("ready", flush=True)
for batch in range(100_000):
    cache.get_or_encode([f"{sys.argv[2]} text {batch} {i}" for i in range(3000)], encode)
"""


def test_a_killed_writer_never_leaves_a_corrupt_shard(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "writer.py"
    script.write_text(CACHE_WRITER)
    root = tmp_path / "cache"
    for run, delay in enumerate((0.4, 0.9, 1.5)):
        proc = subprocess.Popen([sys.executable, str(script), str(root), f"run{run}"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    cache = EncodingCache(root, "kill-test-encoder", 64)
    shards = cache.shards()
    assert shards, "the writer never committed a shard; raise the delays"
    stored = pa.concat_tables([pq.read_table(p) for p in shards])  # every visible shard is whole
    hashes = stored.column("text_hash").to_pylist()
    found = cache.lookup(hashes)
    assert found.num_rows == len(set(hashes))
    # every stored vector is the one computed for its text (the writer seeds it from the text's hash)
    stored_vectors = vectors_numpy(stored)
    for row in np.linspace(0, len(hashes) - 1, 50).astype(int):
        expected = np.random.default_rng(int(hashes[row][:8], 16)).standard_normal(64, dtype=np.float32)
        np.testing.assert_array_equal(stored_vectors[row], expected)


@pytest.mark.slow
def test_compaction_keeps_every_vector(encoder, tmp_path):
    cache = EncodingCache(tmp_path, encoder.encoder_id, encoder.dim)
    for t in TEXTS[:4]:
        encode_table(generated([t]), encoder, cache, "kar_user")
    before = vectors_numpy(encode_table(generated(TEXTS[:4]), encoder, cache, "kar_user"))
    assert cache.compact(min_shards=2) and len(cache.shards()) == 1
    after_cache = EncodingCache(tmp_path, encoder.encoder_id, encoder.dim)
    after = vectors_numpy(encode_table(generated(TEXTS[:4]), encoder, after_cache, "kar_user"))
    assert after_cache.misses == 0
    np.testing.assert_array_equal(after, before)


# --- embedding tables --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedding_table_format_and_metadata(encoder, tmp_path):
    table = encode_table(generated(TEXTS), encoder, tmp_path, "kar_user", snapshot_id="pending")
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 384)
    assert table.column_names == ["entity_id", "vector", "text_hash"]
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    for key in EMBEDDING_METADATA_KEYS:
        assert meta[key], key
    assert meta["recaug.encoder"] == encoder.encoder_id and meta["recaug.pooling"] == "mean"
    assert meta["recaug.dim"] == "384" and meta["recaug.augmenter"] == "kar_user" and meta["recaug.snapshot"] == "pending"
    assert meta["recaug.template_hash"] == "tmpl1" and meta["recaug.entity_kind"] == "user"
    assert table.column("text_hash").to_pylist() == [hashlib.sha256(t.encode()).hexdigest() for t in TEXTS]
    np.testing.assert_allclose(vectors_numpy(table), encoder.encode(TEXTS), atol=2e-5)


@pytest.mark.slow
def test_encode_table_refuses_mixed_or_mismatched_input(encoder, tmp_path):
    mixed = pa.concat_tables([generated(["a"]), generated(["b"], kind="item")])
    with pytest.raises(ValueError, match="one entity kind"):
        encode_table(mixed, encoder, tmp_path, "kar_user")
    with pytest.raises(ValueError, match="not 'other'"):
        encode_table(generated(["a"]), encoder, tmp_path, "other")


# --- zero-copy access --------------------------------------------------------------------------------------


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_vectors_numpy_is_a_view_of_a_parquet_read_table(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((500, 32)).astype(np.float32)
    pq.write_table(pa.table({"entity_id": [str(i) for i in range(500)], "vector": fixed_size_vectors(vectors)}), tmp_path / "e.parquet")
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column("vector").num_chunks == 1
    view = vectors_numpy(table)
    child = table.column("vector").chunk(0).values
    assert _address(view) == child.buffers()[1].address  # no copy: numpy looks at Arrow's buffer
    assert np.shares_memory(view, child.to_numpy(zero_copy_only=True))
    np.testing.assert_array_equal(view, vectors)
    # a slice is still a view (the chunk offset is honoured)
    sliced = vectors_numpy(table.slice(100, 50))
    assert np.shares_memory(sliced, view) and np.array_equal(sliced, vectors[100:150])

    # polars reads the column as Array(Float32, d) and hands numpy its own buffer
    frame = pl.read_parquet(tmp_path / "e.parquet")
    assert frame.schema["vector"] == pl.Array(pl.Float32, 32)
    pview = vectors_numpy(frame)
    assert np.shares_memory(pview, frame.get_column("vector").to_numpy())
    np.testing.assert_array_equal(pview, vectors)


def test_vectors_numpy_copies_for_several_chunks_and_fills_nulls_with_nan():
    a = fixed_size_vectors(np.ones((3, 4), np.float32))
    b = fixed_size_vectors(np.zeros((2, 4), np.float32))
    chunked = pa.chunked_array([a, b])
    out = vectors_numpy(chunked)
    assert out.shape == (5, 4) and out.flags.owndata
    with_nulls = pa.array([[1.0, 2.0], None, [3.0, 4.0]], type=pa.list_(pa.float32(), 2))
    filled = vectors_numpy(with_nulls)
    assert np.isnan(filled[1]).all() and filled[2].tolist() == [3.0, 4.0]


# --- PCA ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pca_is_stored_as_a_table_and_reapplies_identically(encoder, tmp_path):
    cfg = EncoderConfig(pca_dim=4, batch_size=8)
    pca_encoder = TextEncoder(cfg, progress=False)
    result = encode_outputs({"kar_user": generated(TEXTS)}, pca_encoder, tmp_path / "cache")
    emb = result.embeddings["kar_user"]
    assert emb.schema.field("vector").type == pa.list_(pa.float32(), 4)
    assert emb.schema.metadata[b"recaug.pca"] == b"384->4" and emb.schema.metadata[b"recaug.dim"] == b"4"
    np.testing.assert_allclose(np.linalg.norm(vectors_numpy(emb), axis=1), 1.0, atol=1e-5)
    assert set(result.snapshot_tables()) == {"embeddings/kar_user", "pca/kar_user"}

    pq.write_table(result.pca["kar_user"], tmp_path / "pca.parquet")
    projection = PCAProjection.from_table(pq.read_table(tmp_path / "pca.parquet"))
    full = encoder.encode(TEXTS)
    np.testing.assert_allclose(projection.apply(full), vectors_numpy(emb), atol=1e-4)
    with pytest.raises(ValueError, match="pca_dim"):
        fit_pca(full[:3], 4, True)


def test_pca_fit_recovers_the_variance_directions():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 2)) @ np.array([[3.0, 0, 0, 0], [0, 1.0, 0, 0]]) + 5.0
    projection = fit_pca(x.astype(np.float32), 2, renormalize=False)
    np.testing.assert_allclose(np.abs(projection.components[:, :2]), np.eye(2), atol=0.05)
    assert projection.explained_variance_ratio[0] > 0.8
    table = pa.Table.from_arrays(
        [pa.array([str(i) for i in range(200)]), fixed_size_vectors(x), pa.array(["h"] * 200)],
        schema=pa.schema([("entity_id", pa.string()), ("vector", pa.list_(pa.float32(), 4)), ("text_hash", pa.string())]),
    )
    reduced = apply_pca(table, projection)
    np.testing.assert_allclose(vectors_numpy(reduced).mean(axis=0), 0.0, atol=1e-4)


@pytest.mark.slow
def test_a_table_encoded_in_slices_equals_one_encoded_whole(encoder, tmp_path, monkeypatch):
    import recaug.encoders.tables as tables

    texts = TEXTS + [TEXTS[0], TEXTS[1]]  # duplicates across slices are encoded once
    whole = encode_table(generated(texts), encoder, tmp_path / "whole", "kar_user")
    monkeypatch.setattr(tables, "ENCODE_CHUNK", 2)
    cache = EncodingCache(tmp_path / "sliced", encoder.encoder_id, encoder.dim)
    sliced = encode_table(generated(texts), encoder, cache, "kar_user")
    assert sliced.schema.equals(whole.schema, check_metadata=True)
    assert sliced.column("entity_id").equals(whole.column("entity_id"))
    assert sliced.column("text_hash").equals(whole.column("text_hash"))
    np.testing.assert_allclose(vectors_numpy(sliced), vectors_numpy(whole), atol=1e-5)
    assert cache.misses == len(TEXTS)  # a text seen in an earlier slice is a hit in a later one


@pytest.mark.slow
def test_a_spilled_embedding_table_equals_the_one_held_in_memory(encoder, tmp_path, monkeypatch):
    import recaug.encoders.tables as tables

    monkeypatch.setattr(tables, "ENCODE_CHUNK", 2)  # several slices, each appended to the spill file
    held = encode_table(generated(TEXTS), encoder, tmp_path / "cache", "kar_user")
    spill = tmp_path / "spill"
    spilled = encode_table(generated(TEXTS), encoder, tmp_path / "cache", "kar_user", spill_dir=spill)
    assert spilled.schema.equals(held.schema, check_metadata=True)
    assert spilled.equals(held)
    assert list(spill.iterdir()) == []  # the spill file is anonymous: nothing is left to clean up
