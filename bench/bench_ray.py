"""Ray Data runner overhead vs the local runner on this machine, same shards, the fake engine.

The fake engine answers in microseconds, so what is measured is the runner itself: shipping
shards to engine actors and results back. Requests are the KAR item prompts of a synthetic
catalogue, cut into shards exactly as the augmentation stage cuts them (`shard_requests`).

  session start   ray.init of a local session (2 CPUs), once per process
  execute         runner.execute over n rows; timed at two sizes in the warm session, so
                  execute(n) = fixed + n * per_row (fixed: actor pool start, dataset planning)

    .venv/bin/python bench/bench_ray.py [--rows 1024 16384] [--shard-size 32] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, log, result, standalone, synthetic_items, table  # noqa: E402

NAME = "ray"


def make_shards(rows: int, shard_size: int):
    import polars as pl

    import recaug.augmenters.kar  # noqa: F401  (registers the KAR augmenters)
    from recaug.augmenters.base import AugmentInputs, get_augmenter
    from recaug.pipelines.augment import build_pending, shard_requests
    from recaug.core.config import AugmenterConfig, EngineConfig
    from recaug.pipelines.engines.base import GenerationRequest
    from recaug.pipelines.engines.fake import FakeEngine

    items = synthetic_items(rows)
    empty_users = pl.DataFrame(schema={"user_id": pl.String, "age": pl.Int32, "gender": pl.String,
                                       "occupation": pl.String, "region": pl.String})
    empty_hist = pl.DataFrame(schema={"user_id": pl.String, "item_id": pl.String, "rating": pl.Float32,
                                      "timestamp": pl.Int64})
    inputs = AugmentInputs(users=empty_users, items=items, history=empty_hist, domain="movies",
                           count_tokens=lambda texts: [len(t.split()) for t in texts])
    aug = get_augmenter("kar_item_knowledge")
    pending, _, _ = build_pending(aug, AugmenterConfig(name=aug.name), inputs, FakeEngine(), EngineConfig(kind="fake"))
    return [[GenerationRequest(p.key, p.messages, p.max_new_tokens) for p in shard]
            for shard in shard_requests(pending, shard_size)]


def _execute(runner, shards) -> tuple[float, float, int]:
    got = []
    with Timer() as t:
        runner.execute(shards, lambda results, committed=False: got.append(len(results)))
    assert sum(got) == sum(len(s) for s in shards) and len(got) == len(shards)
    return t.wall, t.cpu, sum(got)


def run(quick: bool = False, rows: list[int] | None = None, shard_size: int = 32, repeats: int | None = None) -> dict:
    from recaug.core.config import EngineConfig, RunnerConfig
    from recaug.pipelines.engines.fake import FakeEngine
    from recaug.pipelines.runners.local import LocalRunner
    from recaug.pipelines.runners.ray_runner import RayRunner

    rows = rows or ([256, 2048] if quick else [1024, 16384])
    repeats = repeats or (1 if quick else 2)
    shards = {n: make_shards(n, shard_size) for n in rows}
    engine_cfg = EngineConfig(kind="fake")
    local = LocalRunner(FakeEngine(engine_cfg))
    ray_runner = RayRunner(RunnerConfig(kind="ray", shard_size=shard_size), FakeEngine(engine_cfg))
    with Timer() as t_start:
        ray_runner.start()
    log(f"Ray session start: {t_start.wall:.1f} s")
    import ray

    actors = None
    timings: dict[str, dict[int, list[float]]] = {"local": {n: [] for n in rows}, "ray": {n: [] for n in rows}}
    try:
        _execute(ray_runner, shards[rows[0]])  # first execute: worker processes import recaug once
        for r in range(repeats):
            for n in rows:
                for label, runner in (("local", local), ("ray", ray_runner)):
                    wall, _, _ = _execute(runner, shards[n])
                    timings[label][n].append(wall)
                    log(f"[{r + 1}/{repeats}] {label:<5} {n:>6,} rows in {len(shards[n]):>4} shards: {wall:7.3f} s")
        cluster = ray.cluster_resources()
        from recaug.pipelines.runners.ray_runner import pool_size

        actors = pool_size(ray_runner.cfg, ray_runner.resources, cluster, len(shards[rows[-1]]))
    finally:
        ray_runner.close()

    best = {label: {n: min(v) for n, v in by_n.items()} for label, by_n in timings.items()}
    n1, n2 = rows[0], rows[-1]

    def fit(label):
        per_row = (best[label][n2] - best[label][n1]) / (n2 - n1)
        return max(best[label][n1] - per_row * n1, 0.0), per_row

    fixed_local, per_row_local = fit("local")
    fixed_ray, per_row_ray = fit("ray")
    overhead_per_row = per_row_ray - per_row_local
    noisy = per_row_ray <= 0 or overhead_per_row <= 0
    t1 = table(
        f"Runner wall time, fake engine, shard size {shard_size} (best of {repeats}, warm Ray session, {actors} engine actors)",
        ["rows", "shards", "local s", "Ray s", "Ray / local"],
        [[n, len(shards[n]), best["local"][n], best["ray"][n], best["ray"][n] / best["local"][n]] for n in rows],
    )
    t2 = table(
        "Fitted cost: execute(n) = fixed + n x per-row",
        ["runner", "session start s", "fixed per execute s", "per row ms", "per shard ms"],
        [["local", 0.0, fixed_local, per_row_local * 1e3, per_row_local * shard_size * 1e3],
         ["Ray Data", t_start.wall, fixed_ray, per_row_ray * 1e3, per_row_ray * shard_size * 1e3]],
        notes=["fixed per execute (Ray) = starting the actor pool (each loads the engine) and planning the dataset; "
               "the local runner has none."]
        + (["The per-row slope is below this run's timing noise (a busy machine): read the wall times above."]
           if noisy else []),
    )
    summary = [
        f"Ray session start {t_start.wall:.1f} s once per process, then {fixed_ray:.2f} s fixed per execute "
        f"and {overhead_per_row * 1e3:.3f} ms extra per row ({overhead_per_row * shard_size * 1e3:.1f} ms per "
        f"{shard_size}-row shard) over the local runner",
        f"at {n2:,} rows Ray takes {best['ray'][n2] / best['local'][n2]:.1f}x the local runner's time with a free "
        f"engine; on this 2-core machine Ray only adds cost. A real model's ~{shard_size * 48 / 220:.0f} s per "
        f"shard (48 tokens x {shard_size} rows at ~220 tok/s) dwarfs the per-shard overhead; Ray pays off with "
        "several GPUs or nodes",
    ]
    data = {"rows": rows, "shard_size": shard_size, "session_start_s": t_start.wall, "timings": timings,
            "best": best, "fixed_s": {"local": fixed_local, "ray": fixed_ray},
            "per_row_s": {"local": per_row_local, "ray": per_row_ray}, "actors": actors}
    return result(NAME, "Ray Data runner vs local runner (fake engine)", [t1, t2], summary, data)


def _args(ap):
    ap.add_argument("--rows", type=int, nargs=2, default=None, help="two sizes to fit fixed + per-row cost")
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None)


def main(argv: list[str] | None = None) -> int:
    return standalone(run, argv, _args, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
