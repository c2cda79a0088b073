"""A deterministic stand-in for the sentence encoder, for tests that are not about encoding.

`HashEncoder` has what the pipeline reads from `recaug.encoders.text_encoder.TextEncoder` (cfg,
model_id, encoder_id, dim, encode, plan_batches, texts_encoded): each text becomes a vector drawn
from a generator seeded with the text's blake2b digest, 384 floats (the packaged MiniLM's width),
L2-normalised when `encoder.normalize` is set. No model, no torch: the same text gives the same
vector in every process, and a run's tables, caches and gates behave as with the real model. Like
the real encoder it passes the `encode.batch` crash point once per batch of `encoder.batch_size`
(and can be told to take a while per batch, DELAY_ENV).

Tests about encoding itself (tests/test_encoders.py, the runner parity tests) use the real model
and are marked slow.

In-process: the `fake_encoder` fixture (tests/conftest.py) installs it for one test. In a
subprocess: run the CLI through this file, `python tests/fake_encoder.py run CONFIG ...`
(`CLI` below), which installs it and then calls `recaug.pipelines.cli.main`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

DIM = 384
MODEL_ID = "tests/hash-encoder"
# seconds each batch takes (default 0): a test that kills a run at a random moment of encoding needs
# encoding to last a while, as the real model's does
DELAY_ENV = "RECAUG_TEST_ENCODE_BATCH_SECONDS"
# argv prefix of a `recaug` CLI subprocess that encodes with HashEncoder
CLI = [sys.executable, str(Path(__file__).resolve())]


class HashEncoder:
    """Drop-in for `TextEncoder(cfg, progress=None)`; see the module docstring."""

    model_id = MODEL_ID

    def __init__(self, cfg, progress: bool | None = None):
        self.cfg = cfg
        self.progress = progress
        self.dim = DIM
        self.texts_encoded = 0
        self._model = None  # never loaded; runner code checks this attribute

    @property
    def encoder_id(self) -> str:
        c = self.cfg
        return f"{self.model_id}|dim={self.dim}|normalize={str(c.normalize).lower()}|max_length={c.max_length}"

    @property
    def model(self):
        raise AssertionError("HashEncoder has no model: a test that needs the real encoder must not use the fake_encoder fixture")

    tokenizer = model

    def plan_batches(self, texts: Sequence[str], batch_size: int | None = None) -> list[np.ndarray]:
        size = batch_size or self.cfg.batch_size
        return [np.arange(start, min(start + size, len(texts))) for start in range(0, len(texts), size)]

    def encode(self, texts: Sequence[str], batch_size: int | None = None, progress: bool | None = None) -> np.ndarray:
        from recaug.core.crashpoints import crash_point

        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; row {bad[0]} is {type(texts[bad[0]]).__name__} ({len(bad)} such rows)")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        delay = float(os.environ.get(DELAY_ENV) or 0)
        for idx in self.plan_batches(texts, batch_size):
            if delay:
                time.sleep(delay)
            for i in idx:
                seed = int.from_bytes(hashlib.blake2b(texts[i].encode("utf-8"), digest_size=8).digest(), "little")
                out[i] = np.random.default_rng(seed).standard_normal(self.dim, dtype=np.float32)
            if self.cfg.normalize and len(idx):
                out[idx] /= np.linalg.norm(out[idx], axis=1, keepdims=True)
            crash_point("encode.batch")
        self.texts_encoded += len(texts)
        return out


def install(monkeypatch=None) -> None:
    """Make the pipeline build a HashEncoder wherever it builds a TextEncoder (it looks the class up in
    recaug.encoders.text_encoder when a run starts), and make the real class refuse to load its model,
    so a test whose run still reached the real encoder fails instead of silently getting slow."""
    import recaug.encoders.text_encoder as text_encoder

    real = text_encoder.TextEncoder

    def refuse(self):
        raise AssertionError(
            "the fake encoder is installed but the real TextEncoder was asked for its model: the pipeline no longer "
            "builds its encoder through recaug.encoders.text_encoder.TextEncoder; update tests/fake_encoder.py"
        )

    if monkeypatch is None:
        text_encoder.TextEncoder = HashEncoder
        real.model = property(refuse)
    else:
        monkeypatch.setattr(text_encoder, "TextEncoder", HashEncoder)
        monkeypatch.setattr(real, "model", property(refuse))


if __name__ == "__main__":  # the `recaug` CLI with the fake encoder
    install()
    from recaug.pipelines.cli import main

    sys.exit(main(sys.argv[1:]))
