"""vLLM offline (`vllm.LLM`) on the GPU of one worker: the engine for production-size runs.

vLLM is not in the main environment (it pins its own torch): it is imported inside `load()` only, and
a missing install is an EngineError that says to install the `gpu` extra in its own environment.
Prefix caching is on, so the long shared system/instruction part of an augmenter's prompts is
computed once. Every request carries its own SamplingParams (its max_new_tokens, its JSON schema,
and with temperature > 0 a seed derived from `seed` and the request key, so a request samples the
same text whatever batch it lands in). Schema-constrained decoding uses
`SamplingParams(structured_outputs=StructuredOutputsParams(json=...))` (vLLM >= 0.11) and falls back
to `guided_decoding=GuidedDecodingParams(json=...)` on older releases.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from pathlib import Path
from typing import Any

from recaug.core.config import EngineConfig
from recaug.pipelines.engines.base import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Engine,
    EngineError,
    GenerationRequest,
    GenerationResult,
    Resources,
    defuse_special_tokens,
    special_token_texts,
)
from recaug.core.offline import go_offline
from recaug.pipelines.engines.transformers_engine import LocalModelFolder

INSTALL_HINT = (
    "vLLM is not installed in this environment; install the `gpu` extra in an environment of its own "
    "(`pip install -e '.[gpu]'` from the repository) or use engine.kind: transformers"
)


def _json_constraint_factory():
    """(SamplingParams keyword, params class) for JSON-schema decoding in the installed vLLM."""
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return "structured_outputs", StructuredOutputsParams
    except ImportError:
        pass
    try:
        from vllm.sampling_params import GuidedDecodingParams

        return "guided_decoding", GuidedDecodingParams
    except ImportError:
        return None


@functools.lru_cache(maxsize=4)
def hf_tokenizer(model_dir: Path):
    """A model folder's Hugging Face tokenizer, loaded once per process (prompt budgeting before vLLM loads)."""
    go_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def request_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:4], "little")


class VLLMEngine(LocalModelFolder, Engine):
    kind = "vllm"
    supports_json_schema = True  # load() refuses a vLLM that has neither structured-output API

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self._model_dir: Path | None = None
        self._model_id: str | None = None
        self._llm = None
        self._sampling_params_cls = None
        self._constraint: tuple[str, type] | None = None
        self._tokenizer = None
        self._stop_ids: set[int] = set()

    def __repr__(self) -> str:
        return f"VLLMEngine(model={self.cfg.model!r}, loaded={self._llm is not None})"

    def resources(self) -> Resources:
        return Resources(gpus=1.0)  # one engine per GPU, unless runner.gpus_per_actor says otherwise

    def load_model(self) -> Engine:
        return self.loaded_copy()  # the weights live on the copy; this engine stays config and identity

    # --- loading ----------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The model's HF tokenizer, for prompt budgeting before (or without) loading vLLM."""
        if self._tokenizer is None:
            if self._llm is not None:
                self._tokenizer = self._llm.get_tokenizer()
            else:  # kept per process, not on the engine: the engine a runner ships stays config and identity
                return hf_tokenizer(self.model_dir)
        return self._tokenizer

    def llm_kwargs(self, model_dir: str) -> dict[str, Any]:
        """Arguments of `vllm.LLM`: ours, then `engine.vllm_args` verbatim (the config refuses the
        keys set here from other engine keys)."""
        return {
            "model": model_dir,
            "tokenizer": model_dir,
            "enable_prefix_caching": True,
            "gpu_memory_utilization": self.cfg.gpu_memory_utilization,
            "seed": self.cfg.seed,
            **self.cfg.vllm_args,
        }

    def load(self) -> None:
        if self._llm is not None:
            return
        # vLLM logs each engine start at INFO (config dumps, KV sizes); VLLM_LOGGING_LEVEL=INFO shows them
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            import vllm
        except ImportError:
            raise EngineError(INSTALL_HINT) from None
        constraint = _json_constraint_factory()
        if constraint is None:
            raise EngineError(
                f"vLLM {getattr(vllm, '__version__', '?')} has neither StructuredOutputsParams nor "
                "GuidedDecodingParams; upgrade vLLM (the `gpu` extra) for schema-constrained decoding"
            )
        go_offline()
        model_dir = str(self.model_dir)
        self._llm = vllm.LLM(**self.llm_kwargs(model_dir))
        self._sampling_params_cls = vllm.SamplingParams
        self._constraint = constraint
        self._tokenizer = self._llm.get_tokenizer()
        self._stop_ids = self._eos_ids(self._tokenizer, self.model_dir)

    @staticmethod
    def _eos_ids(tokenizer, model_dir: Path) -> set[int]:
        """EOS ids of the tokenizer and of generation_config.json (vLLM stops on both)."""
        import json

        ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        gen_cfg = model_dir / "generation_config.json"
        if gen_cfg.exists():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    def close(self) -> None:
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        # vLLM's V1 engine runs the model in an engine-core process (and workers): stop them now, not at
        # interpreter exit, so a closed engine frees its memory and cores (a Ray actor, the next engine)
        shutdown = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    # --- tokens / generation ------------------------------------------------------------------------

    def count_tokens(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def sampling_params(self, request: GenerationRequest):
        kwargs: dict[str, Any] = {"max_tokens": request.max_new_tokens, "temperature": self.cfg.temperature}
        if self.cfg.temperature > 0:
            kwargs.update(top_p=self.cfg.top_p, seed=request_seed(self.cfg.seed, request.key))
        if request.json_schema is not None:
            keyword, params_cls = self._constraint
            kwargs[keyword] = params_cls(json=request.json_schema)
        return self._sampling_params_cls(**kwargs)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        self.load()
        # message contents are data: special-token strings in them must not become chat markers
        specials = special_token_texts(self.tokenizer)
        conversations = [defuse_special_tokens(r.messages, specials) for r in requests]
        params = [self.sampling_params(r) for r in requests]
        started = time.perf_counter()
        outputs = self._llm.chat(conversations, sampling_params=params, use_tqdm=False, add_generation_prompt=True)
        wall = time.perf_counter() - started
        if len(outputs) != len(requests):
            raise EngineError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        # vLLM schedules the whole call as one continuous batch: each request's share is wall / n
        share = wall / len(requests)
        return [self._result(r, o, share, wall) for r, o in zip(requests, outputs)]

    def _result(self, request: GenerationRequest, output, share: float, wall: float) -> GenerationResult:
        input_tokens = len(output.prompt_token_ids or [])
        extra = {"batch_latency_s": wall}
        if not output.outputs:
            return GenerationResult(request.key, "", input_tokens, 0, FINISH_ERROR, share,
                                    error="vLLM returned no completion for this request", extra=extra)
        completion = output.outputs[0]
        finish = completion.finish_reason
        token_ids = list(completion.token_ids or [])
        n = len(token_ids)
        if finish == "length":
            reason = FINISH_LENGTH
        elif finish == "stop":
            reason = FINISH_STOP
            # the stop token (EOS, or a stop id vLLM reports in stop_reason) is not content
            stop_reason = getattr(completion, "stop_reason", None)
            stops = self._stop_ids | ({stop_reason} if isinstance(stop_reason, int) else set())
            if token_ids and token_ids[-1] in stops:
                n -= 1
        else:
            return GenerationResult(request.key, completion.text or "", input_tokens, n, FINISH_ERROR, share,
                                    error=f"vLLM finished this request with reason {finish!r}", extra=extra)
        return GenerationResult(request.key, completion.text, input_tokens, n, reason, share, extra=extra)
