"""The peers of bench_generation.py and the machine's prefill FLOP bound.

- vLLM: our VLLMEngine in the vLLM venv (`make peers`), in a worker process (bench/peer_vllm.py) that
  stays loaded while the benchmark alternates between its paths;
- llama.cpp: an OpenAI-compatible `llama_cpp.server` (llama-cpp-python[server], built with
  `-DGGML_NATIVE=OFF`) on 127.0.0.1 serving the packaged SmolLM2 GGUF, driven through our HTTPEngine;
- the FLOP bound: fp32 GEMM GFLOP/s measured here with torch, on the threads our engine uses, over
  FLOPs per prompt token -> the prompt tokens/s no fp32 prefill on this machine can beat.

A peer whose venv is missing is skipped with a line naming the make target that builds it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import OFFLINE_ENV, REPO, log

GIB = 1 << 30
# vLLM without its torch.compile pass (a start-up of 7-10 min on 2 cores, docs/engines.md) and with a
# KV cache of 1 GiB instead of half the free RAM: the machine is shared and 16-64 short prompts need little
VLLM_ARGS = {"enforce_eager": True, "max_model_len": 2048, "kv_cache_memory_bytes": GIB}
LLAMA_CTX = 2048


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    venv: Path
    make_target: str
    build_time: str

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def missing(self) -> str | None:
        """None when the venv is built (its stamp exists), else the line that says how to build it."""
        if (self.venv / ".recaug-installed").exists() and self.python.exists():
            return None
        return (f"{self.label} peer skipped: no built venv at {self.venv} (`make {self.make_target}` builds it once, "
                f"{self.build_time}; or point {self.env} at one)")

    @property
    def env(self) -> str:
        return f"RECAUG_{self.name.upper().replace('.', '')}_VENV"


def peers() -> dict[str, Peer]:
    """The peers' venvs: RECAUG_VLLM_VENV / RECAUG_LLAMACPP_VENV, else the repository's .venv-vllm / .venv-llama
    (what `make peers` builds; the Makefile passes its VLLM_VENV / LLAMA_VENV)."""
    out = {}
    for name, label, folder, build in (("vllm", "vLLM", ".venv-vllm", "~6 min on 2 cores"),
                                       ("llama.cpp", "llama.cpp", ".venv-llama", "~30 min on 2 cores: it compiles llama.cpp")):
        peer = Peer(name, label, REPO / folder, "peers", build)
        venv = os.environ.get(peer.env)
        out[name] = Peer(name, label, Path(venv) if venv else peer.venv, "peers", build)
    return out


# --- the FLOP bound -----------------------------------------------------------------------------------


def flops_per_prompt_token(model, mean_prompt_tokens: float) -> dict[str, Any]:
    """Forward FLOPs per prompt token: 2*N + 2*n_layer*L*d_attn, where N is the non-embedding parameter
    count (every weight a token's activations multiply once, 2 FLOPs per multiply-add; the LM head is
    left out because prefill computes logits for the last position only), and the attention term counts
    QK^T and AV (2*2*t*d_attn per layer for a token at position t, t = L/2 on average over a prompt of L
    tokens, d_attn = heads x head_dim)."""
    cfg = model.config
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    attention = 2 * cfg.num_hidden_layers * mean_prompt_tokens * d_attn
    return {"non_embedding_params": non_embedding, "n_layer": cfg.num_hidden_layers, "d_attn": d_attn,
            "mean_prompt_tokens": round(mean_prompt_tokens, 1), "attention_flops": round(attention),
            "flops_per_token": round(2 * non_embedding + attention),
            "formula": "2*N_non_embedding + 2*n_layer*L*d_attn (L = mean prompt tokens)"}


def gemm_shapes(model, prefill_tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the prefill's matmuls: a micro-batch's tokens x the model's projections, and a square one."""
    cfg = model.config
    h, ff = cfg.hidden_size, cfg.intermediate_size
    m = max(64, prefill_tokens)
    return [(m, h, ff), (m, ff, h), (m, h, h), (1024, 1024, 1024)]


def _onednn_linear(a, b):
    """`a @ b` through oneDNN's fp32 GEMM (torch's mkldnn linear), operands converted once, outside the
    timing; None when this torch has no oneDNN."""
    import torch

    try:
        am, wm = a.to_mkldnn(), b.t().contiguous().to_mkldnn()
        torch._C._nn.mkldnn_linear(am, wm, None)
    except (AttributeError, RuntimeError):
        return None
    return lambda: torch._C._nn.mkldnn_linear(am, wm, None)


def gemm_gflops(shapes: list[tuple[int, int, int]], min_seconds: float = 0.4, best_of: int = 3) -> dict[str, Any]:
    """fp32 GEMM GFLOP/s per shape and per torch backend, best of `best_of` timings of >= min_seconds
    each, on the threads torch uses in this process (the engine's): `torch.matmul` (MKL's sgemm here,
    what nn.Linear runs) and oneDNN's (torch's mkldnn linear). The machine's bound is the best of them:
    on this AMD EPYC, MKL reaches about a third of what oneDNN does with the same threads."""
    import torch

    per_shape: dict[str, dict[str, float]] = {"torch.matmul": {}, "oneDNN": {}}
    with torch.inference_mode():
        for m, k, n in shapes:
            a, b = torch.randn(m, k), torch.randn(k, n)
            torch.matmul(a, b)  # allocations and kernel choice out of the timing
            for backend, fn in (("torch.matmul", lambda: torch.matmul(a, b)), ("oneDNN", _onednn_linear(a, b))):
                if fn is None:
                    continue
                best = 0.0
                for _ in range(best_of):
                    reps, started = 0, time.perf_counter()
                    while True:
                        fn()
                        reps += 1
                        wall = time.perf_counter() - started
                        if wall >= min_seconds:
                            break
                    best = max(best, 2 * m * k * n * reps / wall / 1e9)
                per_shape[backend][f"{m}x{k}x{n}"] = round(best, 2)
    per_backend = {name: max(v.values()) for name, v in per_shape.items() if v}
    return {"per_shape_gflops": per_shape, "per_backend_gflops": per_backend,
            "best_gflops": max(per_backend.values()), "threads": torch.get_num_threads()}


# --- vLLM in its venv ---------------------------------------------------------------------------------

MARK = "@@peer "


class VllmWorker:
    """bench/peer_vllm.py running in the vLLM venv. `start` returns at once (vLLM loads for minutes while
    our own model loads); `wait_ready` blocks until the worker answered its setup."""

    def __init__(self, peer: Peer, conversations: list[list[dict[str, str]]], vllm_args: dict[str, Any]):
        self.peer, self.conversations, self.vllm_args = peer, conversations, vllm_args
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}

    def start(self) -> None:
        # this process's recaug first (PYTHONPATH is inherited): the worker runs the engine of this tree
        env = {**os.environ, **OFFLINE_ENV}
        # vLLM's CPU default ("auto") pins one OpenMP thread per core and keeps a core for its scheduler:
        # 1 compute thread on 2 cores. Unpinned, torch's default threads, as our engine runs
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        self.proc = subprocess.Popen([str(self.peer.python), str(Path(__file__).with_name("peer_vllm.py"))],
                                     cwd=str(REPO), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                                     text=True, env=env)
        self._send({"conversations": self.conversations, "vllm_args": self.vllm_args})
        self.started = time.perf_counter()

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _answer(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        code = self.proc.wait()
        raise RuntimeError(f"the vLLM worker ({self.peer.python}) exited with code {code} before answering "
                           "(its log is above on stderr)")

    def wait_ready(self) -> dict[str, Any]:
        self.info = self._answer()
        self.info["ready_after_s"] = round(time.perf_counter() - self.started, 1)
        return self.info

    def run(self, max_new_tokens: int) -> dict[str, Any]:
        self._send({"max_new_tokens": max_new_tokens})
        return self._answer()

    def close(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            if proc.stdin:
                proc.stdin.write("\n")
                proc.stdin.close()
            proc.wait(120)
        except (OSError, subprocess.TimeoutExpired):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- llama.cpp's OpenAI-compatible server, through our HTTP engine -----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` of the llama venv on 127.0.0.1, a free port, the packaged SmolLM2
    GGUF, `threads` threads for prompt and generation. llama-cpp-python's server holds one model context
    and answers one request at a time (the HTTP engine keeps a second queued so it never idles); its
    context reuses the KV of the longest prefix it shares with the previous prompt, and its log (verbose,
    the default) says how many tokens that was."""

    def __init__(self, peer: Peer, gguf: Path, threads: int):
        self.peer, self.gguf, self.threads = peer, gguf, threads
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"recaug-bench-llama-{port}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [str(self.peer.python), "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", str(LLAMA_CTX), "--n_threads", str(self.threads),
             "--n_threads_batch", str(self.threads), "--model_alias", "smollm2"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE_ENV})
        self.port, self.started = port, time.perf_counter()
        self.url = f"http://127.0.0.1:{port}/v1"

    def wait_ready(self, timeout: float = 300) -> float:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return round(time.perf_counter() - self.started, 1)
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.seek(0)
                    raise RuntimeError(f"the llama.cpp server did not start (log {self.log.name}): "
                                       f"{self.log.read()[-1500:]}") from None
                time.sleep(0.5)

    def log_size(self) -> int:
        self.log.flush()
        return os.path.getsize(self.log.name)

    def prefix_hits_since(self, offset: int) -> int:
        """Prompt tokens the server's context reused since `offset` of its log: llama-cpp-python logs
        "Llama.generate: N prefix-match hit, remaining M prompt tokens to eval" per request that reuses any."""
        with open(self.log.name, errors="replace") as fh:
            fh.seek(offset)
            return sum(int(m.group(1)) for m in re.finditer(r"Llama\.generate: (\d+) prefix-match hit", fh.read()))

    def close(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        self.log.close()
        os.unlink(self.log.name)


def http_engine(url: str, max_new_tokens: int):
    from recaug.core.config import EngineConfig
    from recaug.pipelines.engines.http_engine import HTTPEngine

    return HTTPEngine(EngineConfig(kind="http", model="smollm2", base_url=url, max_new_tokens=max_new_tokens,
                                   concurrency=2, timeout_s=600, http_retries=0, api_key_env=""))


def run_http(engine, server: LlamaServer, max_new_tokens: int) -> dict[str, Any]:
    from recaug.pipelines.engines.base import GenerationRequest

    requests = [GenerationRequest(f"p{i}", tuple(c), max_new_tokens) for i, c in enumerate(server.conversations)]
    offset = server.log_size()
    started = time.perf_counter()
    results = engine.generate(requests)
    wall = time.perf_counter() - started
    bad = [r.error for r in results if r.error]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(results)} requests to the llama.cpp server failed: {bad[0]}")
    if any(r.extra.get("usage_estimated") for r in results):
        raise RuntimeError("the llama.cpp server returned no token usage: its counts would be estimates")
    prompt = sum(r.input_tokens for r in results)
    return {"wall_s": wall, "prompt_tokens": prompt, "prompt_tokens_computed": prompt - server.prefix_hits_since(offset),
            "generated_tokens": sum(r.output_tokens for r in results), "texts": [r.text for r in results]}


def python_version_of(python: Path, module: str) -> str:
    """`module.__version__` in another venv, for the report ('?' when it cannot be read)."""
    try:
        out = subprocess.run([str(python), "-c", f"import {module}; print({module}.__version__)"], capture_output=True,
                             text=True, timeout=120)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"

