"""Hugging Face transformers on CPU or one CUDA device: the embedded default engine.

How a call is batched: requests are grouped by `max_new_tokens` (one `generate` call has one
budget), each group is ordered by prompt length so a micro-batch of `batch_size` pads only to its own
longest prompt, and results are put back in request order. Prompts are left-padded (decoder-only
models continue from the right edge); the model derives position ids from the attention mask, so a
padded prompt sees the same positions as when it runs alone.

Greedy decoding (temperature 0) gives the same tokens for a prompt whatever else is in its batch, up
to float rounding: a padded batch multiplies matrices of another shape, which can move a logit in the
last bits and, very rarely, flip a near-tie. With temperature > 0 the sampler is seeded per micro-batch
from `seed` and the batch's request keys, so a re-run of the same batch reproduces its text.

Shared prompt prefixes are computed once: when a micro-batch's prompts start with the same tokens
(system text, constant instructions), their keys and values are computed for one copy of that prefix,
kept for the next micro-batch (the longest part still shared is reused, the rest computed), and copied
to every row; each row then computes only its own remainder, padded between the prefix and the
remainder (positions come from the attention mask, so every token keeps the position it has alone).
`GenerationResult.extra["prompt_tokens_computed"]` counts the prompt tokens actually run through the
model (the prefix once, where it was computed, plus each remainder); `input_tokens` stays the rendered
prompt's length. Greedy outputs are those of the plain path up to the same float rounding as any change
of batch shape (tested on the packaged model).

A request with `max_sentences` stops once its answer holds that many complete sentences (a stopping
criterion checks each unfinished row's text as it grows; core/sentences.py says where a sentence
ends): the prompt asked for them, and a small model that would loop on to `max_new_tokens` costs the
decode steps it no longer takes. The text is cut at that sentence's end. A row that loops ("Horror,
Horror, Horror, Horror") stops there too (`extra["loop"]`): its answer is a dead letter anyway.

transformers has no constrained decoding of its own: with `engine.constrained_decoding` on (the
default) a request's JSON schema becomes a token mask per step through llguidance
(json_constraint.py), so JSON augmenters get valid JSON even from a 135M model; the augmenter's parser
still validates every answer (indices against candidates, vocabularies, ...).
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from pathlib import Path
from typing import Any

from recaug.core.config import EngineConfig
from recaug.pipelines.engines.base import FINISH_LENGTH, FINISH_STOP, Engine, EngineError, GenerationRequest, GenerationResult, Resources, defuse_special_tokens, finish_at_sentences, special_token_texts
from recaug.pipelines.engines.json_constraint import JsonSchemaLogitsProcessor, llguidance_available
from recaug.core.offline import go_offline
from recaug.core.sentences import cut_after_sentences, repeated_run
from recaug.core.packaged import PACKAGED_MODELS, ensure_model_dir, file_content_id, packaged_model

# OpenMP threads that spin while waiting for work starve each other when the cores are shared (other
# workers, Ray actors, a busy CI box): measured 10x slower decoding on 2 shared cores. Sleeping waits
# cost little here. Only effective if set before torch is first imported, hence at import of this module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# files that define what a folder's model writes: architecture, tokenisation, chat template, defaults
_IDENTITY_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
)


def resolve_model_dir(model: str) -> Path:
    """A packaged model's name ('smollm2', ...) -> its converted folder (converting it once);
    otherwise a local folder."""
    if packaged_model(model) is not None:
        return ensure_model_dir(model)
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        known = ", ".join(f"'{name}'" for name in PACKAGED_MODELS)
        raise EngineError(
            f"engine.model {model!r} is neither a packaged model ({known}; docs/config.md) nor a local "
            "model folder with a config.json; save the model once into a folder (save_pretrained) and point "
            "engine.model at it - nothing is downloaded at run time"
        )
    return path.resolve()


def folder_model_id(path: Path, revision: str) -> str:
    """`<folder name>@<revision>` when the config names a revision, else `<folder name>@<content id>`.

    The content id hashes the identity files and the weights (a read of the weights, once per engine),
    so a changed fine-tune under the same folder name is a new cache key. A revision other than the
    default 'packaged' is trusted as is and skips the read (worth it for multi-GB models).
    """
    if revision and revision != "packaged":
        return f"{path.name}@{revision}"
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name in _IDENTITY_FILES))
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise EngineError(f"no weight file ({', '.join(_WEIGHT_SUFFIXES)}) in the model folder {path}")
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}:{file_content_id(p, 64)}\n".encode())
    return f"{path.name}@{digest.hexdigest()[:16]}"


@functools.lru_cache(maxsize=4)
def chat_tokenizer(model_dir: Path):
    """The left-padding chat tokenizer of a model folder, loaded once per process."""
    go_offline()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise EngineError(f"the tokenizer in {model_dir} has no chat template; use an instruct/chat model")
    return tok


def plan_micro_batches(requests: list[GenerationRequest], prompt_lengths: list[int], batch_size: int) -> list[list[int]]:
    """Request indices per micro-batch: grouped by max_new_tokens, length-sorted, cut at batch_size.

    The order is a pure function of the requests (ties broken by position), so a call is reproducible.
    """
    order = sorted(range(len(requests)), key=lambda i: (requests[i].max_new_tokens, prompt_lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and requests[last[0]].max_new_tokens == requests[i].max_new_tokens:
            last.append(i)
        else:
            batches.append([i])
    return batches


class SentenceStop:
    """A transformers stopping criterion: row i is done once its generated text holds `limits[i]`
    complete sentences, or once it loops (core/sentences.py `repeated_run`: the rest would be the same
    phrase until max_new_tokens, and the answer is a dead letter either way); `stopped_at[i]` keeps how
    many tokens it had generated then, `looped[i]` whether it looped."""

    def __init__(self, tokenizer, prompt_width: int, limits: list[int | None]):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.limits = limits
        self.stopped_at: list[int | None] = [None] * len(limits)
        self.looped = [False] * len(limits)

    def row_done(self, row: int, generated) -> bool:
        """Whether row `row`, having generated `generated` (ids), is done; remembers where it stopped."""
        if self.stopped_at[row] is not None:
            return True
        if not self.limits[row]:
            return False
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        looped = repeated_run(text) is not None
        if looped or cut_after_sentences(text, self.limits[row]) is not None:
            self.stopped_at[row] = len(generated)
            self.looped[row] = looped
            return True
        return False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        generated = input_ids[:, self.prompt_width:]
        return torch.tensor([self.row_done(row, generated[row]) for row in range(len(self.limits))],
                            dtype=torch.bool, device=input_ids.device)


# A shared prefix shorter than this is not worth a separate forward pass and a cache copy
MIN_SHARED_PREFIX = 8


def shared_prefix_length(prompt_ids: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving at least one token of each prompt to compute
    (generation needs the last prompt token's logits)."""
    first = prompt_ids[0]
    n = min(len(p) for p in prompt_ids) - 1
    for p in prompt_ids[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


class LocalModelFolder:
    """Identity of an engine that runs a local model folder (`engine.model`: a packaged name or a path):
    the transformers and vLLM engines. Needs `cfg`, `_model_dir` and `_model_id` on the engine."""

    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            self._model_dir = resolve_model_dir(self.cfg.model)
        return self._model_dir

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            packaged = packaged_model(self.cfg.model)
            if packaged is not None:
                self._model_id = packaged.model_id  # no conversion needed to name it
            else:
                self._model_id = folder_model_id(self.model_dir, self.cfg.revision)
        return self._model_id


def quantize_int8(model):
    """The model with most linear layers as dynamic int8 (weights int8 per output channel, activations
    quantised per batch): on a CPU without bf16 units the fp32 matrix products are what prefill and
    decode spend their time on, and fbgemm's int8 kernels do them about twice as fast."""
    import warnings

    import torch

    # Two kinds of layer stay fp32: the output head (it picks the token) and the MLP's down projection,
    # whose input carries the few large activations that per-tensor int8 activations flatten. With
    # every layer int8, SmolLM2-135M kept fp32's next token 40% of the time; with these two fp32, 73%,
    # at 2.1x fp32's prefill speed.
    head = model.get_output_embeddings()
    layers = {name: torch.ao.quantization.per_channel_dynamic_qconfig for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not head and not name.endswith("down_proj")}
    with warnings.catch_warnings():
        # torch marks its eager quantisation API as moving to torchao; it is what runs on this torch
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, layers, dtype=torch.qint8)


class TransformersEngine(LocalModelFolder, Engine):
    kind = "transformers"
    # compute a micro-batch's shared prompt prefix once (see the module doc); False: the plain path
    reuse_prefix: bool = True

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.supports_json_schema = bool(cfg.constrained_decoding) and llguidance_available()
        self._ll_tokenizer = None
        self._model_dir: Path | None = None
        self._model_id: str | None = None
        self._model = None
        self._stop_ids: list[int] = []
        self._specials: tuple[str, ...] | None = None
        # the last shared prefix: its token ids and its keys/values per layer (batch of one)
        self._prefix_ids: list[int] = []
        self._prefix_kv: list[tuple[Any, Any]] = []

    def __repr__(self) -> str:
        return f"TransformersEngine(model={self.cfg.model!r}, device={self.cfg.device!r}, loaded={self._model is not None})"

    @property
    def model_id(self) -> str:
        # int8 weights answer differently from fp32: another model as far as the cache is concerned
        base = LocalModelFolder.model_id.fget(self)
        return base if self.cfg.quantize == "none" else f"{base}+{self.cfg.quantize}-dynamic"

    # --- loading ----------------------------------------------------------------------------------

    def resources(self) -> Resources:
        return Resources(gpus=1.0 if self.cfg.device.startswith("cuda") else 0.0)

    def load_model(self) -> Engine:
        return self.loaded_copy()  # the weights live on the copy; this engine stays config and identity

    @property
    def tokenizer(self):
        """Loadable without the model (prompt budgeting runs before any generation). Kept per process,
        not on the engine: the engine a runner ships stays its config and identity."""
        return chat_tokenizer(self.model_dir)

    def load(self) -> None:
        if self._model is not None:
            return
        go_offline()
        import torch
        from transformers import AutoModelForCausalLM

        if self.cfg.quantize != "none" and self.cfg.device != "cpu":
            raise EngineError(f"engine.quantize: {self.cfg.quantize} runs on the CPU only (torch's dynamic int8 kernels); "
                              f"engine.device is {self.cfg.device!r}: set engine.quantize: none on a GPU")
        if self.cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"engine.device is {self.cfg.device!r} but torch sees no CUDA device; set engine.device: cpu")
        tok = self.tokenizer
        model = AutoModelForCausalLM.from_pretrained(self.model_dir)
        model.to(self.cfg.device)
        model.eval()
        if self.cfg.quantize == "int8":
            model = quantize_int8(model)
        gen_eos = model.generation_config.eos_token_id
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        # generation stops on any of these, and counting uses the same set
        self._stop_ids = sorted({i for i in [*gen_eos, tok.eos_token_id] if i is not None})
        self._model = model

    def close(self) -> None:
        self._model = None
        self._prefix_ids, self._prefix_kv = [], []
        self._ll_tokenizer = None
        if self.cfg.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # --- tokens -----------------------------------------------------------------------------------

    def render(self, messages) -> str:
        # message contents are data: special-token strings in them must not become chat markers
        if self._specials is None:
            self._specials = special_token_texts(self.tokenizer)
        safe = defuse_special_tokens(messages, self._specials)
        return self.tokenizer.apply_chat_template(safe, add_generation_prompt=True, tokenize=False)

    def count_tokens(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    # --- generation -------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        self.load()
        prompts = [self.render(r.messages) for r in requests]
        # the chat template already holds every special token; the tokenizer must not add a BOS again
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        results: list[GenerationResult | None] = [None] * len(requests)
        for batch in plan_micro_batches(requests, [len(p) for p in prompt_ids], self.cfg.batch_size):
            for i, result in zip(batch, self._generate_batch([requests[i] for i in batch], [prompt_ids[i] for i in batch])):
                results[i] = result
        return results  # type: ignore[return-value]

    def _generate_batch(self, requests: list[GenerationRequest], prompt_ids: list[list[int]]) -> list[GenerationResult]:
        import torch

        tok, model = self.tokenizer, self._model
        max_new = requests[0].max_new_tokens
        shared = shared_prefix_length(prompt_ids) if self.reuse_prefix else 0
        prefix_computed = 0
        kwargs: dict[str, Any] = {}
        if shared >= MIN_SHARED_PREFIX:
            prefix_computed = self._extend_prefix(prompt_ids[0][:shared])
            rest = tok.pad({"input_ids": [p[shared:] for p in prompt_ids]}, padding=True, return_tensors="pt")
            n = len(prompt_ids)
            head = torch.tensor([prompt_ids[0][:shared]] * n, dtype=rest["input_ids"].dtype)
            enc = {
                "input_ids": torch.cat([head, rest["input_ids"]], dim=1).to(self.cfg.device),
                "attention_mask": torch.cat([torch.ones_like(head), rest["attention_mask"]], dim=1).to(self.cfg.device),
            }
            kwargs["past_key_values"] = self._prefix_cache(n)
        else:
            shared = 0
            enc = tok.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt").to(self.cfg.device)
        kwargs.update({
            "max_new_tokens": max_new,
            "eos_token_id": self._stop_ids,
            "pad_token_id": tok.pad_token_id,
        })
        if self.cfg.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=None)
        sentence_stop = None
        if any(r.max_sentences for r in requests):
            from transformers import StoppingCriteriaList

            sentence_stop = SentenceStop(tok, enc["input_ids"].shape[1], [r.max_sentences for r in requests])
            kwargs["stopping_criteria"] = StoppingCriteriaList([sentence_stop])
        constraint = self._json_constraint(requests)
        if constraint is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([constraint])
        started = time.perf_counter()
        if self.cfg.temperature == 0 and constraint is None and self._plain_greedy():
            generated = self._greedy_compacting(enc, kwargs.get("past_key_values"), max_new, sentence_stop)
        else:
            with torch.inference_mode(), torch.random.fork_rng(devices=self._cuda_devices()):
                if self.cfg.temperature > 0:
                    torch.manual_seed(self._batch_seed(requests))
                out = model.generate(**enc, **kwargs)
            generated = out[:, enc["input_ids"].shape[1]:].tolist()
        wall = time.perf_counter() - started
        results = []
        for j, (req, ids, prompt) in enumerate(zip(requests, generated, prompt_ids)):
            n, stopped = self._content_length(ids)
            if sentence_stop is not None and sentence_stop.stopped_at[j] is not None:
                n, stopped = min(n, sentence_stop.stopped_at[j]), True
            finish = FINISH_STOP if stopped or n < max_new else FINISH_LENGTH
            results.append(GenerationResult(
                key=req.key,
                text=tok.decode(ids[:n], skip_special_tokens=True),
                input_tokens=len(prompt),
                output_tokens=n,
                finish_reason=finish,
                # every request of a micro-batch waited the whole batch: its share is wall / size,
                # and the batch's own wall time is kept alongside
                latency_s=wall / len(requests),
                extra={"batch_latency_s": wall, "batch_size": len(requests),
                       # the prefix once (counted on the batch's first request), then this prompt's remainder
                       "prompt_tokens_computed": len(prompt) - shared + (prefix_computed if j == 0 else 0),
                       "prompt_tokens_reused": shared - (prefix_computed if j == 0 else 0),
                       **({"loop": True} if sentence_stop is not None and sentence_stop.looped[j] else {})},
            ))
        return finish_at_sentences(requests, results)

    def _plain_greedy(self) -> bool:
        """Whether greedy decoding is an argmax per step for this model: a generation config that
        asks for a repetition penalty, banned words or a minimum length needs `generate`."""
        g = self._model.generation_config
        return ((g.repetition_penalty in (None, 1.0)) and not g.no_repeat_ngram_size and not g.bad_words_ids
                and not g.min_length and not g.min_new_tokens and not g.suppress_tokens
                and not g.begin_suppress_tokens and not g.forced_bos_token_id and not g.forced_eos_token_id)

    def _greedy_compacting(self, enc, past, max_new: int, sentence_stop: SentenceStop | None) -> list[list[int]]:
        """Greedy decoding that drops a row from the batch once it is done (a stop token, its sentence
        limit, a loop): `generate` keeps every finished row in the batch until the longest one ends,
        and with answers of 10-64 tokens about half of its decode work was padding. Returns each
        row's generated ids (ending with its stop token, if any)."""
        import torch
        from transformers import DynamicCache

        model, stop_ids = self._model, torch.tensor(self._stop_ids, device=self.cfg.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        cache = past if past is not None else DynamicCache(config=model.config)
        cached = cache.get_seq_length()
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        rows = torch.arange(ids.shape[0], device=ids.device)  # which original row each batch row is
        out: list[list[int]] = [[] for _ in range(ids.shape[0])]
        with torch.inference_mode():
            logits = model(input_ids=ids[:, cached:], attention_mask=mask, position_ids=positions[:, cached:],
                           past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            for step in range(max_new):
                nxt = logits[:, -1].argmax(-1)
                done = torch.isin(nxt, stop_ids)
                for row, token in zip(rows.tolist(), nxt.tolist()):
                    out[row].append(token)
                if sentence_stop is not None:
                    done |= torch.tensor([sentence_stop.row_done(row, out[row]) for row in rows.tolist()],
                                         dtype=torch.bool, device=done.device)
                if step == max_new - 1 or bool(done.all()):
                    break
                if bool(done.any()):
                    keep = (~done).nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    rows, nxt, mask = rows[keep], nxt[keep], mask[keep]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                logits = model(input_ids=nxt[:, None], attention_mask=mask,
                               position_ids=(mask.long().sum(-1, keepdim=True) - 1), past_key_values=cache,
                               use_cache=True).logits
        return out

    def _extend_prefix(self, ids: list[int]) -> int:
        """Make the kept prefix cover `ids`: reuse the longest part the kept one shares with them and
        compute only the rest (batch of one, no padding). Returns how many tokens were computed."""
        import torch
        from transformers import DynamicCache

        keep = 0
        limit = min(len(ids), len(self._prefix_ids))
        while keep < limit and ids[keep] == self._prefix_ids[keep]:
            keep += 1
        if keep == len(ids) and keep == len(self._prefix_ids):
            return 0
        if keep == len(ids):  # a shorter prefix of the kept one: a view of its first `keep` positions
            self._prefix_kv = [(k[:, :, :keep], v[:, :, :keep]) for k, v in self._prefix_kv]
            self._prefix_ids = list(ids)
            return 0
        cache = DynamicCache(config=self._model.config)
        if keep:
            for layer, (k, v) in enumerate(self._prefix_kv):
                cache.update(k[:, :, :keep].clone(), v[:, :, :keep].clone(), layer)
        with torch.inference_mode():
            self._model(input_ids=torch.tensor([ids[keep:]], device=self.cfg.device), past_key_values=cache, use_cache=True)
        self._prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._prefix_ids = list(ids)
        return len(ids) - keep

    def _prefix_cache(self, n: int):
        """A fresh cache holding the kept prefix for `n` rows (generation appends to it in place)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self._model.config)
        for layer, (k, v) in enumerate(self._prefix_kv):
            cache.update(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous(), layer)
        return cache

    def _json_constraint(self, requests: list[GenerationRequest]) -> JsonSchemaLogitsProcessor | None:
        if not self.supports_json_schema or all(r.json_schema is None for r in requests):
            return None
        if self._ll_tokenizer is None:
            import llguidance.hf

            # the model's logit width, which can exceed the tokenizer's (padded embedding matrices)
            n_vocab = max(int(self._model.config.vocab_size), len(self.tokenizer))
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n_vocab, eos_token=self._stop_ids)
        return JsonSchemaLogitsProcessor(self._ll_tokenizer, [r.json_schema for r in requests])

    def _content_length(self, ids: list[int]) -> tuple[int, bool]:
        """Generated tokens before the first stop token (padding after it never counts)."""
        stops = self._stop_ids
        for n, t in enumerate(ids):
            if t in stops:
                return n, True
        return len(ids), False

    def _batch_seed(self, requests: list[GenerationRequest]) -> int:
        blob = f"{self.cfg.seed}|" + "|".join(r.key for r in requests)
        return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "little") & ((1 << 63) - 1)

    def _cuda_devices(self) -> list[int]:
        import torch

        return list(range(torch.cuda.device_count())) if self.cfg.device.startswith("cuda") else []
