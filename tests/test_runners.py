"""Local, Ray Data and Beam runners: same shards in, same results out, every shard exactly once.

A deterministic, picklable engine defined here logs every batch it receives (from whichever process
runs it) so the tests see the exact batches the engine saw; the real packaged SmolLM2 runs the same
comparison in the slow test. One Ray session (with one logical GPU, so GPU requests can be checked
on a CPU machine) is shared by the whole module.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from recaug.augmenters.base import AugmentInputs, get_augmenter
from recaug.pipelines.augment import run_augmenter
from recaug.pipelines.cache import GenerationCache
from recaug.core.config import AugmenterConfig, EngineConfig, RunnerConfig
from recaug.pipelines.engines.base import FINISH_ERROR, FINISH_STOP, Engine, EngineError, GenerationRequest, GenerationResult
from recaug.pipelines.runners import RunnerError, make_runner
from recaug.pipelines.runners.local import LocalRunner
from recaug.schemas import GENERATED_TEXTS

ray = pytest.importorskip("ray")
pytest.importorskip("apache_beam")

from recaug.pipelines.runners.beam_runner import BeamRunner, uses_in_process_runner  # noqa: E402
from recaug.pipelines.runners.ray_runner import RayRunner, actor_resources, pool_size  # noqa: E402


class RecordingEngine(Engine):
    """Answers are a pure function of the prompt. Each generate() call appends the batch it got to
    a JSON-lines log; `error_marker` makes that request an error result, `raise_marker` makes the
    whole call raise (an engine that crashes on a shard)."""

    kind = "recording"

    def __init__(self, log_path: Path, answer: str = "echo", error_marker: str | None = None,
                 raise_marker: str | None = None, fatal: bool = False):
        self.log_path = str(log_path)
        self.fatal = fatal  # raise EngineError (nothing can work) instead of a one-shard crash
        self.answer = answer
        self.error_marker = error_marker
        self.raise_marker = raise_marker
        self.loaded = False

    @property
    def model_id(self):
        return "recording@1"

    def sampling_key(self):
        return {"temperature": 0.0}

    def load(self):
        self._log({"event": "load"})
        self.loaded = True

    def _log(self, record):
        record = {**record, "pid": os.getpid()}
        with open(self.log_path, "a", encoding="utf-8") as fh:  # one short line per write: appends stay whole
            fh.write(json.dumps(record) + "\n")

    def generate(self, requests):
        assert self.loaded, "generate() before load()"
        resources = None
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            context = sys.modules["ray"].get_runtime_context()
            if context.get_actor_id() is not None:  # inside a Ray actor
                resources = context.get_assigned_resources()
        self._log({"event": "generate", "keys": [r.key for r in requests], "resources": resources})
        if self.raise_marker and any(self.raise_marker in r.messages[-1]["content"] for r in requests):
            if self.fatal:
                raise EngineError("the server at http://127.0.0.1:9 cannot be reached")
            raise RuntimeError(f"engine crashed on a shard containing {self.raise_marker!r}")
        return [self._answer(r, len(requests)) for r in requests]

    def _answer(self, r: GenerationRequest, batch_size: int) -> GenerationResult:
        content = r.messages[-1]["content"]
        # engine-specific details ride in `extra`; every runner must hand them back unchanged
        extra = {"batch_size": batch_size, "prompt_chars": len(content), "note": "«ok»"}
        if self.error_marker and self.error_marker in content:
            return GenerationResult(r.key, "", 0, 0, FINISH_ERROR, 0.0, error="HTTP 503 after 4 retries",
                                    extra={**extra, "attempts": 5})
        if self.answer == "attributes":
            text = self._attributes(r)
        else:
            text = f"{len(content)}:{content[::-1][:24]}"
        # a latency float32 cannot hold exactly: a result that went through the cache would show it
        return GenerationResult(r.key, text, len(content.split()), len(text.split()), FINISH_STOP, 0.1 + len(content) / 1e6,
                                extra=extra)

    @staticmethod
    def _attributes(r: GenerationRequest) -> str:
        item = r.messages[-1]["content"] if len(r.messages) <= 2 else r.messages[1]["content"]
        if "Movie 3\"" in item or "Movie 3 " in item or "Movie 3\n" in item:
            return "I think the director is Steven"  # never valid -> dead letter after retries
        if len(r.messages) > 2:  # the retry turn fixes it
            return '{"director": "D", "country": "C", "language": "L"}'
        if "Movie 5" in item:
            return '{"director": "D", "country": "C"'  # missing language -> retried
        return json.dumps({"director": f"Director {len(item) % 7}", "country": "C", "language": "L"})


def engine_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def make_shards(sizes: list[int]) -> list[list[GenerationRequest]]:
    shards, n = [], 0
    for size in sizes:
        shard = []
        for _ in range(size):
            content = f"Describe item {n} " + "in detail " * (n % 5) + ("(unavailable)" if n == 6 else "")
            shard.append(GenerationRequest(f"key-{n:03d}", ({"role": "user", "content": content},), 16))
            n += 1
        shards.append(shard)
    return shards


def run_shards(runner, shards, sink):
    calls: list[tuple[list[GenerationResult], bool]] = []
    runner.execute(shards, lambda results, committed=False: calls.append((results, committed)), sink)
    return calls


def by_key(calls) -> dict[str, tuple]:
    return {r.key: (r.text, r.input_tokens, r.output_tokens, r.finish_reason, r.error) for rs, _ in calls for r in rs}


def results_by_key(calls) -> dict[str, GenerationResult]:
    """Whole results, `extra` and `latency_s` included (for engines whose latency is scripted)."""
    return {r.key: r for rs, _ in calls for r in rs}


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray session for the module: 2 CPUs and one *logical* GPU (nothing touches a GPU;
    it lets the tests see that GPU requests reach the actors)."""
    import ray.cloudpickle

    # the engine class lives in this test module, which Ray workers cannot import: ship it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    starter = RayRunner(RunnerConfig(kind="ray"), RecordingEngine(Path(os.devnull)), local_num_gpus=1)
    starter.start()
    yield
    starter.close()
    assert not ray.is_initialized()


def test_actor_resources_follow_the_config():
    assert actor_resources(RunnerConfig(kind="ray")) == {"num_cpus": 0.5, "num_gpus": 0.0}
    cfg = RunnerConfig(kind="ray", cpus_per_actor=0.25, gpus_per_actor=2)
    assert actor_resources(cfg) == {"num_cpus": 0.25, "num_gpus": 2.0}
    # a GPU engine with no GPU request gets one GPU per actor: the engine says so, not its kind
    from recaug.pipelines.engines import make_engine

    gpu_engine = make_engine(EngineConfig(kind="vllm")).resources()
    assert actor_resources(RunnerConfig(kind="ray"), gpu_engine)["num_gpus"] == 1.0
    assert actor_resources(RunnerConfig(kind="ray"), make_engine(EngineConfig(device="cuda:0")).resources())["num_gpus"] == 1.0
    assert actor_resources(RunnerConfig(kind="ray"), make_engine(EngineConfig()).resources())["num_gpus"] == 0.0
    # one actor per GPU by default, per CPU slot without GPUs, never more actors than shards
    one_gpu = actor_resources(RunnerConfig(kind="ray"), gpu_engine)
    assert pool_size(RunnerConfig(kind="ray"), one_gpu, {"CPU": 32, "GPU": 4}, num_shards=100) == 4
    cpu_only = actor_resources(RunnerConfig(kind="ray"))
    assert pool_size(RunnerConfig(kind="ray"), cpu_only, {"CPU": 2}, num_shards=100) == 2
    assert pool_size(RunnerConfig(kind="ray", num_actors=8), cpu_only, {"CPU": 2}, num_shards=3) == 3
    with pytest.raises(RunnerError, match="needs more GPUs"):
        pool_size(RunnerConfig(kind="ray", num_actors=3), one_gpu, {"CPU": 8, "GPU": 2}, num_shards=10)


def test_make_runner_picks_the_configured_runner():
    engine = RecordingEngine(Path(os.devnull))
    assert isinstance(make_runner(RunnerConfig(kind="local"), engine), LocalRunner)
    ray_runner = make_runner(RunnerConfig(kind="ray", gpus_per_actor=1), engine)
    assert ray_runner.kind == "ray" and ray_runner.resources == {"num_cpus": 0.5, "num_gpus": 1.0}
    beam = make_runner(RunnerConfig(kind="beam"), engine)
    assert beam.kind == "beam" and uses_in_process_runner(beam.options)


def test_beam_options_pass_through_verbatim():
    from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions

    opts = ["--runner=DataflowRunner", "--project=acme-recs", "--region=europe-west4",
            "--temp_location=gs://acme-recs/tmp", "--machine_type=g2-standard-8"]
    runner = BeamRunner(RunnerConfig(kind="beam", beam_options=opts), RecordingEngine(Path(os.devnull)))
    assert not uses_in_process_runner(runner.options)
    assert runner.options.view_as(StandardOptions).runner == "DataflowRunner"
    gcp = runner.options.view_as(GoogleCloudOptions)
    assert (gcp.project, gcp.region, gcp.temp_location) == ("acme-recs", "europe-west4", "gs://acme-recs/tmp")
    assert runner.options.get_all_options()["machine_type"] == "g2-standard-8"


def test_same_shards_give_the_same_results_exactly_once_on_every_runner(ray_session, tmp_path):
    shards = make_shards([4, 4, 3, 1, 4, 2])  # uneven on purpose: no runner may regroup them
    expected_batches = sorted(tuple(r.key for r in s) for s in shards)
    outcome = {}
    for kind in ("local", "ray", "beam"):
        log = tmp_path / f"{kind}.jsonl"
        engine = RecordingEngine(log, error_marker="(unavailable)")
        cfg = RunnerConfig(kind=kind, num_actors=2, gpus_per_actor=0.5)
        runner = make_runner(cfg, engine)
        cache = GenerationCache(tmp_path / f"cache-{kind}")
        calls = run_shards(runner, shards, cache.sink("test", engine.model_id))
        runner.close()

        # on_shard: once per shard, with exactly that shard's results in request order
        assert sorted(tuple(r.key for r in rs) for rs, _ in calls) == expected_batches, kind
        # the engine saw exactly the shards, never regrouped
        seen = [rec for rec in engine_log(log) if rec["event"] == "generate"]
        assert sorted(tuple(rec["keys"]) for rec in seen) == expected_batches, kind
        outcome[kind] = (calls, seen, engine_log(log), cache)

    reference = by_key(outcome["local"][0])
    assert reference["key-006"][3] == FINISH_ERROR and reference["key-006"][4] == "HTTP 503 after 4 retries"
    assert by_key(outcome["ray"][0]) == reference
    assert by_key(outcome["beam"][0]) == reference
    # whole results, extra and latency included, on the way back from the workers
    full = results_by_key(outcome["local"][0])
    assert full["key-006"].extra["attempts"] == 5 and full["key-000"].extra["batch_size"] == 4
    assert results_by_key(outcome["ray"][0]) == full
    assert results_by_key(outcome["beam"][0]) == full

    # who committed: Ray hands results to the driver (which commits), Beam workers commit themselves
    assert {c for _, c in outcome["local"][0]} == {False}
    assert {c for _, c in outcome["ray"][0]} == {False} and outcome["ray"][3].shards() == []
    assert {c for _, c in outcome["beam"][0]} == {True}
    beam_cache = outcome["beam"][3].lookup(reference)
    assert sorted(beam_cache["cache_key"].to_list()) == sorted(k for k, v in reference.items() if v[3] != FINISH_ERROR)

    # Ray: the engine ran in actors (not here) that got the configured fractional CPU and GPU share,
    # and each actor loaded the engine once
    ray_seen, ray_log = outcome["ray"][1], outcome["ray"][2]
    assert {rec["pid"] for rec in ray_seen}.isdisjoint({os.getpid()})
    assert all(rec["resources"] == {"CPU": 0.5, "GPU": 0.5} for rec in ray_seen)
    loads = [rec["pid"] for rec in ray_log if rec["event"] == "load"]
    assert len(loads) == len(set(loads)) <= 2


def test_ray_session_is_reused_and_left_running(ray_session, tmp_path):
    runner = RayRunner(RunnerConfig(kind="ray"), RecordingEngine(tmp_path / "log.jsonl"))
    runner.start()
    runner.close()
    assert ray.is_initialized()  # it was not ours to stop


def test_a_raising_engine_becomes_error_results_not_a_crash(ray_session, tmp_path):
    shards = make_shards([3, 3, 3])
    marker = "Describe item 4 "  # in the second shard only
    for kind in ("beam", "ray"):
        engine = RecordingEngine(tmp_path / f"{kind}.jsonl", raise_marker=marker)
        cache = GenerationCache(tmp_path / f"cache-{kind}")
        runner = make_runner(RunnerConfig(kind=kind, num_actors=1), engine)
        calls = run_shards(runner, shards, cache.sink("test", engine.model_id))
        assert sorted(tuple(r.key for r in rs) for rs, _ in calls) == sorted(tuple(r.key for r in s) for s in shards)
        failed = [(rs, c) for rs, c in calls if rs[0].key == shards[1][0].key]
        assert len(failed) == 1
        results, committed = failed[0]
        assert not committed and {r.finish_reason for r in results} == {FINISH_ERROR}
        assert all("engine crashed on a shard" in r.error for r in results), results[0].error
        good = [r for rs, _ in calls for r in rs if r.finish_reason != FINISH_ERROR]
        assert len(good) == 6
        if kind == "beam":  # dead letters are not cached (the next run retries them); the rest is
            stored = cache.lookup([r.key for s in shards for r in s])["cache_key"].to_list()
            assert sorted(stored) == sorted(r.key for r in good)


def test_an_engine_that_cannot_work_stops_the_run_on_every_runner(ray_session, tmp_path):
    """EngineError means nothing can work (e.g. the server is down): every runner stops the run with
    the engine's message, as the local runner does, instead of dead-lettering shard after shard."""
    shards = make_shards([3, 3, 3])
    for kind in ("local", "beam", "ray"):
        engine = RecordingEngine(tmp_path / f"{kind}.jsonl", raise_marker="Describe item 4 ", fatal=True)
        cache = GenerationCache(tmp_path / f"cache-{kind}")
        runner = make_runner(RunnerConfig(kind=kind, num_actors=1), engine)
        with pytest.raises(EngineError, match="cannot be reached"):
            run_shards(runner, shards, cache.sink("test", engine.model_id))


def test_beam_runs_in_process_without_any_download(tmp_path, monkeypatch):
    from apache_beam.runners.portability import prism_runner

    attempts = []
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        # loopback and unix sockets are local plumbing; anything else would be the network
        if sock.family == socket.AF_UNIX or str(address[0]) in ("127.0.0.1", "::1", "localhost"):
            return real_connect(sock, address)
        attempts.append(("connect", address))
        raise OSError(f"network disabled in this test: {address}")

    def no_urlopen(url, *args, **kwargs):
        attempts.append(("urlopen", getattr(url, "full_url", url)))
        raise OSError("network disabled in this test")

    def no_prism(self, *args, **kwargs):
        attempts.append(("prism", None))
        raise RuntimeError("the Prism runner must not be used")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(urllib.request, "urlopen", no_urlopen)
    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", no_prism)
    monkeypatch.setattr(prism_runner.PrismJobServer, "local_bin", no_prism)
    monkeypatch.setattr(prism_runner.PrismJobServer, "_download_to_local_path", no_prism)

    shards = make_shards([2, 2])
    engine = RecordingEngine(tmp_path / "beam.jsonl")
    cache = GenerationCache(tmp_path / "cache")
    calls = run_shards(BeamRunner(RunnerConfig(kind="beam"), engine), shards, cache.sink("test", engine.model_id))
    assert attempts == []
    assert len(calls) == 2 and all(c for _, c in calls)
    assert list((tmp_path / "cache" / "beam-runs").iterdir()) == []  # the driver removed its run folder


def test_beam_shard_lines_round_trip_any_prompt(tmp_path):
    from recaug.pipelines.runners.beam_runner import element_from_line, write_shards

    shard = [
        GenerationRequest("a", ({"role": "system", "content": "line one\nline two\r\n\u2028 «quoted» 映画"},
                                {"role": "user", "content": "{\"json\": [1, 2]}"}), 7,
                          {"type": "object", "properties": {"director": {"type": "string"}}}),
        GenerationRequest("b", ({"role": "user", "content": ""},), 1, None),
    ]
    handler = RecordingEngine(tmp_path / "unused.jsonl")
    write_shards(handler, [[], [], [], shard], str(tmp_path / "shards.txt"))
    lines = (tmp_path / "shards.txt").read_text(encoding="utf-8").split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # one shard = one line of the shards file
    assert element_from_line(lines[3], handler) == (3, shard)
    # and through the real pipeline: the engine gets the very same prompts as in-process
    local = run_shards(LocalRunner(RecordingEngine(tmp_path / "local.jsonl")), [shard], None)
    engine = RecordingEngine(tmp_path / "beam.jsonl")
    beam = run_shards(BeamRunner(RunnerConfig(kind="beam"), engine), [shard],
                      GenerationCache(tmp_path / "cache").sink("test", engine.model_id))
    assert results_by_key(beam) == results_by_key(local) and by_key(local)["a"][0].startswith("16:")


def test_beam_refuses_a_run_without_a_cache_sink(tmp_path):
    runner = BeamRunner(RunnerConfig(kind="beam"), RecordingEngine(tmp_path / "log.jsonl"))
    with pytest.raises(ValueError, match="needs the cache sink"):
        runner.execute(make_shards([1]), lambda results, committed=False: None, None)


@pytest.fixture
def inputs():
    items = pl.DataFrame(
        {"item_id": [f"i{n}" for n in range(12)], "title": [f"Movie {n}" for n in range(12)],
         "year": [1990 + n for n in range(12)], "genres": [["Comedy"], ["Drama"]] * 6, "description": [None] * 12},
        schema_overrides={"year": pl.Int32, "description": pl.String},
    )
    users = pl.DataFrame(
        {"user_id": [f"u{n}" for n in range(4)], "age": [30] * 4, "gender": ["M"] * 4, "occupation": ["x"] * 4,
         "region": [None] * 4},
        schema_overrides={"age": pl.Int32, "region": pl.String},
    )
    history = pl.DataFrame(
        {"user_id": [f"u{n % 4}" for n in range(20)], "item_id": [f"i{n % 12}" for n in range(20)],
         "rating": [4.0] * 20, "timestamp": list(range(20))}
    )
    return AugmentInputs(users=users, items=items, history=history, domain="movies",
                         count_tokens=lambda ts: [len(t.split()) for t in ts])


def comparable(table) -> pl.DataFrame:
    return pl.from_arrow(table).drop("created_at", "latency_s", strict=False).sort("entity_id", "cache_key")


def test_augmentation_stage_gives_identical_tables_on_every_runner(ray_session, tmp_path, inputs):
    """Parsing, a retry round and dead letters on top of the runners: the tables must not differ."""
    aug_cfg = AugmenterConfig(name="llmrec_item_attributes")
    engine_cfg = EngineConfig(kind="fake", parse_attempts=3)
    tables = {}
    for kind in ("local", "ray", "beam"):
        engine = RecordingEngine(tmp_path / f"{kind}.jsonl", answer="attributes")
        runner = make_runner(RunnerConfig(kind=kind, shard_size=4, num_actors=2), engine)
        cache = GenerationCache(tmp_path / f"cache-{kind}")
        out = run_augmenter(get_augmenter("llmrec_item_attributes"), aug_cfg, inputs, engine, engine_cfg, cache,
                            runner.execute, shard_size=4)
        runner.close()
        assert out.generated.schema.equals(GENERATED_TEXTS)
        assert out.stats.retries == 3 and out.stats.llm_requests == 15
        tables[kind] = out
        # every answer is in the cache once, whoever committed it: a re-run would cost no LLM call
        assert cache.lookup(pl.from_arrow(out.generated)["cache_key"].to_list()).height == out.generated.num_rows

    local = tables["local"]
    assert local.generated.num_rows == 11 and local.dead_letter.num_rows == 1
    for kind in ("ray", "beam"):
        assert comparable(tables[kind].generated).equals(comparable(local.generated)), kind
        assert comparable(tables[kind].dead_letter).equals(comparable(local.dead_letter)), kind

    # the caches are interchangeable: what Ray wrote, Beam reuses without a call, and so on
    for kind, cache_of in (("beam", "ray"), ("local", "beam")):
        engine = RecordingEngine(tmp_path / f"again-{kind}.jsonl", answer="attributes")
        runner = make_runner(RunnerConfig(kind=kind, shard_size=4), engine)
        again = run_augmenter(get_augmenter("llmrec_item_attributes"), aug_cfg, inputs, engine, engine_cfg,
                              GenerationCache(tmp_path / f"cache-{cache_of}"), runner.execute, shard_size=4)
        assert again.stats.llm_requests == 0 and not engine_log(tmp_path / f"again-{kind}.jsonl"), kind
        assert comparable(again.generated).equals(comparable(local.generated)), kind


PROMPTS = [
    "Name one famous movie director.",
    "What genre is The Matrix?",
    "Give one word that describes a comedy.",
    "Which country is Bollywood in?",
    "Say hello in French.",
    "What colour is the sky on a clear day?",
    "Name a movie about space travel.",
    "Is a documentary fiction or non-fiction?",
]


@pytest.mark.slow
def test_real_smollm2_gives_the_same_greedy_text_on_every_runner(ray_session, tmp_path):
    from recaug.pipelines.engines.transformers_engine import TransformersEngine

    engine_cfg = EngineConfig(kind="transformers", model="smollm2", max_new_tokens=16, batch_size=4, temperature=0.0)
    requests = [
        GenerationRequest(f"smol-{i}", ({"role": "user", "content": p},), 12) for i, p in enumerate(PROMPTS)
    ]
    shards = [requests[:4], requests[4:]]
    TransformersEngine(engine_cfg).model_dir  # convert the packaged GGUF once here, not in two actors at once
    outputs = {}
    for kind in ("local", "ray", "beam"):
        engine = TransformersEngine(engine_cfg)
        runner = make_runner(RunnerConfig(kind=kind, shard_size=4, num_actors=2), engine)
        cache = GenerationCache(tmp_path / f"cache-{kind}")
        calls = run_shards(runner, shards, cache.sink("test", engine.model_id))
        runner.close()
        assert sorted(tuple(r.key for r in rs) for rs, _ in calls) == sorted(tuple(r.key for r in s) for s in shards)
        outputs[kind] = by_key(calls)

    local = outputs["local"]
    assert len(local) == 8 and all(v[3] in ("stop", "length") and v[2] > 0 for v in local.values())
    assert sum(bool(v[0].strip()) for v in local.values()) == 8  # the model really wrote something
    assert outputs["ray"] == local
    assert outputs["beam"] == local


# --- the encode stage on every runner ----------------------------------------------------------------

ENCODE_TEXTS = [
    ("a quiet family drama about " + "winter " * (i % 9) + f"memory number {i}").strip() for i in range(21)
] + ["", "映画 «quoted»\nline two", "x"]


def test_worker_encoder_refuses_a_model_that_is_not_the_drivers():
    from recaug.encoders.text_encoder import TextEncoderHandler
    from recaug.core.config import EncoderConfig

    with pytest.raises(RunnerError, match="same encoder model files"):
        TextEncoderHandler(EncoderConfig(), "some-other-encoder|pooling=mean").load_model()


@pytest.mark.slow
def test_encode_stage_gives_the_same_vectors_on_every_runner(ray_session, tmp_path):
    """The packaged MiniLM behind each runner: same batches as in-process, vectors equal within
    float tolerance, and on Ray and Beam the model never runs in the driver."""
    import numpy as np

    from recaug.encoders.text_encoder import TextEncoder
    from recaug.core.config import EncoderConfig
    from recaug.pipelines.runners import encode_batches
    from recaug.encoders.text_encoder import TextEncoderHandler
    from recaug.core.batch_model import load_outcome
    from recaug.pipelines.runners.ray_runner import OUTCOME_SCHEMA, ShardWorker, shards_to_tables

    cfg = EncoderConfig(batch_size=4)  # 24 texts -> 6 batches, spread over 2 actors
    plan = encode_batches(ENCODE_TEXTS, TextEncoder(cfg, progress=False))
    assert sorted(p for positions, _ in plan for p in positions) == list(range(len(ENCODE_TEXTS)))
    assert [len(positions) for positions, _ in plan] == [4] * 6

    vectors = {}
    for kind in ("local", "ray", "beam"):
        encoder = TextEncoder(cfg, progress=False)
        runner = make_runner(RunnerConfig(kind=kind, num_actors=2), RecordingEngine(Path(os.devnull)))
        vectors[kind] = runner.encode(list(ENCODE_TEXTS), encoder, str(tmp_path / kind))
        runner.close()
        assert vectors[kind].shape == (len(ENCODE_TEXTS), 384) and vectors[kind].dtype == np.float32
        # Ray and Beam built their own encoders on the workers; the driver never loaded the model
        assert (encoder._model is None) == (kind != "local"), kind
    for kind in ("ray", "beam"):
        np.testing.assert_allclose(vectors[kind], vectors["local"], atol=1e-5, rtol=0, err_msg=kind)
    assert np.allclose(np.linalg.norm(vectors["local"], axis=1), 1.0, atol=1e-5)  # L2-normalised, as configured
    assert list((tmp_path / "beam" / "beam-runs").iterdir()) == []  # the driver removed its run folder

    # what a Ray worker actor returns for an encoder batch: plain Arrow bytes (never Ray's tensor type)
    # holding the batch's float32 vectors exactly
    handler = TextEncoderHandler(cfg, TextEncoder(cfg).encoder_id)
    out = ShardWorker(handler)(shards_to_tables(handler, [list(zip(*plan[0]))])[0])
    assert out.schema == OUTCOME_SCHEMA
    outcome = load_outcome(handler, out.column("outcome")[0].as_py())
    assert outcome.results.dtype == np.float32 and outcome.results.shape == (4, 384)
    np.testing.assert_allclose(outcome.results, vectors["local"][plan[0][0]], atol=1e-5, rtol=0)


# --- the whole long job on every runner --------------------------------------------------------------

VOLATILE = ("created_at", "latency_s")


@pytest.fixture(scope="module")
def ml100k_inputs():
    """MovieLens-100K through the input gate once; every runner's run reads the same prepared inputs."""
    from recaug.core.config import PipelineConfig
    from recaug.pipelines.inputs import prepare_inputs

    return prepare_inputs(PipelineConfig.model_validate({"name": "parity", "dataset": {"kind": "ml100k"}}))


def run_long_job_on(kind: str, base: dict, workdir: Path, prep):
    from recaug.core.config import PipelineConfig
    from recaug.pipelines.engines import make_engine
    from recaug.pipelines.long_job import run_long_job

    cfg = PipelineConfig.model_validate({**base, "workdir": str(workdir), "runner": {**base.get("runner", {}), "kind": kind}})
    engine = make_engine(cfg.engine)
    runner = make_runner(cfg.runner, engine)
    try:
        return run_long_job(cfg, prep, engine, runner, progress=False, log=lambda *a: None)
    finally:
        runner.close()


def published_tables(result) -> dict:
    import pyarrow.parquet as pq

    from recaug.pipelines.snapshots import resolve_snapshot

    info = resolve_snapshot(result.snapshot_path.parent, result.snapshot_id)
    return {name: pq.read_table(info.table_path(name)) for name in info.tables}


def assert_same_features(reference: dict, other: dict, label: str) -> None:
    """Same tables; texts, keys and every other column equal (timing aside); vectors within 1e-5."""
    import numpy as np

    from recaug.schemas.vectors import vectors_numpy

    assert sorted(other) == sorted(reference), label
    for name, ref in reference.items():
        got = other[name]
        assert got.num_rows == ref.num_rows, (label, name)
        if name.startswith("embeddings/"):
            assert got.column("entity_id").to_pylist() == ref.column("entity_id").to_pylist(), (label, name)
            assert got.column("text_hash").to_pylist() == ref.column("text_hash").to_pylist(), (label, name)
            np.testing.assert_allclose(vectors_numpy(got), vectors_numpy(ref), atol=1e-5, rtol=0, err_msg=f"{label} {name}")
            meta = lambda t: {k: v for k, v in t.schema.metadata.items() if k != b"recaug.snapshot"}  # noqa: E731
            assert meta(got) == meta(ref), (label, name)
        else:
            a = pl.from_arrow(ref).drop(VOLATILE, strict=False)
            b = pl.from_arrow(got).drop(VOLATILE, strict=False)
            assert b.equals(a), (label, name)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # four whole long jobs on MovieLens-100K
def test_long_job_publishes_the_same_snapshot_on_every_runner(ray_session, tmp_path, ml100k_inputs):
    """augment -> encode -> gate -> publish on local, Ray and Beam, each in a fresh workdir, with the
    deterministic engine: free-text augmenters, a JSON one that retries and dead-letters, the real
    encoder. Then the caches are interchangeable: Beam over Ray's workdir costs no LLM call and no
    encoding. (The packaged SmolLM2 runs the same comparison through the CLI in test_cli_runners.py.)"""
    from recaug.pipelines.snapshot_diff import diff_snapshots
    from recaug.pipelines.snapshots import resolve_snapshot

    base = {
        "name": "parity",
        "dataset": {"kind": "ml100k"},
        "engine": {"kind": "fake", "parse_attempts": 2},
        "runner": {"shard_size": 3, "num_actors": 1},  # Ray: one actor per pool (several actors: tests above)
        "encoder": {"batch_size": 4},
        "augmenters": [
            {"name": "kar_user_preference", "max_entities": 5},
            {"name": "kar_item_knowledge", "max_entities": 6},
            {"name": "llmrec_item_attributes", "max_entities": 3},  # the fake engine writes no JSON
        ],
        "output_gate": {"min_coverage": 0.0, "min_parse_rate": 0.0, "max_dead_letter_share": 1.0},
    }
    results, tables = {}, {}
    for kind in ("local", "ray", "beam"):
        results[kind] = run_long_job_on(kind, base, tmp_path / kind, ml100k_inputs)
        tables[kind] = published_tables(results[kind])
        assert results[kind].encoding["cache_misses"] == 11, kind  # every text encoded once, on this runner

    local = tables["local"]
    assert local["generated/kar_user_preference"].num_rows == 5 and local["embeddings/kar_item_knowledge"].num_rows == 6
    assert local["dead_letter/llmrec_item_attributes"].num_rows == 3 and local["generated/llmrec_item_attributes"].num_rows == 0
    for kind in ("ray", "beam"):
        assert_same_features(local, tables[kind], kind)
        manifest = resolve_snapshot(results[kind].snapshot_path.parent, results[kind].snapshot_id).manifest
        assert manifest["runner"] == kind
        diff = diff_snapshots(resolve_snapshot(tmp_path / "local" / "snapshots"), resolve_snapshot(tmp_path / kind / "snapshots"))
        assert diff.same, diff.summary()

    again = run_long_job_on("beam", base, tmp_path / "ray", ml100k_inputs)
    assert again.augmentation.report["totals"]["llm_requests"] == 0
    assert again.encoding["cache_misses"] == 0 and again.encoding["cache_hits"] == 11
    assert_same_features(local, published_tables(again), "beam after ray")
