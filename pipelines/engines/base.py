"""The one seam every LLM engine hides behind: an engine is a batch-model handler
(recaug.core.batch_model, in the spirit of Beam's ModelHandler).

Runners (local, Ray, Beam) ship the unloaded engine to their workers, call `load_model()` once per
worker (it returns the loaded model object and leaves the engine as it was) and `run_batch(model,
shard)`; they never know which engine runs. What a worker needs comes from `resources()`, and
`model_id` / `sampling_key()` feed the cache key (docs/architecture.md, "Contracts").
"""

from __future__ import annotations

import abc
import copy
import json
from dataclasses import dataclass, field
from typing import Any

from recaug.core.batch_model import BatchModel, ModelCannotWork, Resources, RunnerError
from recaug.core.errors import UsageError
from recaug.core.sentences import cut_after_sentences

__all__ = [
    "FINISH_ERROR", "FINISH_LENGTH", "FINISH_STOP", "BatchModel", "Engine", "EngineError", "GenerationRequest",
    "GenerationResult", "Resources", "RunnerError", "defuse_special_tokens", "error_results", "finish_at_sentences",
    "special_token_texts",
]

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ERROR = "error"


@dataclass(frozen=True)
class GenerationRequest:
    key: str  # the request's cache key; results come back under the same key
    messages: tuple[dict[str, str], ...]  # chat messages: ({"role": ..., "content": ...}, ...)
    max_new_tokens: int
    # JSON schema for constrained decoding; engines that cannot constrain ignore it and the
    # parser validates instead.
    json_schema: dict[str, Any] | None = None
    # free text: the answer ends after this many complete sentences (core/sentences.py); an engine that
    # can stop generating there does, every engine returns the text cut there (`finish_at_sentences`)
    max_sentences: int | None = None

    def to_record(self) -> dict[str, Any]:
        """JSON-ready form (how a request crosses a process boundary)."""
        return {"key": self.key, "messages": list(self.messages), "max_new_tokens": self.max_new_tokens,
                "json_schema": self.json_schema, "max_sentences": self.max_sentences}

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> "GenerationRequest":
        return cls(d["key"], tuple(d["messages"]), int(d["max_new_tokens"]), d["json_schema"], d.get("max_sentences"))


@dataclass
class GenerationResult:
    key: str
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH | FINISH_ERROR
    latency_s: float
    error: str | None = None  # set when finish_reason == FINISH_ERROR
    extra: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """JSON-ready form; `extra` values JSON cannot hold become their str()."""
        return {"key": self.key, "text": self.text, "input_tokens": int(self.input_tokens),
                "output_tokens": int(self.output_tokens), "finish_reason": self.finish_reason,
                "latency_s": float(self.latency_s), "error": self.error,
                "extra": json.loads(json.dumps(self.extra, default=str))}

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> "GenerationResult":
        return cls(d["key"], d["text"], int(d["input_tokens"]), int(d["output_tokens"]), d["finish_reason"],
                   float(d["latency_s"]), error=d["error"], extra=d["extra"])


def finish_at_sentences(requests: list[GenerationRequest], results: list[GenerationResult]) -> list[GenerationResult]:
    """Each answer of a request with `max_sentences` cut after that many complete sentences; an answer
    cut there finished where it should (`stop`, even if the engine ran on to its token cap), and
    `extra["sentence_limit"]` says so. Engines that cannot stop generating at a sentence (vLLM, HTTP)
    call it on their results; output_tokens keeps what was generated."""
    for req, res in zip(requests, results):
        if req.max_sentences and res.finish_reason != FINISH_ERROR:
            # the answer's end is a boundary too: a cap reached right after a full stop cut nothing
            cut = cut_after_sentences(res.text + " ", req.max_sentences)
            if cut is not None:
                res.text = cut
                res.finish_reason = FINISH_STOP
                res.extra["sentence_limit"] = req.max_sentences
    return results


def error_results(requests: list[GenerationRequest], reason: str) -> list[GenerationResult]:
    """Requests that failed as a whole, as per-request error results (never cached: the next run retries)."""
    return [GenerationResult(r.key, "", 0, 0, FINISH_ERROR, 0.0, error=reason) for r in requests]


def special_token_texts(tokenizer) -> tuple[str, ...]:
    """The strings a Hugging Face tokenizer turns into special tokens wherever they appear in text
    (chat markers such as `<|im_start|>`, `<|im_end|>`, EOS), longest first."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False) and getattr(added, "content", ""):
            texts.add(added.content)
    return tuple(sorted((t for t in texts if len(t) > 1), key=lambda t: (-len(t), t)))


ZERO_WIDTH_SPACE = "\u200b"


def defuse_special_tokens(messages, specials: tuple[str, ...]) -> list[dict[str, str]]:
    """Messages whose contents cannot be read as special tokens: a zero-width space after the first
    character of each occurrence keeps the text visible to the model but no longer an exact match,
    so item text like "<|im_end|><|im_start|>system" stays text instead of opening a chat turn.
    Contents without such strings are returned unchanged (their prompts and token counts too)."""
    out = []
    for m in messages:
        content = m.get("content", "")
        for special in specials:
            if special in content:
                content = content.replace(special, special[0] + ZERO_WIDTH_SPACE + special[1:])
        out.append({**m, "content": content})
    return out


class EngineError(ModelCannotWork, UsageError):
    """An engine that cannot work at all (model missing, server unreachable after retries): every
    runner stops the run with this message (exit 2: the engine's configuration is what to fix)."""


class Engine(BatchModel):
    """A batch-model handler for LLM generation. Subclasses set `kind` and `supports_json_schema` and
    implement identity (`model_id`, `sampling_key`), `load()` and `generate()`.

    `load_model()` (the seam) returns the model object a runner generates with. An engine that loads
    weights or opens connections (transformers, vLLM, HTTP) returns a loaded copy of itself
    (`loaded_copy`): the engine a runner holds and pickles is never loaded, so it needs no
    `__getstate__`. The default, for an engine whose load is cheap and keeps it picklable (the fake
    engine, test engines), loads in place and returns the engine itself. `generate()` on an unloaded
    engine loads it in place: that is for in-process use (a preview, a test), not for an engine that
    is shipped afterwards."""

    kind: str = "abstract"
    supports_json_schema: bool = False
    noun = "engine"

    @property
    @abc.abstractmethod
    def model_id(self) -> str:
        """Model name plus revision; part of every cache key."""

    def sampling_key(self) -> dict[str, Any]:
        """Every parameter that changes what the model writes (temperature, top_p, seed, ...).
        Default, from `self.cfg`: greedy ignores top_p and the seed, so leaving them out keeps
        greedy cache keys stable; whether answers are schema-constrained changes them too."""
        greedy = self.cfg.temperature == 0
        return {
            "temperature": self.cfg.temperature,
            "top_p": None if greedy else self.cfg.top_p,
            "seed": None if greedy else self.cfg.seed,
            "json_constrained": self.supports_json_schema,
        }

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights / open connections into this object. Idempotent."""

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate one result per request, in order. A per-request failure is a result with
        finish_reason 'error', never an exception; raise EngineError only when nothing can work."""

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token counts for prompt budgeting. Default: a conservative 4-characters-per-token
        estimate; engines with a local tokenizer override it."""
        return [max(1, (len(t) + 3) // 4) for t in texts]

    def close(self) -> None:
        """Free resources; the engine may be loaded again afterwards."""

    # --- the batch-model seam ----------------------------------------------------------------------

    def resources(self) -> Resources:
        """What one worker needs; an engine that runs on a GPU says so here (one GPU per worker unless
        the runner sets its own share)."""
        return Resources()

    def load_model(self) -> "Engine":
        self.load()
        return self

    def loaded_copy(self) -> "Engine":
        """A loaded shallow copy (the config and cached identity shared); this engine stays unloaded.
        (An engine already loaded in place shares its model with the copy.)"""
        model = copy.copy(self)
        model.load()
        return model

    def run_batch(self, model: "Engine", batch: list[GenerationRequest]) -> list[GenerationResult]:
        return model.generate(batch)

    def close_model(self, model: "Engine") -> None:
        if model is not self:
            model.close()

    def check(self, index: int, batch: list[GenerationRequest], results: list[GenerationResult]) -> None:
        """The engine contract: one result per request, same keys, same order."""
        if [r.key for r in results] != [r.key for r in batch]:
            raise RunnerError(
                f"shard {index}: the engine returned {len(results)} result(s) for {len(batch)} request(s) "
                "or changed their keys/order; Engine.generate must return one result per request, in order"
            )

    def failed_results(self, batch: list[GenerationRequest], reason: str) -> list[GenerationResult]:
        return error_results(batch, reason)

    def fatal_error(self, reason: str) -> BaseException:
        return EngineError(reason)

    def dump_batch(self, batch: list[GenerationRequest]) -> str:
        return json.dumps([r.to_record() for r in batch], ensure_ascii=False)

    def load_batch(self, text: str) -> list[GenerationRequest]:
        return [GenerationRequest.from_record(d) for d in json.loads(text)]

    def dump_results(self, results: list[GenerationResult]) -> bytes:
        return json.dumps([r.to_record() for r in results], ensure_ascii=False).encode("utf-8")

    def load_results(self, data: bytes) -> list[GenerationResult]:
        return [GenerationResult.from_record(d) for d in json.loads(data.decode("utf-8"))]
