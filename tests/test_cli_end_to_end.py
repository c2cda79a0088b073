"""The CLI as cron and people call it: a bring-your-own dataset from CSV with renamed columns runs
every step with only a config file; exit codes say what went wrong. The engine is the deterministic
fake here, and so is the encoder (tests/fake_encoder.py); the real models run the same path in
test_resume_real.py and the runner parity tests."""

import json
import re

import polars as pl
import pytest

from recaug.pipelines import cli
from recaug.core.config import load_config
from recaug.core.locking import RunLock
from recaug.pipelines.snapshots import list_snapshots, snapshot_root
from shop_data import Shop

# not a test of encoding: every run here encodes with the hash encoder
pytestmark = pytest.mark.usefixtures("fake_encoder")


def write_shop(tmp_path, n_users=40, n_items=30, bad_rows=0):
    """A small shop in the user's own column names and formats (CSV, text timestamps, '|' genres)."""
    Shop(n_users=n_users, n_items=n_items, bad_rows=bad_rows).write(tmp_path)


def shop_config(write_config, **overrides):
    cfg = {
        "name": "shop",
        "dataset": Shop().dataset(domain="movies"),
        "engine": {"kind": "fake"},
        "runner": {"shard_size": 8},
        "augmenters": [{"name": "kar_user_preference"}, {"name": "kar_item_knowledge"}, {"name": "once_content_summary"}],
        "ctr": {"models": ["deepfm"], "seeds": [0], "epochs": 2, "patience": 1, "batch_size": 64},
    }
    for key, value in overrides.items():
        cfg[key] = value
    return write_config(cfg)


def test_bring_your_own_csv_runs_every_step(tmp_path, write_config, capsys):
    write_shop(tmp_path)
    path = shop_config(write_config)
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"interactions\s+480\s+480\s+0\s", out)
    assert cli.main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "published snapshot" in out
    cfg = load_config(path)
    snaps = list_snapshots(snapshot_root(cfg))
    assert len(snaps) == 1
    manifest = snaps[0].manifest
    assert manifest["input"]["counts"]["interactions"]["rows_ok"] == 480
    assert {"embeddings/kar_user_preference", "embeddings/kar_item_knowledge", "generated/kar_user_preference"} <= set(manifest["tables"])
    assert manifest["tables"]["embeddings/kar_user_preference"]["rows"] == 40
    assert manifest["model"]["id"] == "fake/echo" and manifest["templates"]["kar_item_knowledge"]

    import recaug

    feats = recaug.features.load(path)
    assert feats.height == 40 + 30 + 30 and feats.schema["vector"] == pl.Array(pl.Float32, 384)

    assert cli.main(["snapshots", "list", str(path)]) == 0
    assert "(latest)" in capsys.readouterr().out
    assert cli.main(["snapshots", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "model fake/echo" in shown and "output gate: passed" in shown

    # an unchanged re-run: zero LLM calls, a new snapshot with the same vectors
    assert cli.main(["run", str(path)]) == 0
    assert "0 LLM calls" in capsys.readouterr().out.replace(",", "")

    assert cli.main(["train", str(path), "--model", "deepfm"]) == 0
    out = capsys.readouterr().out
    assert "test (evaluated once): AUC" in out
    latest = list_snapshots(snapshot_root(cfg))[-1]
    assert latest.pinned  # the model's snapshot is kept by retention

    assert cli.main(["report", str(path), "--variants", "ac"]) == 0
    out = capsys.readouterr().out
    assert "| deepfm | (a) ids + attributes |" in out and "| deepfm | (c) + LLM knowledge (KAR) |" in out
    report_dir = cfg.workdir_path() / "reports" / latest.snapshot_id
    assert (report_dir / "report.png").stat().st_size > 1000
    assert json.loads((report_dir / "report.json").read_text())["results"]["deepfm"]["a"][0]["test_auc"] > 0


def test_exit_codes(tmp_path, write_config, capsys):
    write_shop(tmp_path, bad_rows=30)
    # config error -> 2, naming the key
    bad = write_config({"name": "x", "engine": {"kind": "gpt"}}, name="bad.yaml")
    assert cli.main(["validate", str(bad)]) == 2
    assert "engine.kind" in capsys.readouterr().err
    # 30 bad ratings of 510 interactions is over the 1% default -> 4, and the quarantine table is written
    path = shop_config(write_config)
    assert cli.main(["run", str(path)]) == 4
    err = capsys.readouterr().err
    assert "input gate stopped the run" in err and "rating" in err
    q = pl.read_parquet(load_config(path).workdir_path() / "quarantine" / "latest.parquet")
    assert q.height == 30 and q["reason"].str.contains("lots").all()
    # a required column mapped to a column the file lacks -> 3
    path = shop_config(write_config, input_gate={"max_quarantine_share": 0.1})
    data = json.loads(json.dumps(load_config(path).model_dump(mode="json", exclude={"source_path"})))
    data["dataset"]["items"]["columns"]["title"] = "product_name"
    missing = write_config(data, name="missing.yaml")
    assert cli.main(["run", str(missing)]) == 3
    assert "product_name" in capsys.readouterr().err
    # an output gate that cannot pass -> 5, and nothing is published
    strict = shop_config(write_config, input_gate={"max_quarantine_share": 0.1}, output_gate={"min_text_chars": 10_000})
    assert cli.main(["run", str(strict)]) == 5
    err = capsys.readouterr().err
    assert "nothing published" in err and "FAIL" in err
    assert not (load_config(strict).workdir_path() / "snapshots" / "LATEST").exists()
    # another run holds the lock -> 6
    ok = shop_config(write_config, input_gate={"max_quarantine_share": 0.1})
    with RunLock(load_config(ok).workdir_path() / "run.lock"):
        assert cli.main(["run", str(ok)]) == 6
    assert "another run is in progress" in capsys.readouterr().err
    # an unknown augmenter -> 2
    unknown = shop_config(write_config, input_gate={"max_quarantine_share": 0.1}, augmenters=[{"name": "kar_typo"}])
    assert cli.main(["run", str(unknown)]) == 2
    assert "kar_typo" in capsys.readouterr().err


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for verb in ("run", "preview", "validate", "snapshots", "train", "schedule", "report", "demo"):
        assert verb in out


def test_cli_model_names_match_the_zoo():
    from recaug.ctr_models.zoo import MODEL_NAMES

    assert tuple(cli.MODEL_NAMES) == tuple(MODEL_NAMES)


def test_schedule_over_two_weeks_runs_real_jobs(tmp_path, write_config, capsys):
    """cron every day at 06:00 for 15 days: weekly incremental long jobs within the budget, daily
    warm-started CTR retrains on the latest snapshot."""
    from recaug.pipelines.cli import parse_time
    from recaug.pipelines.scheduler import ScheduleState

    write_shop(tmp_path)
    path = shop_config(write_config, schedule={"long_max_entities": 10},
                       augmenters=[{"name": "kar_user_preference"}, {"name": "kar_item_knowledge"}])
    start = parse_time("1998-03-01T06:00")
    for day in range(15):
        assert cli.main(["schedule", "tick", str(path), "--now", str(start + day * 86_400)]) == 0
    capsys.readouterr()
    cfg = load_config(path)
    history = ScheduleState(cfg.workdir_path() / "schedule" / "state.json").data["history"]
    longs = [h for h in history if h["job"] == "long"]
    shorts = [h for h in history if h["job"] == "short"]
    assert [(h["now"] - start) // 86_400 for h in longs] == [0, 7, 14]
    assert len(shorts) == 15
    assert longs[0]["llm_requests"] == 40 + 30  # the first run is full
    assert all(h["llm_requests"] <= 10 for h in longs[1:])  # later runs: only changed users, within budget
    # no prompt context changed in the first week (no new rating fell into a prompt window): no LLM call;
    # by the second week new ratings moved some users' windows, and only those were refreshed
    assert longs[1]["llm_requests"] == 0 and longs[2]["llm_requests"] > 0
    # every retrain after the first was warm-started from the previous checkpoint
    import torch

    ckpt = torch.load(shorts[-1]["checkpoint"], weights_only=False)
    assert ckpt["lineage"]["warm_start_from"] == shorts[-2]["checkpoint"]
    snaps = list_snapshots(snapshot_root(cfg))
    assert len(snaps) == 3 and all(s.pinned for s in snaps)
