"""The vLLM peer of bench_generation.py, run by it inside the vLLM venv (`make peers` builds it): our
VLLMEngine on the packaged SmolLM2, kept loaded while the benchmark alternates between its paths.

Protocol (one JSON object per line): the first stdin line is the setup
`{"conversations": [[{role, content}, ...], ...], "vllm_args": {...}}`; the worker loads the engine and
answers `{"ready": true, "load_s", "recaug", "vllm"}`. Every further stdin line
`{"max_new_tokens": n}` runs all conversations once, greedy, with an empty prefix cache (each run
computes its shared prefix once, as our engine's runs do), and answers `{"wall_s", "prompt_tokens",
"prompt_tokens_computed", "generated_tokens", "texts"}`. Answers are the stdout lines that start
with MARK (vLLM may print on stdout too); an empty line or EOF ends the worker.
"""

from __future__ import annotations

import json
import sys
import time

MARK = "@@peer "


def answer(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def main() -> int:
    import recaug
    import vllm

    from recaug.core.config import EngineConfig
    from recaug.pipelines.engines.base import GenerationRequest
    from recaug.pipelines.engines.vllm_engine import VLLMEngine

    setup = json.loads(sys.stdin.readline())
    conversations = [tuple(c) for c in setup["conversations"]]
    engine = VLLMEngine(EngineConfig(kind="vllm", model="smollm2", vllm_args=setup.get("vllm_args") or {}))
    engine.load()
    # first-call overheads out of the timed runs, as the benchmark does for our engine
    engine.generate([GenerationRequest("warm", conversations[0], 4)])
    answer({"ready": True, "load_s": round(engine.load_seconds or 0.0, 1), "recaug": recaug.__file__,
            "vllm": getattr(vllm, "__version__", "?")})
    try:
        for line in sys.stdin:
            if not line.strip():
                break
            max_new = int(json.loads(line)["max_new_tokens"])
            requests = [GenerationRequest(f"p{i}", c, max_new) for i, c in enumerate(conversations)]
            engine._llm.reset_prefix_cache()
            started = time.perf_counter()
            results = engine.generate(requests)
            wall = time.perf_counter() - started
            bad = [r.error for r in results if r.error]
            if bad:
                raise RuntimeError(f"{len(bad)} of {len(results)} vLLM requests failed: {bad[0]}")
            answer({
                "wall_s": wall,
                "prompt_tokens": sum(r.input_tokens for r in results),
                "prompt_tokens_computed": sum(r.extra.get("prompt_tokens_computed", r.input_tokens) for r in results),
                "generated_tokens": sum(r.output_tokens for r in results),
                "texts": [r.text for r in results],
            })
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
