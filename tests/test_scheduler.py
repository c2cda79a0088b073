"""The long-short schedule over a simulated month, with recording jobs (the real jobs are wired in
by the CLI and exercised in test_long_short_real.py)."""

import multiprocessing as mp
import time

import pytest

from recaug.core.config import parse_config
from recaug.core.locking import RunLock
from recaug.pipelines.scheduler import LONG, SHORT, ScheduleState, tick

DAY = 86_400
T0 = 880_000_000  # 1997-11-20, inside MovieLens-100K's time range


@pytest.fixture
def cfg(tmp_path):
    return parse_config({"name": "sched", "workdir": str(tmp_path / "w"), "augmenters": [{"name": "kar_item_knowledge"}]})


class Jobs:
    def __init__(self):
        self.calls = []
        self.snapshots = 0

    def long(self, cfg, now, full):
        self.calls.append((LONG, now, full))
        self.snapshots += 1
        return {"snapshot": f"s{self.snapshots}"}

    def short(self, cfg, now, warm):
        self.calls.append((SHORT, now, warm))
        return {"checkpoint": f"ckpt-{now}"}

    def has_snapshot(self):
        return self.snapshots > 0


def test_a_simulated_month(cfg):
    jobs = Jobs()
    for day in range(31):
        for hour in (0, 6, 12, 18):  # cron every six hours
            tick(cfg, jobs.long, jobs.short, jobs.has_snapshot, now=T0 + day * DAY + hour * 3600, log=lambda *_: None)
    longs = [c for c in jobs.calls if c[0] == LONG]
    shorts = [c for c in jobs.calls if c[0] == SHORT]
    assert [(n - T0) // DAY for _, n, _ in longs] == [0, 7, 14, 21, 28]  # weekly
    assert [full for *_, full in longs] == [True, False, False, False, False]  # only the first is full
    assert [(n - T0) // DAY for _, n, _ in shorts] == list(range(31))  # daily
    # each retrain is warm-started from the previous checkpoint
    assert shorts[0][2] is None
    assert all(shorts[i][2] == f"ckpt-{shorts[i - 1][1]}" for i in range(1, len(shorts)))
    # the long job runs before the short job on the same tick, so a fresh snapshot is used at once
    assert jobs.calls[0][0] == LONG and jobs.calls[1][0] == SHORT


def test_template_change_forces_a_full_refresh(cfg, tmp_path, monkeypatch):
    jobs = Jobs()
    tick(cfg, jobs.long, jobs.short, jobs.has_snapshot, now=T0, log=lambda *_: None)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    from recaug.augmenters.base import get_augmenter

    (prompts / "kar_item_knowledge.j2").write_text(open(get_augmenter("kar_item_knowledge").prompt.path).read() + "{# v2 #}\n")
    monkeypatch.setenv("RECAUG_PROMPTS_PATH", str(prompts))
    lines = []
    tick(cfg, jobs.long, jobs.short, jobs.has_snapshot, now=T0 + 3600, log=lines.append)
    assert jobs.calls[-1] == (LONG, T0 + 3600, True)  # the short job is not due within the day
    assert any("templates changed" in line and "full refresh" in line for line in lines)


def test_crashed_job_is_picked_up_by_the_next_tick(cfg):
    jobs = Jobs()
    tick(cfg, jobs.long, jobs.short, jobs.has_snapshot, now=T0, log=lambda *_: None)

    def crashing_short(cfg, now, warm):
        raise RuntimeError("OOM")

    with pytest.raises(RuntimeError):
        tick(cfg, jobs.long, crashing_short, jobs.has_snapshot, now=T0 + DAY, log=lambda *_: None)
    state = ScheduleState(cfg.workdir_path() / "schedule" / "state.json")
    assert state.job(SHORT)["status"] == "failed" and "OOM" in state.job(SHORT)["last_error"]
    lines = []
    tick(cfg, jobs.long, jobs.short, jobs.has_snapshot, now=T0 + DAY + 600, log=lines.append)
    assert jobs.calls[-1] == (SHORT, T0 + DAY + 600, f"ckpt-{T0}")
    assert any("did not finish" in line for line in lines)


def _hold_lock(path, ready, release):
    with RunLock(path):
        ready.set()
        release.wait(30)


def test_a_tick_while_another_runs_does_nothing(cfg):
    jobs = Jobs()
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(cfg.workdir_path() / "schedule.lock", ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        res = tick(cfg, jobs.long, jobs.short, jobs.has_snapshot, now=T0, log=lambda *_: None)
        assert res.skipped_locked and jobs.calls == []
    finally:
        release.set()
        holder.join(30)
    res = tick(cfg, jobs.long, jobs.short, jobs.has_snapshot, now=T0, log=lambda *_: None)
    assert not res.skipped_locked and len(jobs.calls) == 2


def test_a_killed_holder_never_leaves_a_stale_lock(cfg):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(cfg.workdir_path() / "schedule.lock", ready, release))
    holder.start()
    assert ready.wait(30)
    holder.kill()
    holder.join(30)
    jobs = Jobs()
    res = tick(cfg, jobs.long, jobs.short, jobs.has_snapshot, now=T0, log=lambda *_: None)
    assert not res.skipped_locked and len(jobs.calls) == 2


def test_dry_run_says_what_and_why_and_runs_nothing(cfg):
    jobs = Jobs()
    lines = []
    res = tick(cfg, jobs.long, jobs.short, jobs.has_snapshot, now=T0, dry_run=True, log=lines.append)
    assert jobs.calls == [] and [d.due for d in res.decisions] == [True, True]
    assert "no long job has succeeded yet" in lines[0]
