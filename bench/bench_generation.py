"""Generation throughput: our pipeline end to end vs a one-prompt-at-a-time loop vs bare batched generate.

Same model (the packaged SmolLM2-135M-Instruct, loaded once and shared), same greedy decoding, same
prompts - the KAR item-knowledge prompts our pipeline renders for the first --prompts MovieLens-100K
items - side by side in one run:

  pipeline the augmentation stage end to end (`run_augmenter`: render, cache keys, lookup in an empty
           cache, shards of --batch-size sorted by length, local runner, TransformersEngine, cache
           commits, parsing, the output tables)
  engine   TransformersEngine.generate over the same prompts (micro-batches of --batch-size, sorted
           by length inside the call, left padding, stop tokens excluded from the count; a shared
           prompt prefix computed once per run and reused, see transformers_engine.py)
  engine, no prefix reuse   the same with `reuse_prefix = False`: every prompt token computed
  naive    for each prompt: apply the chat template, model.generate(one prompt) - the pattern of the
           anchor repositories' augmentation scripts
  batched  bare model.generate on the same batches of --batch-size in the prompts' own order
           (left padding, no length sorting)

Each path counts generated tokens up to its first stop token and reports generated tokens/s over its
wall time, and for our paths the prompt tokens rendered and the prompt tokens actually computed
(a reused prefix is computed once per run). Runs alternate between the paths (--repeats rounds) and each path's best run counts; the
naive loop, ~3x slower than the rest, runs in the first round only (--naive-repeats) to keep
`make bench` within half an hour. Ratios are against the naive loop and the bare batched generate.
The JSON keeps every run.

    .venv/bin/python bench/bench_generation.py [--prompts 32] [--max-new-tokens 24] [--batch-size 16] [--repeats 2] [--quick]
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, result, standalone, table  # noqa: E402  (also sets the offline environment)

import recaug.augmenters.kar  # noqa: E402,F401  (registers the KAR augmenters)
from recaug.augmenters.base import get_augmenter  # noqa: E402
from recaug.pipelines.augment import build_pending, run_augmenter  # noqa: E402
from recaug.pipelines.cache import GenerationCache  # noqa: E402
from recaug.core.config import AugmenterConfig, EngineConfig, load_config  # noqa: E402
from recaug.pipelines.engines.base import GenerationRequest  # noqa: E402
from recaug.pipelines.engines.transformers_engine import TransformersEngine  # noqa: E402
from recaug.pipelines.runners.local import LocalRunner  # noqa: E402

NAME = "generation"
AUGMENTER = "kar_item_knowledge"


class Pipeline:
    """The augmentation stage over the first n ML-100K items, as the long job runs it."""

    def __init__(self, n: int, engine: TransformersEngine, engine_cfg: EngineConfig, max_new: int):
        from recaug.pipelines.inputs import prepare_inputs
        from recaug.pipelines.long_job import augment_inputs

        cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "ml100k.yaml")
        prep = prepare_inputs(cfg)
        self.engine, self.engine_cfg = engine, engine_cfg
        self.inputs = augment_inputs(cfg, prep, engine)
        self.aug = get_augmenter(AUGMENTER)
        self.aug_cfg = AugmenterConfig(name=AUGMENTER, max_new_tokens=max_new)
        self.entity_ids = prep.items.column("item_id").to_pylist()[:n]

    def conversations(self) -> list[list[dict[str, str]]]:
        """The chat messages the stage sends for these items, in entity order."""
        pending, failed, _ = build_pending(self.aug, self.aug_cfg, self.inputs, self.engine, self.engine_cfg,
                                           self.entity_ids)
        assert not failed, failed
        return [list(p.messages) for p in pending]

    def run(self, shard_size: int) -> tuple[float, int, int, int]:
        with tempfile.TemporaryDirectory(prefix="recaug-bench-gen-") as tmp:  # an empty cache every run
            started = time.perf_counter()
            out = run_augmenter(self.aug, self.aug_cfg, self.inputs, self.engine, self.engine_cfg,
                                GenerationCache(Path(tmp)), LocalRunner(self.engine).execute, shard_size,
                                entity_ids=self.entity_ids)
            wall = time.perf_counter() - started
        assert out.stats.llm_requests == len(self.entity_ids) and out.stats.cache_hits == 0, out.stats
        return wall, out.stats.output_tokens, out.stats.input_tokens, out.stats.prompt_tokens_computed


def content_tokens(rows: list[list[int]], stop_ids: set[int]) -> int:
    total = 0
    for ids in rows:
        n = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
        total += n
    return total


def run_engine(engine: TransformersEngine, conversations, max_new: int, reuse: bool = True) -> tuple[float, int, int, int]:
    requests = [GenerationRequest(f"p{i}", tuple(c), max_new) for i, c in enumerate(conversations)]
    engine._prefix_ids, engine._prefix_kv = [], []  # each run computes its prefix once
    engine.reuse_prefix = reuse
    started = time.perf_counter()
    try:
        results = engine.generate(requests)
    finally:
        engine.reuse_prefix = True
    wall = time.perf_counter() - started
    return (wall, sum(r.output_tokens for r in results), sum(r.input_tokens for r in results),
            sum(r.extra.get("prompt_tokens_computed", r.input_tokens) for r in results))


def run_naive(model, tok, conversations, max_new: int, stop_ids: set[int]) -> tuple[float, int]:
    import torch

    started = time.perf_counter()
    rows = []
    for conv in conversations:
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(stop_ids),
                                 pad_token_id=tok.pad_token_id)
        rows.append(out[0, enc["input_ids"].shape[1]:].tolist())
    return time.perf_counter() - started, content_tokens(rows, stop_ids)


def run_bare_batched(model, tok, conversations, max_new: int, batch_size: int, stop_ids: set[int]) -> tuple[float, int]:
    import torch

    started = time.perf_counter()
    rows = []
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(stop_ids),
                                 pad_token_id=tok.pad_token_id)
        rows.extend(out[:, enc["input_ids"].shape[1]:].tolist())
    return time.perf_counter() - started, content_tokens(rows, stop_ids)


def run(quick: bool = False, prompts: int | None = None, max_new_tokens: int | None = None, batch_size: int = 16,
        repeats: int | None = None, naive_repeats: int = 1) -> dict:
    import argparse

    import torch

    args = argparse.Namespace(prompts=prompts or (16 if quick else 32), max_new_tokens=max_new_tokens or (16 if quick else 24),
                              batch_size=batch_size, repeats=repeats or (1 if quick else 2))
    engine_cfg = EngineConfig(kind="transformers", batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    engine = TransformersEngine(engine_cfg)
    pipeline = Pipeline(args.prompts, engine, engine_cfg, args.max_new_tokens)
    conversations = pipeline.conversations()
    engine.load()
    model, tok = engine._model, engine.tokenizer  # the one loaded model, shared by all three paths
    stop_ids = set(engine._stop_ids)
    engine.generate([GenerationRequest("warm", tuple(conversations[0]), 4)])  # first-call overheads

    paths = (
        ("pipeline", lambda: pipeline.run(args.batch_size)),
        ("engine", lambda: run_engine(engine, conversations, args.max_new_tokens)),
        ("engine_plain", lambda: run_engine(engine, conversations, args.max_new_tokens, reuse=False)),
        ("batched", lambda: run_bare_batched(model, tok, conversations, args.max_new_tokens, args.batch_size, stop_ids)),
        ("naive", lambda: run_naive(model, tok, conversations, args.max_new_tokens, stop_ids)),
    )
    runs: dict[str, list[dict]] = {name: [] for name, _ in paths}
    for repeat in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits every path
        for name, fn in paths:
            if name == "naive" and repeat >= naive_repeats:
                continue
            wall, tokens, *prompt = fn()
            row = {"wall_s": round(wall, 3), "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 2)}
            if prompt:
                row.update(prompt_tokens_rendered=prompt[0], prompt_tokens_computed=prompt[1])
            runs[name].append(row)
            log(f"[{repeat + 1}/{args.repeats}] {name:12s} {tokens:6d} tokens in {wall:7.2f} s = "
                f"{tokens / wall:7.2f} generated tok/s"
                + (f"; prompt tokens {prompt[0]:,} rendered, {prompt[1]:,} computed" if prompt else ""))
    # other work on the machine only ever slows a run down: compare each path's best run
    rows = {name: {**max(r, key=lambda x: x["tokens_per_s"]), "runs": r} for name, r in runs.items()}

    tps = {k: v["tokens_per_s"] for k, v in rows.items()}
    ratios = {
        "pipeline_vs_naive": round(tps["pipeline"] / tps["naive"], 2),
        "pipeline_vs_bare_batched": round(tps["pipeline"] / tps["batched"], 2),
        "pipeline_vs_engine": round(tps["pipeline"] / tps["engine"], 2),
        "engine_vs_naive": round(tps["engine"] / tps["naive"], 2),
        "engine_prefix_reuse_vs_plain": round(tps["engine"] / tps["engine_plain"], 2),
        "engine_vs_bare_batched": round(tps["engine"] / tps["batched"], 2),
        "bare_batched_vs_naive": round(tps["batched"] / tps["naive"], 2),
    }
    report = {
        "model": engine.model_id,
        "prompts": args.prompts,
        "prompt_source": f"{AUGMENTER} prompts of the first {args.prompts} ML-100K items",
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "decoding": "greedy",
        "repeats": args.repeats,
        "naive_repeats": min(naive_repeats, args.repeats),
        "results": rows,
        "ratios": ratios,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": sys.version.split()[0], "platform": platform.platform(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    engine.close()
    labels = {
        "pipeline": "recaug pipeline end to end (augmentation stage, local runner)",
        "engine": "recaug TransformersEngine.generate alone",
        "engine_plain": "recaug TransformersEngine.generate, no prefix reuse",
        "batched": "bare batched model.generate",
        "naive": "one prompt at a time (naive loop)",
    }
    t1 = table(
        f"Generation, {engine.model_id}, the {AUGMENTER} prompts of {args.prompts} ML-100K items, greedy, "
        f"max {args.max_new_tokens} new tokens, batch {args.batch_size} (best of {args.repeats}; naive: "
        f"{min(naive_repeats, args.repeats)} run)",
        ["path", "generated tokens", "prompt tokens rendered", "prompt tokens computed", "wall s", "generated tok/s",
         "vs naive", "vs bare batched"],
        [[labels[name], rows[name]["generated_tokens"], rows[name].get("prompt_tokens_rendered", ""),
          rows[name].get("prompt_tokens_computed", ""), rows[name]["wall_s"], rows[name]["tokens_per_s"],
          rows[name]["tokens_per_s"] / tps["naive"], rows[name]["tokens_per_s"] / tps["batched"]]
         for name in ("pipeline", "engine", "engine_plain", "batched", "naive")],
    )
    summary = [
        f"our pipeline end to end: {ratios['pipeline_vs_naive']:.2f}x the naive loop's tokens/s and "
        f"{ratios['pipeline_vs_bare_batched']:.2f}x a bare batched generate on the same prompts "
        f"(the engine alone: {ratios['engine_vs_naive']:.2f}x / {ratios['engine_vs_bare_batched']:.2f}x; "
        f"batched vs naive: {ratios['bare_batched_vs_naive']:.2f}x)",
        f"prompt tokens: {rows['engine']['prompt_tokens_rendered']:,} rendered, "
        f"{rows['engine']['prompt_tokens_computed']:,} computed with the shared prefix reused "
        f"(pipeline: {rows['pipeline']['prompt_tokens_computed']:,}); the engine with reuse runs at "
        f"{ratios['engine_prefix_reuse_vs_plain']:.2f}x the generated tok/s of the engine without",
    ]
    return result(NAME, "Generation: our pipeline vs naive loop vs bare batched generate", [t1], summary, report)


def _args(ap):
    ap.add_argument("--prompts", type=int, default=None, help="default 32 (--quick 16)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 24 (--quick 16)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved runs per path; the best counts (default 2)")
    ap.add_argument("--naive-repeats", type=int, default=1, help="runs of the naive loop (the first rounds)")


def main(argv: list[str] | None = None) -> int:
    return standalone(run, argv, _args, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
