"""Issue 14 points 8 and 10: the schedule reads what manual runs and trainings recorded, and
`recaug train` / `recaug report` say what share of the samples carry LLM vectors; the report splits
test AUC by segment (cold vs warm users and items, with and without a vector)."""

import json

import pyarrow as pa
import pytest

from recaug.pipelines.experiment import vector_coverage
from recaug.pipelines import cli
from recaug.core.config import load_config, parse_config
from recaug.pipelines.scheduler import LONG, SHORT, ScheduleState, decide, fingerprint, record_manual
from tests.test_cli_end_to_end import shop_config, write_shop

T0 = 880_000_000


@pytest.fixture
def cfg(tmp_path):
    return parse_config({"name": "sched", "workdir": str(tmp_path / "w"), "augmenters": [{"name": "kar_item_knowledge"}]})


def test_a_manual_run_and_training_count_as_the_last_jobs(cfg):
    state = ScheduleState(cfg.workdir_path() / "schedule" / "state.json")
    before = {d.job: d for d in decide(cfg, state, T0, has_snapshot=True)}
    assert "no long job has succeeded yet" in before[LONG].reason and "no CTR model trained yet" in before[SHORT].reason
    record_manual(cfg, LONG, T0, snapshot="s1")
    record_manual(cfg, SHORT, T0 + 10, checkpoint="/m/ckpt.pt")
    after = {d.job: d for d in decide(cfg, state, T0 + 60, has_snapshot=True)}
    assert not after[LONG].due and "manual `recaug run`" in after[LONG].reason
    assert not after[SHORT].due and "manual `recaug train`" in after[SHORT].reason
    # cadence still applies from the manual run; a template change after it still forces a refresh
    later = {d.job: d for d in decide(cfg, state, T0 + cfg.schedule.long_every_s + 1, has_snapshot=True)}
    assert later[LONG].due and not later[LONG].full_refresh
    # a newer schedule success wins over an older manual record
    state.job(LONG).update(status="ok", last_success=T0 + 100, last_start=T0 + 90, fingerprint=fingerprint(cfg))
    assert "manual" not in {d.job: d for d in decide(cfg, state, T0 + 200, True)}[LONG].reason


def test_vector_coverage_counts_samples_per_split():
    samples = pa.table({"user_id": ["u1", "u1", "u2", "u3"], "item_id": ["i1", "i2", "i1", "i3"],
                        "split": ["train", "train", "valid", "test"]})
    vectors = {"user:kar_user_preference": pa.table({"entity_id": ["u1"]}),
               "item:kar_item_knowledge": pa.table({"entity_id": ["i1"]})}
    cov = vector_coverage(samples, vectors)
    assert cov["train"] == {"samples": 2, "user": 2, "item": 1, "either": 2, "both": 1, "user_share": 1.0,
                            "item_share": 0.5, "either_share": 1.0, "both_share": 0.5}
    assert cov["valid"]["item"] == 1 and cov["valid"]["user"] == 0 and cov["test"]["either"] == 0


def test_manual_run_train_report_then_tick(tmp_path, write_config, capsys):
    """The real CLI on the shop catalogue (fake engine): run, train, report, then a dry-run tick."""
    write_shop(tmp_path)
    path = shop_config(write_config, augmenters=[{"name": "kar_user_preference", "max_entities": 20},
                                                 {"name": "kar_item_knowledge"}],
                       output_gate={"min_coverage": 0.3})
    assert cli.main(["run", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["train", str(path), "--model", "deepfm"]) == 0
    out = capsys.readouterr().out
    assert "LLM-vector coverage of the samples" in out
    train_line = next(line for line in out.splitlines() if line.startswith("  train "))
    assert "user vector" in train_line and "item vector" in train_line and "(100.0%)" in train_line  # every item

    assert cli.main(["schedule", "tick", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "no long job has succeeded yet" not in out and "no CTR model trained yet" not in out
    assert "manual `recaug run`" in out and "manual `recaug train`" in out

    assert cli.main(["report", str(path), "--variants", "ac"]) == 0
    out = capsys.readouterr().out
    assert "LLM-vector coverage of the samples" in out and "| split | samples | user vector |" in out
    assert "Test AUC by segment" in out and "cold users" in out and "items with LLM vector" in out
    cfg = load_config(path)
    report_json = next((cfg.workdir_path() / "reports").rglob("report.json"))
    report = json.loads(report_json.read_text())
    assert report["coverage"]["test"]["samples"] > 0
    seg = report["results"]["deepfm"]["c"][0]["segments"]
    assert seg["warm users"]["samples"] + seg["cold users"]["samples"] == report["coverage"]["test"]["samples"]
    # segment LogLoss is the same mean as the overall one: warm and cold users together give it back
    run = report["results"]["deepfm"]["c"][0]
    parts = [seg[s] for s in ("warm users", "cold users") if seg[s]["samples"]]
    pooled = sum(p["logloss"] * p["samples"] for p in parts) / sum(p["samples"] for p in parts)
    assert pooled == pytest.approx(run["test_logloss"], rel=1e-6)
