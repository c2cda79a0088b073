"""Failure injection around any engine: does the pipeline survive a bad LLM, and does the gate stop it?

`ChaosEngine(inner, shares, seed)` passes requests to `inner` and spoils a configurable share of
the answers, by kind:

| kind        | what the request gets back                                                        |
|-------------|-----------------------------------------------------------------------------------|
| `malformed` | text that is no valid answer (prose, broken JSON, or JSON of the wrong shape)      |
| `truncated` | the inner answer cut to half its characters, `finish_reason = "length"`            |
| `empty`     | an empty answer (`finish_reason = "stop"`)                                         |
| `error`     | a failed request (`finish_reason = "error"`), as an unreachable server gives       |
| `exception` | share of `generate()` *calls* that raise instead of returning (a crashing engine)  |

Which request fails, and how, is a pure function of `seed` and the request key. A retry has its own
key (the key covers the conversation so far and the attempt number), so a retry draws again: the
same run is reproducible, and a failed first attempt may succeed on the second. Spoiled requests
are not sent to the inner engine when their answer does not need it (`empty`, `error`).

The chaos settings enter `sampling_key()` and `model_id` gets a `+chaos` suffix, so injected answers
never share cache entries with the inner engine's real ones. In a pipeline config:

```yaml
engine:
  kind: transformers          # the engine to wrap
  chaos: {malformed: 0.2, truncated: 0.1, empty: 0.05, error: 0.05, exception: 0.02, seed: 7}
```
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from typing import Any

from recaug.pipelines.engines.base import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Engine, GenerationRequest, GenerationResult

REQUEST_KINDS = ("malformed", "truncated", "empty", "error")
FAILURE_KINDS = REQUEST_KINDS + ("exception",)

# No valid answer for any augmenter: prose without a JSON object, JSON cut inside a string (not
# repairable), and a JSON object without the fields a response schema requires. For a free-text
# augmenter these are still text, so they parse: "malformed" only matters for JSON augmenters.
MALFORMED_ANSWERS = (
    "I am sorry, but I cannot help with that request.",
    '{"director": "Jane Doe", "country": "Fra',
    '{"unexpected": true}',
)


class InjectedEngineFailure(RuntimeError):
    """What a ChaosEngine raises for the `exception` kind."""


def _draw(seed: int, salt: str, key: str) -> float:
    digest = hashlib.sha256(f"{seed}|{salt}|{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class ChaosEngine(Engine):
    def __init__(self, inner: Engine, shares: dict[str, float] | None = None, seed: int = 0):
        shares = dict(shares or {})
        unknown = sorted(set(shares) - set(FAILURE_KINDS))
        if unknown:
            raise ValueError(f"unknown failure kind(s) {unknown}; known: {', '.join(FAILURE_KINDS)}")
        if any(not 0.0 <= v <= 1.0 for v in shares.values()):
            raise ValueError(f"failure shares must be within [0, 1], got {shares}")
        if sum(shares.get(k, 0.0) for k in REQUEST_KINDS) > 1.0 + 1e-9:
            raise ValueError(f"the per-request failure shares ({', '.join(REQUEST_KINDS)}) add up to more than 1: {shares}")
        self.inner = inner
        self.shares = {k: float(shares.get(k, 0.0)) for k in FAILURE_KINDS}
        self.seed = int(seed)
        self.kind = f"{inner.kind}+chaos"
        self.supports_json_schema = inner.supports_json_schema
        # kind -> requests (calls, for `exception`) spoiled; shared with the loaded copy load_model() returns
        self.injected: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()  # generate() calls (including those that raised), requests

    @property
    def calls(self) -> int:
        return self._counts["calls"]

    @property
    def requests_seen(self) -> int:
        return self._counts["requests"]

    def __repr__(self) -> str:
        active = {k: v for k, v in self.shares.items() if v}
        return f"ChaosEngine({self.inner!r}, shares={active}, seed={self.seed})"

    @property
    def model_id(self) -> str:
        return f"{self.inner.model_id}+chaos"

    def sampling_key(self) -> dict[str, Any]:
        return {**self.inner.sampling_key(), "chaos": {"shares": self.shares, "seed": self.seed}}

    def load(self) -> None:
        self.inner.load()

    def resources(self):
        return self.inner.resources()

    def load_model(self) -> "ChaosEngine":
        """A copy around the inner engine's model object; it counts into the same counters."""
        model = copy.copy(self)
        model.inner = self.inner.load_model()
        return model

    def close_model(self, model) -> None:
        self.inner.close_model(model.inner)

    def close(self) -> None:
        self.inner.close()

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def failure_of(self, key: str) -> str | None:
        """The failure kind this request key draws (None: the inner answer passes through)."""
        x = _draw(self.seed, "request", key)
        edge = 0.0
        for kind in REQUEST_KINDS:
            edge += self.shares[kind]
            if x < edge:
                return kind
        return None

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self._counts["calls"] += 1
        self._counts["requests"] += len(requests)
        if not requests:
            return []
        batch_key = "|".join(r.key for r in requests)
        if self.shares["exception"] and _draw(self.seed, "exception", batch_key) < self.shares["exception"]:
            self.injected["exception"] += 1
            raise InjectedEngineFailure(f"injected failure: the engine raised on a batch of {len(requests)} request(s)")
        kinds = [self.failure_of(r.key) for r in requests]
        need_inner = [i for i, k in enumerate(kinds) if k not in ("empty", "error")]
        inner_results = self.inner.generate([requests[i] for i in need_inner]) if need_inner else []
        by_index = dict(zip(need_inner, inner_results))
        out = []
        for i, (request, kind) in enumerate(zip(requests, kinds)):
            if kind is not None:
                self.injected[kind] += 1
            out.append(self._spoil(request, kind, by_index.get(i)))
        return out

    def _spoil(self, request: GenerationRequest, kind: str | None, inner: GenerationResult | None) -> GenerationResult:
        if kind is None:
            return inner
        if kind == "error":
            return GenerationResult(request.key, "", 0, 0, FINISH_ERROR, 0.0, error="injected failure: the request failed")
        if kind == "empty":
            return GenerationResult(request.key, "", 0, 0, FINISH_STOP, 0.0, extra={"chaos": kind})
        if inner.finish_reason == FINISH_ERROR:
            return inner  # nothing to spoil
        if kind == "malformed":
            pick = int(_draw(self.seed, "malformed", request.key) * len(MALFORMED_ANSWERS))
            text = MALFORMED_ANSWERS[pick]
            return GenerationResult(request.key, text, inner.input_tokens, max(1, len(text.split())), FINISH_STOP,
                                    inner.latency_s, extra={**inner.extra, "chaos": kind})
        # truncated: cut like a model that ran out of max_new_tokens half-way
        text = inner.text[: len(inner.text) // 2]
        return GenerationResult(request.key, text, inner.input_tokens, max(0, inner.output_tokens // 2), FINISH_LENGTH,
                                inner.latency_s, extra={**inner.extra, "chaos": kind})
