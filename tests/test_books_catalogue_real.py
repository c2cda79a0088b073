"""A books catalogue as it comes, at a realistic size, through the real CLI with config options only.

The catalogue is built here, in code, with the traits of the public Book-Crossing export: ';'-separated,
latin-1 bytes, CRLF line ends, backslash-escaped quotes, no timestamps, rating 0 meaning "interacted,
not rated" next to explicit 1-10 ratings, author and publisher columns, user locations holding commas,
and most users without any rating. >= 500k interactions.

`recaug validate`, `recaug run` (the packaged SmolLM2, a few entities) and `recaug train` run as real
processes under /usr/bin/time -v; their wall time and peak RSS are printed (run with -s to see them).
What this side of the pipeline owns is asserted: nothing quarantined, the split gives every evaluated
user training rows, the prompts show ratings out of 10 and the author, no "Loading weights" bars in
a log, no date of 1970 in the summaries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from recaug.core.config import load_config
from recaug.pipelines.snapshots import list_snapshots, read_table, snapshot_root

pytestmark = pytest.mark.slow

N_USERS, N_ACTIVE, N_ITEMS, N_INTERACTIONS = 120_000, 30_000, 60_000, 520_000

AUTHORS = ["José Saramago", "Günter Grass", "Françoise Sagan", "Jørgen Moe", "Isabel Allende", "Stephen King",
           "Jane Austen", "Gabriel García Márquez", "Åsa Larsson", "Umberto Eco", "Agatha Christie", "Michel Houellebecq"]
PUBLISHERS = ["Éditions Gallimard", "Penguin Books", "Suhrkamp", "Edições Asa", "Ballantine Books", "Alfaguara", ""]
WORDS = ["Night", "Garden", "Café", "Señor", "River", "Kingdom", "Müller's", "Silence", "Ghost", "Winter", "Letters", "Island"]


def _field(col: str) -> pl.Expr:
    """A CSV field in Book-Crossing's dialect: quoted when it holds ';' or '"', quotes as \\"."""
    c = pl.col(col)
    quoted = pl.concat_str([pl.lit('"'), c.str.replace_all('"', '\\"', literal=True), pl.lit('"')])
    return pl.when(c.str.contains(";", literal=True) | c.str.contains('"', literal=True)).then(quoted).otherwise(c)


def _write(path: Path, df: pl.DataFrame) -> None:
    body = df.select(pl.concat_str([_field(c) for c in df.columns], separator=";").alias("l"))["l"].str.join("\r\n").item()
    path.write_bytes((";".join(df.columns) + "\r\n" + body + "\r\n").encode("latin-1"))


def build_catalogue(root: Path) -> dict[str, int]:
    rng = np.random.default_rng(11)
    isbn = pl.Series([f"{i:010d}" for i in rng.choice(10**9, N_ITEMS, replace=False)])
    w = np.array(WORDS)
    titles = [f"The {a} of the {b}" for a, b in zip(w[rng.integers(0, len(w), N_ITEMS)], w[rng.integers(0, len(w), N_ITEMS)])]
    for k in range(0, N_ITEMS, 97):  # quotes and separators inside titles
        titles[k] = f'The "{WORDS[k % len(WORDS)]}" diaries; part {k % 7}'
    books = pl.DataFrame({
        "ISBN": isbn,
        "Book-Title": titles,
        "Book-Author": np.array(AUTHORS)[rng.integers(0, len(AUTHORS), N_ITEMS)],
        "Year-Of-Publication": rng.integers(1950, 2005, N_ITEMS).astype(str),
        "Publisher": np.array(PUBLISHERS)[rng.integers(0, len(PUBLISHERS), N_ITEMS)],
        "Image-URL-S": [f"http://images.example/{i}.jpg" for i in isbn],
    })
    users = pl.DataFrame({
        "User-ID": np.arange(1, N_USERS + 1).astype(str),
        "Location": np.array(["porto, porto, portugal", "new york, new york, usa", "münchen, bayern, germany",
                              "lyon, rhône-alpes, france"])[rng.integers(0, 4, N_USERS)],
        "Age": np.where(rng.random(N_USERS) < 0.4, "NULL", rng.integers(12, 80, N_USERS).astype(str)),
    })
    # ratings: 30k active users (skewed activity), popular books more often; 0 = implicit (~62%)
    active = rng.choice(N_USERS, N_ACTIVE, replace=False) + 1
    weights = 1.0 / np.arange(1, N_ACTIVE + 1) ** 0.7
    u = active[rng.choice(N_ACTIVE, int(N_INTERACTIONS * 1.15), p=weights / weights.sum())]
    pop = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8
    i = rng.choice(N_ITEMS, len(u), p=pop / pop.sum())
    explicit = rng.integers(1, 11, len(u))
    rating = np.where(rng.random(len(u)) < 0.62, 0, explicit)
    ratings = (
        pl.DataFrame({"User-ID": u.astype(str), "ISBN": isbn.gather(i), "Book-Rating": rating.astype(str)})
        .unique(["User-ID", "ISBN"], keep="first", maintain_order=True)
        .head(N_INTERACTIONS)
    )
    assert ratings.height == N_INTERACTIONS
    _write(root / "BX-Books.csv", books)
    _write(root / "BX-Users.csv", users)
    _write(root / "BX-Book-Ratings.csv", ratings)
    return {"implicit": int((ratings["Book-Rating"] == "0").sum()), "users_with_ratings": ratings["User-ID"].n_unique()}


BX = {"csv_delimiter": ";", "encoding": "latin-1", "escape": "\\"}


def books_config(root: Path) -> Path:
    cfg = {
        "name": "bookcrossing",
        "workdir": str(root / "work"),
        "dataset": {
            "kind": "files",
            "domain": "books",
            "implicit_ratings": [0],
            "users": {"path": "BX-Users.csv", **BX, "columns": {"user_id": "User-ID", "age": "Age", "region": "Location"}},
            "items": {"path": "BX-Books.csv", **BX,
                      "columns": {"item_id": "ISBN", "title": "Book-Title", "year": "Year-Of-Publication"},
                      "attributes": {"author": "Book-Author", "publisher": "Publisher"}},
            "interactions": {"path": "BX-Book-Ratings.csv", **BX,
                             "columns": {"user_id": "User-ID", "item_id": "ISBN", "rating": "Book-Rating"}},
        },
        "input_gate": {"rating_min": 1, "rating_max": 10},
        "split": {"mode": "by_row_order", "click_threshold": 6},
        "engine": {"kind": "transformers", "model": "smollm2", "batch_size": 4, "max_new_tokens": 24},
        "runner": {"shard_size": 4},
        "augmenters": [
            {"name": "kar_user_preference", "max_entities": 12, "history_token_budget": 160, "max_new_tokens": 24},
            {"name": "kar_item_knowledge", "max_entities": 4, "max_new_tokens": 24},
        ],
        # a 135M model on 12 users: the gate floors are opened so the run proves the input side, not the model
        "output_gate": {"min_coverage": 0.0, "min_parse_rate": 0.0, "max_dead_letter_share": 1.0, "max_text_rejected_share": 1.0},
        "ctr": {"models": ["deepfm"], "seeds": [0], "epochs": 1, "patience": 0, "batch_size": 4096},
    }
    path = root / "bookcrossing.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def _timed(args: list[str], figures: dict, step: str) -> subprocess.CompletedProcess:
    """Run `recaug <args>` as a real process under /usr/bin/time -v; keep wall time and peak RSS."""
    timer = shutil.which("time") or "/usr/bin/time"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.run([timer, "-v", sys.executable, "-m", "recaug.pipelines.cli", *args],
                          capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - started
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    figures[step] = {"wall_s": round(wall, 1), "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None}
    return proc


def test_books_catalogue_as_it_comes(tmp_path):
    figures: dict[str, dict] = {}
    started = time.perf_counter()
    facts = build_catalogue(tmp_path)
    figures["build"] = {"wall_s": round(time.perf_counter() - started, 1)}
    cfg_path = books_config(tmp_path)

    proc = _timed(["validate", str(cfg_path)], figures, "validate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(rf"interactions\s+{N_INTERACTIONS:,}\s+{N_INTERACTIONS:,}\s+0\s", out), out
    assert re.search(rf"items\s+{N_ITEMS:,}\s+{N_ITEMS:,}\s+0\s", out), out
    assert f"implicit feedback: {facts['implicit']:,} interactions" in out
    assert "split.mode by_row_order" in out and "1970" not in out

    proc = _timed(["run", str(cfg_path)], figures, "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Loading weights" not in proc.stderr, proc.stderr[-2000:]
    assert "1970" not in proc.stdout

    cfg = load_config(cfg_path)
    root = snapshot_root(cfg)
    snap = list_snapshots(root)[-1]
    generated = pl.from_arrow(read_table(root, snap.snapshot_id, "generated/kar_user_preference"))
    prompts = [json.loads(p)[-1]["content"] for p in generated["prompt"].to_list()]  # the chat messages; the user turn
    dead = pl.from_arrow(read_table(root, snap.snapshot_id, "dead_letter/kar_user_preference"))
    prompts += [json.loads(p)[-1]["content"] for p in dead["prompt"].to_list() if p]
    with_history = [p for p in prompts if re.search(r"^- ", p, re.M)]
    # most users of this catalogue rated nothing: none of them is prompted, and the run says how many
    assert prompts and with_history == prompts, [p for p in prompts if p not in with_history]
    skipped = re.search(r"([\d,]+) users without prompt history not prompted", proc.stdout)
    assert skipped and int(skipped.group(1).replace(",", "")) > 0, proc.stdout[-2000:]
    for p in with_history:
        history = [line for line in p.splitlines() if line.startswith("- ")]
        assert all("/5" not in line for line in history), p
        rated = [line for line in history if ", rated " in line]
        assert all(re.search(r", rated (10|[1-9])/10$", line) for line in rated), p
        assert all("; author: " in line for line in history), p  # every book line names its author
    assert any(a in p for p in with_history for a in AUTHORS)
    items = pl.from_arrow(read_table(root, snap.snapshot_id, "generated/kar_item_knowledge"))
    item_prompts = [json.loads(p)[-1]["content"] for p in items["prompt"].to_list()]
    assert item_prompts and all(re.search(r"^Author: \S", p, re.M) for p in item_prompts), item_prompts

    proc = _timed(["train", str(cfg_path), "--model", "deepfm"], figures, "train")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test (evaluated once): AUC" in proc.stdout

    figures["facts"] = {"interactions": N_INTERACTIONS, "users": N_USERS, "users_with_ratings": facts["users_with_ratings"],
                        "items": N_ITEMS, "implicit": facts["implicit"],
                        "csv_mb": round(sum(f.stat().st_size for f in tmp_path.glob("*.csv")) / 2**20, 1)}
    print("\nbooks catalogue figures: " + json.dumps(figures))
