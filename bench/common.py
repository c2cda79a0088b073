"""Shared pieces of the benchmarks: the result shape, markdown tables, machine facts, a synthetic
catalogue, a fake encoder, and a child-process runner that reports peak RSS.

Every benchmark module has `run(quick=False, **options) -> dict` returning

    {"name": ..., "title": ..., "tables": [{"title", "columns", "rows", "notes"}],
     "summary": [one-line findings], "data": {raw figures for the JSON}}

and a `main()` that runs it alone, prints its tables and writes `bench/results/<name>.json`.
`bench/run_all.py` runs them all and writes one JSON and one markdown file per run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO = BENCH_DIR.parent

# offline and quiet, for this process and every child it starts
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GX_ANALYTICS_ENABLED": "False",
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_WAIT_POLICY": "PASSIVE",  # see transformers_engine: spinning threads starve on shared cores
}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


def log(message: str) -> None:
    """Progress line (stderr, so a piped table on stdout stays clean)."""
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], notes: Sequence[str] = ()) -> dict[str, Any]:
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows], "notes": list(notes)}


def result(name: str, title: str, tables: list[dict], summary: list[str], data: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "title": title, "tables": tables, "summary": summary,
            "data": {**data, "machine": machine(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        a = abs(value)
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.1f}"
        if a >= 1:
            return f"{value:.2f}"
        if a == 0:
            return "0"
        return f"{value:.3g}"
    return str(value)


def markdown_table(t: dict[str, Any]) -> str:
    cols = t["columns"]
    # text columns left, numbers right
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in t["rows"]) and t["rows"]
               for i in range(len(cols))]
    lines = [f"**{t['title']}**", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    for row in t["rows"]:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    for note in t.get("notes", []):
        lines.append("")
        lines.append(note)
    return "\n".join(lines)


def markdown(res: dict[str, Any]) -> str:
    parts = [f"## {res['title']}", ""]
    for t in res["tables"]:
        parts += [markdown_table(t), ""]
    if res["summary"]:
        parts += ["Findings:", ""] + [f"- {line}" for line in res["summary"]] + [""]
    return "\n".join(parts)


def save(res: dict[str, Any], path: Path | None = None) -> Path:
    path = path or RESULTS_DIR / f"{res['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return path


def standalone(run_fn, argv: list[str] | None, add_arguments=None, description: str = "") -> int:
    """The `main()` of a benchmark module: parse --quick (+ its own options), run, print, save."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    if add_arguments:
        add_arguments(ap)
    args = vars(ap.parse_args(argv))
    res = run_fn(**args)
    print(markdown(res))
    print(f"saved {save(res)}")
    return 0


# --- timing and memory --------------------------------------------------------------------------


class Timer:
    """Wall and CPU seconds of a block (CPU shows how much of the wall time was this process's work
    on a machine shared with other jobs)."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def peak_rss_mib() -> float:
    """Peak resident set size of this process's own memory so far (VmHWM). Not ru_maxrss: Linux
    carries that over an exec, so a child started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def current_anon_mib() -> float:
    """Resident anonymous memory (RssAnon: heap and allocator pages), without the page-cache pages of
    memory-mapped files that RSS also counts. Linux only: elsewhere there is no figure to report."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no RssAnon line: the heap cannot be measured on this system")


def run_child(script: Path, args: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run `python <script> <args>` in a fresh interpreter; its last stdout line is a JSON object
    (the child measures itself, e.g. its own ru_maxrss). Adds the wall time seen from here."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=str(REPO), stdout=subprocess.PIPE, stderr=None, text=True,
        timeout=timeout, env={**os.environ, **OFFLINE_ENV},
    )  # the child's stderr (its progress lines) goes straight through
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed with exit code {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{script.name} printed no JSON result:\n{proc.stdout[-2000:]}")
    out = json.loads(lines[-1])
    out["child_wall_s"] = wall
    return out


# --- a synthetic catalogue ------------------------------------------------------------------------

_ADJ = ("Quiet", "Last", "Golden", "Broken", "Silent", "Hidden", "Northern", "Little", "Electric", "Lost",
        "Crimson", "Endless", "Paper", "Midnight", "Wild", "Distant")
_NOUN = ("Harbour", "Garden", "Engine", "Summer", "Empire", "River", "Letters", "Station", "Mirror", "Orchard",
         "Frontier", "Lantern", "Carnival", "Archive", "Island", "Machine")
_GENRES = ("Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
           "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")


def synthetic_items(n: int, changed: Sequence[int] = (), seed: int = 0):
    """n items following the ITEMS contract, built columnar. Titles, years and genre lists vary per
    item; the items at positions `changed` get an edited title (a changed entity)."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    adj = np.array(_ADJ)[rng.integers(0, len(_ADJ), n)]
    noun = np.array(_NOUN)[rng.integers(0, len(_NOUN), n)]
    k = rng.integers(1, 4, n)
    g = rng.integers(0, len(_GENRES), (n, 3))
    frame = pl.DataFrame({
        "num": idx, "adj": adj, "noun": noun, "year": (1920 + idx % 100).astype(np.int32),
        "g": g, "k": k,
    }, schema_overrides={"g": pl.Array(pl.Int64, 3)})
    genres = pl.Series("genres", list(_GENRES))
    frame = frame.with_columns(
        pl.concat_str([pl.lit("i"), pl.col("num").cast(pl.String).str.zfill(7)]).alias("item_id"),
        pl.format("The {} {} {}", "adj", "noun", "num").alias("title"),
        pl.col("g").arr.to_list().list.head(pl.col("k")).list.eval(pl.element().replace_strict(
            list(range(len(_GENRES))), genres.to_list(), return_dtype=pl.String)).alias("genres"),
        pl.lit(None, dtype=pl.String).alias("description"),
    )
    if len(changed):
        mark = pl.Series(np.isin(idx, np.asarray(changed)))
        frame = frame.with_columns(
            pl.when(mark).then(pl.concat_str([pl.col("title"), pl.lit(" (restored edition)")]))
            .otherwise(pl.col("title")).alias("title")
        )
    return frame.select("item_id", "title", "year", "genres", "description")


def synthetic_world(n_items: int, n_users: int = 2000, per_user: int = 20, seed: int = 0, changed: Sequence[int] = ()):
    """(users, items, interactions) polars frames: n_items items, a small user base rating a few of them."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed + 1)
    items = synthetic_items(n_items, changed, seed)
    users = pl.DataFrame({
        "user_id": [f"u{u}" for u in range(n_users)],
        "age": rng.integers(16, 70, n_users).astype(np.int32),
        "gender": rng.choice(["F", "M"], n_users),
        "occupation": rng.choice(["student", "engineer", "artist", "doctor", "other"], n_users),
        "region": [None] * n_users,
    }, schema_overrides={"region": pl.String})
    u = np.repeat(np.arange(n_users), per_user)
    i = rng.integers(0, n_items, u.size)
    inter = pl.DataFrame({
        "user_id": [f"u{x}" for x in u],
        "item_id": items["item_id"].gather(i),
        "rating": rng.integers(1, 6, u.size).astype(np.float32),
        "timestamp": (1_600_000_000 + rng.integers(0, 10_000_000, u.size)).astype(np.int64),
    }).unique(["user_id", "item_id"], keep="first", maintain_order=True)
    return users, items, inter


def write_world(folder: Path, users, items, interactions) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in (("users", users), ("items", items), ("interactions", interactions)):
        path = folder / f"{name}.parquet"
        frame.write_parquet(path)
        paths[name] = str(path)
    return paths


def fake_pipeline_config(name: str, workdir: Path, world: dict[str, str], shard_size: int = 256,
                         augmenters: Sequence[str] = ("kar_item_knowledge",)) -> dict[str, Any]:
    """A pipeline config over the written world with the deterministic fake engine."""
    return {
        "name": name,
        "workdir": str(workdir),
        "dataset": {"kind": "files", "domain": "movies",
                    **{t: {"path": p} for t, p in world.items()}},
        "input_gate": {"rating_min": 1, "rating_max": 5},
        "engine": {"kind": "fake", "max_new_tokens": 48},
        "runner": {"kind": "local", "shard_size": shard_size},
        "augmenters": [{"name": a} for a in augmenters],
        "output_gate": {"min_coverage": 0.9},
    }


class HashEncoder:
    """A tiny deterministic stand-in for `TextEncoder` (same attributes the long job reads): each text
    becomes a unit vector of `dim` floats drawn from its blake2b digest. No model, no torch, so
    a benchmark can push a million texts through the encode stage and its cache in seconds."""

    model_id = "bench/hash-encoder"

    def __init__(self, cfg, progress=None, dim: int = 32):
        self.cfg = cfg
        self.dim = dim
        self.texts_encoded = 0

    @property
    def encoder_id(self) -> str:
        return f"{self.model_id}|dim={self.dim}"

    def encode(self, texts, batch_size=None, progress=None):
        import hashlib

        import numpy as np

        n_bytes = self.dim  # one byte per component
        digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=n_bytes).digest() for t in texts)
        vec = np.frombuffer(digests, dtype=np.uint8).reshape(len(texts), self.dim).astype(np.float32) - 127.5
        vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-6)
        self.texts_encoded += len(texts)
        return vec
