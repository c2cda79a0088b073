"""Text -> vectors with a Hugging Face transformer and our own pooling (docs/architecture.md, "Layers").

Pooling is done here over the token embeddings and the attention mask rather than through
sentence-transformers' module stack, so that one code path serves encoder models (mean / CLS) and
decoder models (last token, left- or right-padded) alike; for the packaged all-MiniLM-L6-v2 the
mean-pooled, L2-normalised result equals `SentenceTransformer.encode` (tests/test_encoders.py).

Texts are tokenised once, ordered by token count (longest first) and cut into batches, so a batch
pads to the length of its own longest text instead of the corpus' longest; results come back in
input order. The model is loaded on first use: a run whose texts are all in the encoding cache
never loads it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import sys
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from recaug.core.batch_model import BatchModel, Resources, RunnerError
from recaug.core.config import EncoderConfig
from recaug.core.progress import progress_wanted
from recaug.core.crashpoints import crash_point
from recaug.core.packaged import MINILM_PACKAGE, minilm_dir

PACKAGED_MINILM = "minilm"
PACKAGED_MINILM_ID = f"sentence-transformers/all-MiniLM-L6-v2@{MINILM_PACKAGE}"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# files that change what a folder's model computes (weights, architecture, tokenisation)
_IDENTITY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# below this many batches a progress bar is noise
PROGRESS_MIN_BATCHES = 4


def resolve_model_dir(model: str) -> Path:
    if model == PACKAGED_MINILM:
        return minilm_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"encoder.model {model!r} is neither 'minilm' (the packaged all-MiniLM-L6-v2) nor a local model folder "
            "with a config.json; download the model once into a folder and point encoder.model at it "
            "(nothing is downloaded at run time)"
        )
    return path.resolve()


def folder_model_id(path: Path) -> str:
    """`<folder name>@<sha256 prefix>` over the weights and the files that define tokenisation.

    Hashing the weights costs a read of the files (about 0.2 s for MiniLM's 90 MB) once per encoder
    object; it is what makes a changed fine-tune a different cache key even under the same folder name.
    """
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in _IDENTITY_FILES))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"no weight file ({', '.join(WEIGHT_SUFFIXES)}) in the encoder folder {path}")
    for p in files:
        digest.update(p.name.encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return f"{path.name}@{digest.hexdigest()[:16]}"


def _check_texts(texts: list) -> None:
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; row {bad[0]} is {type(texts[bad[0]]).__name__} ({len(bad)} such rows)")


def pool(token_embeddings, attention_mask, pooling: str):
    """Pool (batch, seq, hidden) token embeddings into (batch, hidden) using the attention mask.

    mean: average over real tokens (padding excluded); cls: the first token; last: the last real
    token, found from the mask so it is right for both left- and right-padded batches.
    """
    import torch

    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
        summed = (token_embeddings * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return summed / counts
    if pooling == "cls":
        return token_embeddings[:, 0]
    if pooling == "last":
        seq_len = attention_mask.shape[1]
        # index of the last 1 in each row: flip, find the first 1, map back
        last = seq_len - 1 - torch.argmax(attention_mask.flip(dims=[1]).to(torch.int64), dim=1)
        return token_embeddings[torch.arange(token_embeddings.shape[0]), last]
    raise ValueError(f"unknown pooling {pooling!r}; expected mean, cls or last")


class TextEncoder:
    """Encodes texts into float32 vectors as configured by `EncoderConfig`."""

    def __init__(self, cfg: EncoderConfig, progress: bool | None = None):
        self.cfg = cfg
        self.model_dir = resolve_model_dir(cfg.model)
        self.progress = progress
        self.texts_encoded = 0  # texts that went through the model, over this object's life
        self._model = None
        self._tokenizer = None

    # --- identity -------------------------------------------------------------------------------

    @cached_property
    def model_id(self) -> str:
        if self.cfg.model == PACKAGED_MINILM:
            return PACKAGED_MINILM_ID
        return folder_model_id(self.model_dir)

    @property
    def encoder_id(self) -> str:
        """Everything that changes a vector: the model's identity and how its output is pooled."""
        c = self.cfg
        return f"{self.model_id}|pooling={c.pooling}|normalize={str(c.normalize).lower()}|max_length={c.max_length}"

    @cached_property
    def dim(self) -> int:
        config = json.loads((self.model_dir / "config.json").read_text())
        for key in ("hidden_size", "d_model", "n_embd", "dim"):
            if isinstance(config.get(key), int):
                return config[key]
        raise ValueError(f"cannot tell the hidden size of the model in {self.model_dir} from its config.json")

    # --- model ----------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            if tok.pad_token_id is None:
                # decoder-only models often ship without a pad token; any id works, the mask hides it
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            import torch
            from transformers import AutoModel

            model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True, dtype=torch.float32)
            self._model = model.to(self.cfg.device).eval()
        return self._model

    # --- encoding -------------------------------------------------------------------------------

    def _token_ids(self, texts: list[str]) -> tuple[list[list[int]], list[list[int]] | None]:
        tok = self.tokenizer
        enc = tok(texts, truncation=True, max_length=self.cfg.max_length, padding=False, return_attention_mask=False)
        type_ids = enc.get("token_type_ids") if "token_type_ids" in tok.model_input_names else None
        return enc["input_ids"], type_ids

    def _pad(self, ids: list[list[int]], type_ids: list[list[int]] | None):
        """Pad one batch without a per-row loop: scatter the concatenated ids through the mask."""
        import torch

        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        width = int(lengths.max())
        positions = np.arange(width)
        if self.tokenizer.padding_side == "left":
            mask = positions[None, :] >= (width - lengths)[:, None]
        else:
            mask = positions[None, :] < lengths[:, None]
        total = int(lengths.sum())
        input_ids = np.full((len(ids), width), self.tokenizer.pad_token_id, dtype=np.int64)
        input_ids[mask] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if type_ids is not None:
            types = np.zeros((len(ids), width), dtype=np.int64)
            types[mask] = np.fromiter(itertools.chain.from_iterable(type_ids), dtype=np.int64, count=total)
            batch["token_type_ids"] = torch.from_numpy(types)
        return {k: v.to(self.cfg.device) for k, v in batch.items()}

    @staticmethod
    def _plan(ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")  # longest first: the peak memory shows up at once
        return [order[start : start + batch_size] for start in range(0, len(ids), batch_size)]

    def plan_batches(self, texts: Sequence[str], batch_size: int | None = None) -> list[np.ndarray]:
        """The row indices of each batch `encode(texts)` runs, in order (tokeniser only, no model).

        A runner that sends each batch's texts, in this order, to `encode(batch, batch_size=len(batch))`
        on a worker makes the model see the very tensors it would see here."""
        texts = list(texts)
        _check_texts(texts)
        return self._plan(self._token_ids(texts)[0], batch_size or self.cfg.batch_size) if texts else []

    def encode(self, texts: Sequence[str], batch_size: int | None = None, progress: bool | None = None) -> np.ndarray:
        """(len(texts), dim) float32, C-contiguous, rows in the order of `texts`."""
        import torch

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        _check_texts(texts)
        batch_size = batch_size or self.cfg.batch_size
        ids, type_ids = self._token_ids(texts)
        batches = self._plan(ids, batch_size)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        n_batches = len(batches)
        show = progress_wanted(progress if progress is not None else self.progress) and n_batches >= PROGRESS_MIN_BATCHES
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), desc="encode", unit="text", file=sys.stderr, dynamic_ncols=True)
        model = self.model
        try:
            with torch.inference_mode():
                for idx in batches:
                    batch = self._pad([ids[i] for i in idx], [type_ids[i] for i in idx] if type_ids is not None else None)
                    hidden = model(**batch).last_hidden_state
                    pooled = pool(hidden, batch["attention_mask"], self.cfg.pooling)
                    if self.cfg.normalize:
                        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                    out[idx] = pooled.to(torch.float32).cpu().numpy()
                    crash_point("encode.batch")
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        self.texts_encoded += len(texts)
        return out


# --- the runner-facing part: the encoder as a batch-model handler ------------------------------------

EncodeItem = tuple[int, str]  # (row position in the caller's texts, the text)


class TextEncoderHandler(BatchModel):
    """The encode stage behind the batch-model seam (recaug.core.batch_model): a picklable
    handler holding the encoder's config and the driver's encoder id. `load_model()` builds the
    worker's own TextEncoder (refusing a model that is not the driver's: the id is the cache key);
    one batch is one planned batch (`TextEncoder.plan_batches`), encoded whole, so the model sees the
    very tensors of an in-process run. A batch that raises stops the run (there is no error vector)."""

    noun = "encoder"

    def __init__(self, cfg: EncoderConfig, encoder_id: str):
        self.cfg = cfg
        self.encoder_id = encoder_id

    def resources(self) -> Resources:
        # a GPU share only for an encoder on CUDA
        return Resources(gpus=1.0) if self.cfg.device.startswith("cuda") else Resources(cpu_only=True)

    def load_model(self) -> TextEncoder:
        encoder = TextEncoder(self.cfg, progress=False)
        if encoder.encoder_id != self.encoder_id:
            raise RunnerError(
                f"the worker's encoder is {encoder.encoder_id!r} but the driver's is {self.encoder_id!r}; "
                "every worker needs the same encoder model files as the driver"
            )
        encoder.model  # load now: once per worker, not on the first batch
        return encoder

    def run_batch(self, model: TextEncoder, batch: list[EncodeItem]) -> np.ndarray:
        texts = [text for _, text in batch]
        return model.encode(texts, batch_size=max(1, len(texts)), progress=False)

    def check(self, index: int, batch: list[EncodeItem], results: np.ndarray) -> None:
        if results.ndim != 2 or results.shape[0] != len(batch):
            raise RunnerError(f"encoder batch {index} came back with shape {results.shape} for {len(batch)} text(s)")

    def dump_batch(self, batch: list[EncodeItem]) -> str:
        return json.dumps([[position, text] for position, text in batch])  # ASCII: one batch = one line

    def load_batch(self, text: str) -> list[EncodeItem]:
        return [(int(position), str(t)) for position, t in json.loads(text)]

    def dump_results(self, results: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(results, dtype=np.float32), allow_pickle=False)
        return buf.getvalue()

    def load_results(self, data: bytes) -> np.ndarray:
        return np.load(io.BytesIO(data), allow_pickle=False)
