"""The vLLM engine's CPU defaults, without vLLM: `resolve_cpu_defaults` on given machine figures, the
/proc parsers, and `load()` against a stub `vllm` module that says its platform is the CPU.

The same defaults on a real vLLM: tests/test_engine_vllm.py (`make test-vllm`) starts the engine with them.
"""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from recaug.core.config import EngineConfig
from recaug.pipelines.engines.base import EngineError
from recaug.pipelines.engines.vllm_engine import (
    CPU_FREE_MEMORY_SHARE,
    GPU_MEMORY_UTILIZATION,
    CpuFacts,
    VLLMEngine,
    node_available,
    parse_meminfo,
    resolve_cpu_defaults,
)

GiB = 1 << 30
AVX2 = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512bw", "avx512_bf16"}  # the reference box: AMD EPYC, no AMX
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}


def facts(total_gib: float = 16, free_gib: float = 10, flags=AVX2) -> CpuFacts:
    return CpuFacts(int(total_gib * GiB), int(free_gib * GiB), frozenset(flags), "NUMA node 0")


# --- dtype ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [AVX2, AVX512_BF16], ids=["avx2", "avx512-bf16-without-amx"])
def test_a_cpu_without_amx_bf16_runs_float32(flags):
    got = resolve_cpu_defaults(None, {}, facts(flags=flags))
    assert got.args["dtype"] == "float32" and got.dtype.startswith("float32")


def test_a_cpu_with_amx_bf16_leaves_the_dtype_to_vllm():
    got = resolve_cpu_defaults(None, {}, facts(flags=AMX))
    assert "dtype" not in got.args and got.dtype.startswith("auto")


@pytest.mark.parametrize("dtype", ["bfloat16", "auto", "float16"])
def test_an_explicit_dtype_wins(dtype):
    got = resolve_cpu_defaults(None, {"dtype": dtype}, facts(flags=AVX2))
    assert "dtype" not in got.args  # vllm_args reach vLLM as they are
    assert got.dtype == f"{dtype} (engine.vllm_args.dtype)"


# --- memory -----------------------------------------------------------------------------------------


def test_unset_memory_reserves_a_share_of_the_free_ram_not_of_the_total():
    got = resolve_cpu_defaults(None, {}, facts(total_gib=13.09, free_gib=8.96))  # the node 0
    share = got.args["gpu_memory_utilization"]
    # vLLM's flag is a share of the node's total; the reservation is CPU_FREE_MEMORY_SHARE of what is free
    assert share == pytest.approx(CPU_FREE_MEMORY_SHARE * 8.96 / 13.09, abs=1e-3)
    assert share * 13.09 <= CPU_FREE_MEMORY_SHARE * 8.96  # rounded down, never above
    assert share < GPU_MEMORY_UTILIZATION
    assert "8.96 GiB free of 13.09 GiB (NUMA node 0)" in got.memory


def test_an_explicit_share_that_fits_wins():
    got = resolve_cpu_defaults(0.3, {}, facts(total_gib=16, free_gib=10))
    assert got.args == {"gpu_memory_utilization": 0.3, "dtype": "float32"}
    assert "engine.gpu_memory_utilization=0.3" in got.memory


def test_a_share_larger_than_the_free_memory_is_refused_naming_the_key_and_what_fits():
    with pytest.raises(ValueError) as err:
        resolve_cpu_defaults(0.85, {}, facts(total_gib=13.09, free_gib=8.96))
    msg = str(err.value)
    assert "engine.gpu_memory_utilization=0.85" in msg and "11.13 GiB" in msg and "8.96 GiB free" in msg
    assert "at most 0.68" in msg  # 8.96 / 13.09 = 0.684..., rounded down


def test_an_explicit_kv_cache_size_wins_and_is_checked():
    got = resolve_cpu_defaults(None, {"kv_cache_memory_bytes": GiB}, facts())
    assert "gpu_memory_utilization" not in got.args  # vLLM's CPU backend ignores it with an explicit KV size
    assert "KV cache 1.00 GiB (engine.vllm_args.kv_cache_memory_bytes)" in got.memory
    with pytest.raises(ValueError, match=r"engine.vllm_args.kv_cache_memory_bytes=12884901888 \(12.00 GiB\)"):
        resolve_cpu_defaults(None, {"kv_cache_memory_bytes": 12 * GiB}, facts(free_gib=10))
    for bad in ("1GiB", 0, -5, 1.5, True):
        with pytest.raises(ValueError, match=r"engine.vllm_args.kv_cache_memory_bytes=.* is not a size"):
            resolve_cpu_defaults(None, {"kv_cache_memory_bytes": bad}, facts())


def test_vllm_cpu_kvcache_space_is_honoured_checked_and_must_agree_with_the_config():
    got = resolve_cpu_defaults(None, {}, facts(), kv_space_env="2")
    assert "gpu_memory_utilization" not in got.args and "KV cache 2 GiB from VLLM_CPU_KVCACHE_SPACE" in got.memory
    assert resolve_cpu_defaults(None, {}, facts(), kv_space_env="").args["gpu_memory_utilization"] > 0  # empty: unset
    with pytest.raises(ValueError, match=r"VLLM_CPU_KVCACHE_SPACE='2.5' is not a KV-cache size"):
        resolve_cpu_defaults(None, {}, facts(), kv_space_env="2.5")
    with pytest.raises(ValueError, match=r"VLLM_CPU_KVCACHE_SPACE=40 asks for a 40 GiB KV cache but only 10.00 GiB"):
        resolve_cpu_defaults(None, {}, facts(), kv_space_env="40")
    with pytest.raises(ValueError, match=r"VLLM_CPU_KVCACHE_SPACE=2 and engine.vllm_args.kv_cache_memory_bytes=1073741824 "
                                         r"disagree"):
        resolve_cpu_defaults(None, {"kv_cache_memory_bytes": GiB}, facts(), kv_space_env="2")
    assert resolve_cpu_defaults(None, {"kv_cache_memory_bytes": 2 * GiB}, facts(), kv_space_env="2").memory


def test_too_little_free_memory_for_the_automatic_reservation_is_a_clear_error():
    with pytest.raises(ValueError, match=r"too little free memory for vLLM's CPU backend: 3.00 GiB free of 16.00 GiB.*"
                                         r"engine.gpu_memory_utilization or engine.vllm_args.kv_cache_memory_bytes"):
        resolve_cpu_defaults(None, {}, facts(free_gib=3))
    # an explicit value is the user's call: 1.5 GiB of 16 fits in the 3 GiB free
    assert resolve_cpu_defaults(1.5 / 16, {}, facts(free_gib=3)).args["gpu_memory_utilization"] == 1.5 / 16


# --- reading the machine ------------------------------------------------------------------------------


def test_meminfo_parsers_read_proc_and_numa_node_files():
    node = parse_meminfo(
        "Node 0 MemTotal:       14247656 kB\nNode 0 MemFree:         4008044 kB\n"
        "Node 0 Active(file):    1630968 kB\nNode 0 Inactive(file):  4622888 kB\nNode 0 SReclaimable:     376652 kB\n"
        "Node 0 HugePages_Total:     0\n"
    )
    assert node["MemTotal"] == 14247656 * 1024 and node["HugePages_Total"] == 0
    assert node_available(node) == (4008044 + 1630968 + 4622888 + 376652) * 1024  # as vLLM's CPU worker counts
    proc = parse_meminfo("MemTotal:       24683568 kB\nMemAvailable:   24055984 kB\n")
    assert proc == {"MemTotal": 24683568 * 1024, "MemAvailable": 24055984 * 1024}


# --- the engine: which arguments reach vllm.LLM, and what load() says ---------------------------------------


class StubLLM:
    instances: list[StubLLM] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.shut_down = 0
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))
        StubLLM.instances.append(self)

    def _shutdown(self):
        self.shut_down += 1

    def get_tokenizer(self):
        return SimpleNamespace(eos_token_id=2)


def stub_vllm(monkeypatch, on_cpu: bool) -> None:
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = StubLLM, dict
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = dict
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(is_cpu=lambda: on_cpu)
    for name, module in (("vllm", vllm), ("vllm.sampling_params", sampling), ("vllm.platforms", platforms)):
        monkeypatch.setitem(sys.modules, name, module)
    StubLLM.instances.clear()


def model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return str(tmp_path)


def cpu_engine(monkeypatch, tmp_path, machine: CpuFacts, **cfg) -> VLLMEngine:
    stub_vllm(monkeypatch, on_cpu=True)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr("recaug.pipelines.engines.vllm_engine.read_cpu_facts", lambda: machine)
    return VLLMEngine(EngineConfig(kind="vllm", model=model_folder(tmp_path), **cfg))


def test_load_on_the_cpu_backend_starts_vllm_with_the_cpu_defaults_and_says_so(tmp_path, monkeypatch, capsys):
    engine = cpu_engine(monkeypatch, tmp_path, facts(total_gib=16, free_gib=10))
    engine.load()
    [llm] = StubLLM.instances
    assert llm.kwargs["dtype"] == "float32" and llm.kwargs["gpu_memory_utilization"] == 0.312  # 5 GiB of 16
    assert llm.kwargs["enable_prefix_caching"] is True
    err = capsys.readouterr().err
    assert "loading vLLM engine (" in err and "CPU backend, dtype float32 (the CPU has no AMX-BF16)" in err
    assert "4.99 GiB reserved (50% of the free memory" in err and "vLLM engine loaded in " in err
    assert engine.load_seconds is not None and engine.load_seconds >= 0


def test_load_on_the_cpu_backend_lets_explicit_vllm_args_win(tmp_path, monkeypatch):
    args = {"dtype": "bfloat16", "kv_cache_memory_bytes": GiB, "enforce_eager": True}
    cpu_engine(monkeypatch, tmp_path, facts(), vllm_args=args).load()
    [llm] = StubLLM.instances
    assert {k: llm.kwargs[k] for k in args} == args and "gpu_memory_utilization" not in llm.kwargs


def test_load_refuses_a_value_that_cannot_work_before_vllm_starts(tmp_path, monkeypatch):
    engine = cpu_engine(monkeypatch, tmp_path, facts(total_gib=13.09, free_gib=8.96), gpu_memory_utilization=0.85)
    with pytest.raises(EngineError, match=r"vLLM CPU backend: engine.gpu_memory_utilization=0.85 reserves"):
        engine.load()
    assert StubLLM.instances == []  # vLLM was never started
    engine = cpu_engine(monkeypatch, tmp_path, facts(free_gib=10))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "64")  # read from the environment at load
    with pytest.raises(EngineError, match=r"VLLM_CPU_KVCACHE_SPACE=64 asks for a 64 GiB KV cache"):
        engine.load()
    assert StubLLM.instances == []


def test_a_gpu_keeps_its_defaults(tmp_path, monkeypatch):
    stub_vllm(monkeypatch, on_cpu=False)
    monkeypatch.setattr("recaug.pipelines.engines.vllm_engine.read_cpu_facts", lambda: pytest.fail("read on a GPU"))
    VLLMEngine(EngineConfig(kind="vllm", model=model_folder(tmp_path))).load()
    VLLMEngine(EngineConfig(kind="vllm", model=model_folder(tmp_path), gpu_memory_utilization=0.95)).load()
    auto, explicit = StubLLM.instances
    assert auto.kwargs["gpu_memory_utilization"] == GPU_MEMORY_UTILIZATION == 0.85 and "dtype" not in auto.kwargs
    assert explicit.kwargs["gpu_memory_utilization"] == 0.95


def test_an_engine_nobody_closed_stops_vllm_at_exit(tmp_path, monkeypatch):
    """`recaug run` never closed its engine: at exit multiprocessing waited for vLLM's engine-core
    process, which was never told to stop, and the finished run hung."""
    registered = []  # the engine module's atexit, not the interpreter's: nothing else registers here
    monkeypatch.setattr("recaug.pipelines.engines.vllm_engine.atexit",
                        SimpleNamespace(register=registered.append, unregister=registered.remove))
    engine = cpu_engine(monkeypatch, tmp_path, facts())
    engine.load()
    [llm] = StubLLM.instances
    [at_exit] = registered
    at_exit()  # what the interpreter runs at exit
    assert llm.shut_down == 1 and registered == []  # closed once; close() took the handler back
    engine.close()
    assert llm.shut_down == 1


def test_the_config_leaves_the_share_to_the_engine_unless_set():
    assert EngineConfig(kind="vllm").gpu_memory_utilization is None
    assert EngineConfig(kind="vllm", gpu_memory_utilization=0.4).gpu_memory_utilization == 0.4
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(kind="vllm", gpu_memory_utilization=1.5)


def test_the_run_report_shows_the_engine_load_time():
    from recaug.pipelines.long_job import report_markdown

    stats = {"entities": 1, "cache_hits": 0, "llm_requests": 1, "input_tokens": 5, "output_tokens": 2,
             "tokens_per_s": 1.0, "parse_rate": 1.0, "dead_letter": 0, "truncated": 0}
    report = {"run_id": "r", "pipeline": "p", "model": "m", "engine": "vllm", "runner": "local",
              "wall_seconds": 672.3, "engine_load_seconds": 613.06, "augmenters": {"a": stats}, "totals": stats}
    assert "· 672.3 s (engine load 613.1 s)" in report_markdown(report)
    assert "engine load" not in report_markdown({**report, "engine_load_seconds": None})
