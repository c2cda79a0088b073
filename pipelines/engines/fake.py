"""A deterministic engine with no model, for tests of the layers above the seam and for dry runs.

The reply is derived from a hash of the messages, so the same prompt always gets the same text, and
every call and request is counted so that a test can assert "this run made zero LLM calls". A test
can script the replies with `responder`. The engine holds no locks or handles, so it pickles as is
(Ray and Beam ship it to workers); a responder must then be picklable too (a module-level function,
not a lambda) when the engine crosses a process boundary. Loading costs nothing, so the engine is its
own model object (`load_model()` returns it): in-process, its counters count what the runner ran.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

from recaug.core.config import EngineConfig
from recaug.pipelines.engines.base import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Engine, GenerationRequest, GenerationResult, finish_at_sentences

FAKE_MODEL_ID = "fake/echo"

# What a responder may return for one request: the reply text, an exception (the request fails with
# finish_reason "error"), or a ready GenerationResult (to script token counts or finish reasons).
Reply = str | BaseException | GenerationResult
Responder = Callable[[GenerationRequest], Reply]

_WORDS = (
    "story film classic drama light warm dark quiet bold family music crime love war space city "
    "night road friends history mystery comedy hero journey memory home sea winter summer truth"
).split()


def _messages_digest(messages) -> str:
    return hashlib.sha256(json.dumps(list(messages), sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def default_reply(request: GenerationRequest) -> str:
    """A few words picked by the hash of the messages: same prompt, same words; no JSON, no model."""
    digest = _messages_digest(request.messages)
    words = [_WORDS[int(digest[i:i + 2], 16) % len(_WORDS)] for i in range(0, 24, 2)]
    return f"[fake {digest[:8]}] " + " ".join(words)


def _word_count(text: str) -> int:
    return max(1, len(text.split())) if text else 0


class FakeEngine(Engine):
    kind = "fake"
    supports_json_schema = False

    def __init__(self, cfg: EngineConfig | None = None, responder: Responder | None = None):
        self.cfg = cfg or EngineConfig(kind="fake")
        self.responder = responder
        self.calls = 0  # generate() invocations
        self.requests_seen = 0  # requests over all calls
        self.loaded = False

    @property
    def model_id(self) -> str:
        return FAKE_MODEL_ID

    def sampling_key(self) -> dict[str, Any]:
        return {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "seed": self.cfg.seed,
                "json_constrained": self.supports_json_schema}

    def load(self) -> None:
        self.loaded = True
    def count_tokens(self, texts: list[str]) -> list[int]:
        return [_word_count(t) for t in texts]

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self.calls += 1
        self.requests_seen += len(requests)
        return finish_at_sentences(requests, [self._one(r) for r in requests])

    def _one(self, request: GenerationRequest) -> GenerationResult:
        input_tokens = sum(_word_count(m.get("content", "")) for m in request.messages)
        try:
            reply = self.responder(request) if self.responder else default_reply(request)
        except Exception as exc:  # a scripted failure is a failed request, as a real engine reports it
            reply = exc
        if isinstance(reply, GenerationResult):
            return reply
        if isinstance(reply, BaseException):
            return GenerationResult(request.key, "", input_tokens, 0, FINISH_ERROR, 0.0,
                                    error=f"{type(reply).__name__}: {reply}")
        words = reply.split()
        if len(words) > request.max_new_tokens:  # behave like a model cut off at its token budget
            text = " ".join(words[: request.max_new_tokens])
            return GenerationResult(request.key, text, input_tokens, request.max_new_tokens, FINISH_LENGTH, 0.0)
        return GenerationResult(request.key, reply, input_tokens, _word_count(reply), FINISH_STOP, 0.0)

    def close(self) -> None:
        self.loaded = False
