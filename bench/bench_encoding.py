"""Our TextEncoder vs a plain SentenceTransformer.encode on the same texts, side by side in one run.

Texts are built from MovieLens-100K (the packaged recbole copy): short item lines
("Title (year): genres") and user profiles listing a varying number of rated titles, so lengths
range from a few tokens to the 256-token cap. Both encoders get the same batch size and the same
threads; runs alternate (ours, theirs, ours, theirs ...) and the best run of each is compared
(on a shared machine other work only ever slows a run down; every run is kept in the JSON). A third row
shows a re-encode through the encoding cache (every text a hit).

    .venv/bin/python bench/bench_encoding.py [--texts 1000] [--batch-size 64] [--repeats 2] [--quick]
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, result, standalone, table  # noqa: E402  (also sets the offline environment)

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from recaug.encoders import EncodingCache, TextEncoder  # noqa: E402
from recaug.core.config import EncoderConfig  # noqa: E402
from recaug.core.packaged import minilm_dir, ml100k_dir  # noqa: E402

NAME = "encoding"


def _read_atomic(ext: str) -> pl.DataFrame:
    # recbole atomic file: tab-separated, header "name:type"
    df = pl.read_csv(ml100k_dir() / f"ml-100k.{ext}", separator="\t", infer_schema=False, quote_char=None)
    return df.rename({c: c.split(":", 1)[0] for c in df.columns})


def ml100k_texts(n: int, seed: int = 0) -> list[str]:
    items = _read_atomic("item").rename({"movie_title": "title", "release_year": "year", "class": "genres"})
    users = _read_atomic("user")
    inter = _read_atomic("inter").join(items.select("item_id", "title"), on="item_id")
    item_texts = items.select(
        pl.format("{} ({}): {}", pl.col("title"), pl.col("year").fill_null("?"), pl.col("genres").fill_null("unknown"))
    ).to_series().to_list()
    rng = np.random.default_rng(seed)
    # a user profile lists between 3 and 60 rated titles: from a line to past the 256-token cap
    history = inter.sort("timestamp").group_by("user_id", maintain_order=True).agg(pl.col("title"), pl.col("rating"))
    lengths = rng.integers(3, 61, size=history.height)
    history = history.with_columns(pl.Series("k", lengths))
    user_rows = history.join(users, on="user_id").select(
        pl.format(
            "User aged {}, {}, works as {}. Rated: {}",
            pl.col("age"), pl.col("gender"), pl.col("occupation"),
            pl.concat_str(
                [pl.col("title").list.head(pl.col("k")).list.join("; "), pl.lit(" — ratings "),
                 pl.col("rating").list.head(pl.col("k")).cast(pl.List(pl.String)).list.join(",")]
            ),
        )
    ).to_series().to_list()
    pool = item_texts + user_rows
    pick = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i] for i in pick]


def timed(fn) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def run(quick: bool = False, texts: int | None = None, batch_size: int = 64, repeats: int | None = None) -> dict:
    import argparse

    import torch
    from sentence_transformers import SentenceTransformer

    args = argparse.Namespace(texts=texts or (300 if quick else 1000), batch_size=batch_size,
                              repeats=repeats or (1 if quick else 2))
    load_before = round(os.getloadavg()[0], 2)
    texts = ml100k_texts(args.texts)
    ours = TextEncoder(EncoderConfig(batch_size=args.batch_size), progress=False)
    theirs = SentenceTransformer(str(minilm_dir()), device="cpu")
    token_counts = [len(x) for x in ours.tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    log(f"{len(texts)} ML-100K texts, tokens per text: min {min(token_counts)}, median {int(np.median(token_counts))}, "
          f"max {max(token_counts)} (cap 256); batch size {args.batch_size}; torch threads {torch.get_num_threads()}")

    # warm-up both (first call pays for lazy initialisation)
    ours.encode(texts[:64])
    theirs.encode(texts[:64], batch_size=args.batch_size)

    ours_s, theirs_s = [], []
    for r in range(args.repeats):
        s, ours_vec = timed(lambda: ours.encode(texts))
        ours_s.append(s)
        s, theirs_vec = timed(lambda: theirs.encode(texts, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False))
        theirs_s.append(s)
        log(f"[{r + 1}/{args.repeats}] ours {len(texts) / ours_s[-1]:7.1f} texts/s, "
            f"sentence-transformers {len(texts) / theirs_s[-1]:7.1f} texts/s")
    max_diff = float(np.abs(ours_vec - theirs_vec).max())

    with tempfile.TemporaryDirectory() as tmp:
        EncodingCache(Path(tmp), ours.encoder_id, ours.dim).get_or_encode(texts, ours.encode)  # fill
        cache = EncodingCache(Path(tmp), ours.encoder_id, ours.dim)
        cached_s, _ = timed(lambda: cache.get_or_encode(texts, ours.encode))
        assert cache.misses == 0

    ours_best, theirs_best = min(ours_s), min(theirs_s)
    rows = [
        ("recaug TextEncoder.encode", ours_best, len(texts) / ours_best),
        ("SentenceTransformer.encode", theirs_best, len(texts) / theirs_best),
        ("recaug re-encode via cache (all hits)", cached_s, len(texts) / cached_s),
    ]
    ratio = theirs_best / ours_best
    out = {
        "texts": len(texts),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "tokens": {"min": int(min(token_counts)), "median": float(np.median(token_counts)), "max": int(max(token_counts))},
        "torch_threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "ours_seconds": ours_s,
        "sentence_transformers_seconds": theirs_s,
        "ours_texts_per_s": len(texts) / ours_best,
        "sentence_transformers_texts_per_s": len(texts) / theirs_best,
        "compared": "best run of each",
        "load_average_before": load_before,
        "throughput_ratio_ours_over_st": ratio,
        "cached_reencode_seconds": cached_s,
        "cached_texts_per_s": len(texts) / cached_s,
        "max_abs_vector_difference": max_diff,
    }
    t1 = table(
        f"Encoding {len(texts):,} ML-100K texts with all-MiniLM-L6-v2 (batch {args.batch_size}, "
        f"{torch.get_num_threads()} torch threads, best of {args.repeats})",
        ["path", "seconds", "texts/s", "vs SentenceTransformer"],
        [[name, s, rate, rate / (len(texts) / theirs_best)] for name, s, rate in rows],
        notes=[f"tokens per text: min {min(token_counts)}, median {int(np.median(token_counts))}, max {max(token_counts)} "
               f"(cap 256); max |difference| of the vectors {max_diff:.2e}; medians: ours "
               f"{statistics.median(ours_s):.2f} s, sentence-transformers {statistics.median(theirs_s):.2f} s"],
    )
    summary = [
        f"our TextEncoder: {ratio:.2f}x SentenceTransformer.encode's throughput on the same texts "
        f"(vectors equal to {max_diff:.0e}); a re-encode through the cache is {ours_best / cached_s:.0f}x a fresh encode",
    ]
    return result(NAME, "Encoding: our TextEncoder vs SentenceTransformer.encode", [t1], summary, out)


def _args(ap):
    ap.add_argument("--texts", type=int, default=None, help="default 1000 (--quick 300)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="default 2 (--quick 1)")


def main(argv: list[str] | None = None) -> int:
    return standalone(run, argv, _args, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
