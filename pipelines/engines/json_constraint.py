"""JSON-schema-constrained decoding for the transformers engine, with llguidance.

transformers has no constrained decoding of its own; llguidance (a small Rust library with no Python
dependencies, the one vLLM and llama.cpp use) turns a JSON schema into a token mask per step. This
module plugs it into `model.generate` as a logits processor: before each step, every constrained row
of the batch advances its matcher by the token it just sampled and masks every token the schema does
not allow next. Rows without a schema run free. Once a row's JSON is complete the matcher only allows
a stop token, so a constrained answer ends as soon as it is valid instead of rambling on.

A matcher that hits an error (it should not: it only ever sees tokens it allowed) lets its row run
free from then on; the augmenter's parser still validates every answer, so nothing unchecked gets in.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def llguidance_available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


_GRAMMARS: dict[str, str] = {}


def _grammar(schema: dict[str, Any]) -> str:
    import llguidance

    key = json.dumps(schema, sort_keys=True)
    if key not in _GRAMMARS:
        # compiled from the schema as given: properties come out in the schema's order (the order the
        # prompt shows). No free whitespace: a small model otherwise fills its budget with newlines.
        _GRAMMARS[key] = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    return _GRAMMARS[key]


class JsonSchemaLogitsProcessor:
    """A transformers logits processor for one micro-batch; `schemas[i]` is row i's schema or None."""

    def __init__(self, ll_tokenizer, schemas: list[dict[str, Any] | None]):
        import llguidance

        self.matchers: list[Any] = []
        for schema in schemas:
            if schema is None:
                self.matchers.append(None)
                continue
            matcher = llguidance.LLMatcher(ll_tokenizer, _grammar(schema))
            if matcher.is_error():
                raise ValueError(f"the JSON schema cannot be compiled for constrained decoding: {matcher.get_error()}")
            self.matchers.append(matcher)
        self._prompt_len: int | None = None
        self._words = (ll_tokenizer.vocab_size + 31) // 32

    def __call__(self, input_ids, scores):
        import torch

        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
        elif input_ids.shape[1] > self._prompt_len:
            last = input_ids[:, -1].tolist()
            for i, matcher in enumerate(self.matchers):
                if matcher is None or matcher.is_stopped():
                    continue
                if not matcher.consume_token(last[i]):
                    self.matchers[i] = None
        # a stopped matcher (complete JSON) still masks: only a stop token may follow
        rows = [i for i, m in enumerate(self.matchers) if m is not None]
        if not rows:
            return scores
        mask = np.full((len(rows), self._words), -1, dtype=np.int32)
        for j, i in enumerate(rows):
            m = mask[j]
            self.matchers[i].unsafe_compute_mask_ptr(m.ctypes.data, m.nbytes)
        allowed = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")
        vocab = scores.shape[1]
        if allowed.shape[1] < vocab:
            allowed = np.pad(allowed, ((0, 0), (0, vocab - allowed.shape[1])))
        allowed = torch.from_numpy(allowed[:, :vocab].astype(bool)).to(scores.device)
        index = torch.tensor(rows, device=scores.device)
        scores[index] = scores[index].masked_fill(~allowed, float("-inf"))
        return scores
