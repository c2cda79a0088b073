"""The one seam every LLM engine hides behind (in the spirit of Beam's ModelHandler).

Runners (local, Ray, Beam) only ever call `load()` once per worker and `generate(batch)` per batch;
they never know which engine runs. An engine is picklable before `load()` so that Ray and Beam can
ship it to workers, and `model_id` / `sampling_key()` feed the cache key (DESIGN.md §5).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from recaug.errors import UsageError

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


class EngineError(UsageError, RuntimeError):
    """An engine that cannot work at all (model missing, server unreachable after retries)."""


class Engine(abc.ABC):
    """load() once, then generate() batches. Subclasses set `kind` and `supports_json_schema`."""

    kind: str = "abstract"
    supports_json_schema: bool = False

    @property
    @abc.abstractmethod
    def model_id(self) -> str:
        """Model name plus revision; part of every cache key."""

    @abc.abstractmethod
    def sampling_key(self) -> dict[str, Any]:
        """Every parameter that changes what the model writes (temperature, top_p, seed, ...)."""

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights / open connections. Idempotent."""

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
