"""The long-short update schedule (docs/architecture.md, "CTR side and the long-short schedule").

cron or Airflow calls `recaug schedule tick CONFIG` every few minutes; the tick reads the recorded
state and runs what is due:

- the **long job** (LLM refresh) at its cadence (default weekly), incremental — only new or changed
  entities, within a budget — or a full refresh when a template, the model or the encoder changed;
- the **short job** (CTR retrain) at its cadence (default daily) on full data and the latest
  published snapshot, warm-started from the previous checkpoint.

A tick while another tick runs, or while a manual `recaug run` holds the workdir's run lock, does
nothing ("nothing to do: ...", exit 0) and records nothing; a job that crashed is still due at the
next tick because its success was never recorded. A manual `recaug run` or `recaug train` records its
success too (`record_manual`, schedule/manual.json), so the next tick counts it as the last run of
that job instead of saying nothing has run yet.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from recaug.core.storage import write_text_atomic
from recaug.core.config import PipelineConfig
from recaug.core.locking import RunLock, RunLocked

LONG, SHORT = "long", "short"


@dataclass
class Decision:
    job: str
    due: bool
    reason: str
    full_refresh: bool = False


@dataclass
class TickResult:
    now: int
    decisions: list[Decision]
    ran: list[dict[str, Any]] = field(default_factory=list)
    skipped_locked: bool = False


def fingerprint(cfg: PipelineConfig) -> dict[str, str]:
    """What makes cached LLM knowledge stale as a whole: templates, model, sampling, encoder."""
    from recaug.augmenters.base import get_augmenter

    cfg.import_augmenter_modules()
    templates = {a.name: get_augmenter(a.name).prompt.content_hash for a in cfg.augmenters if a.enabled}
    return {
        "templates": hashlib.sha256(json.dumps(templates, sort_keys=True).encode()).hexdigest()[:16],
        "model": f"{cfg.engine.kind}:{cfg.engine.model}@{cfg.engine.revision}:t={cfg.engine.temperature}",
        "encoder": f"{cfg.encoder.model}:{cfg.encoder.pooling}:{cfg.encoder.normalize}:{cfg.encoder.pca_dim}",
    }


class ScheduleState:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict[str, Any] = {LONG: {}, SHORT: {}, "history": []}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True))

    def job(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {})


def _fmt(ts: int | None) -> str:
    if ts is None:
        return "never"
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def manual_path(cfg: PipelineConfig) -> Path:
    return cfg.workdir_path() / "schedule" / "manual.json"


def record_manual(cfg: PipelineConfig, job: str, now: int | None = None, **out: Any) -> None:
    """What a manual `recaug run` (LONG) or `recaug train` (SHORT) achieved, for the next tick to read:
    a successful manual run counts as that job's last success. Written to its own small file (atomic
    replace), so it never races with a tick rewriting state.json."""
    now = int(time.time()) if now is None else int(now)
    path = manual_path(cfg)
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {"last_success": now, **{k: v for k, v in out.items() if k in ("snapshot", "checkpoint")}}
    if job == LONG:
        entry["fingerprint"] = fingerprint(cfg)
    data[job] = entry
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def _with_manual(cfg: PipelineConfig, state: ScheduleState) -> tuple[dict[str, Any], dict[str, Any]]:
    """The long and short job states, each replaced by the manual record when that is newer than the
    schedule's own last success (and the schedule's job is not mid-run or failed after it)."""
    path = manual_path(cfg)
    manual = json.loads(path.read_text()) if path.exists() else {}
    out = []
    for job in (LONG, SHORT):
        js = dict(state.job(job))
        m = manual.get(job)
        if m and (js.get("last_success") is None or m["last_success"] > js["last_success"]) and \
                m["last_success"] >= (js.get("last_start") or 0):
            js.update(status="ok", last_success=m["last_success"], manual=True,
                      **{k: v for k, v in m.items() if k in ("fingerprint", "snapshot", "checkpoint")})
        out.append(js)
    return out[0], out[1]


def decide(cfg: PipelineConfig, state: ScheduleState, now: int, has_snapshot: bool) -> list[Decision]:
    sched = cfg.schedule
    fp = fingerprint(cfg)
    long_state, short_state = _with_manual(cfg, state)

    last = long_state.get("last_success")
    if last is None:
        long = Decision(LONG, True, "no long job has succeeded yet: full run", full_refresh=True)
    elif long_state.get("status") in ("running", "failed"):
        long = Decision(LONG, True, f"the long job started {_fmt(long_state.get('last_start'))} did not finish: running it again",
                        full_refresh=long_state.get("full_refresh", False))
    elif long_state.get("fingerprint") != fp:
        changed = [k for k in fp if (long_state.get("fingerprint") or {}).get(k) != fp[k]]
        long = Decision(LONG, True, f"{', '.join(changed)} changed since the last long job: full refresh", full_refresh=True)
    elif now - last >= sched.long_every_s:
        long = Decision(LONG, True, f"last long job succeeded {_fmt(last)}, cadence {sched.long_every_s // 3600} h: incremental refresh")
    else:
        long = Decision(LONG, False, f"last long job succeeded {_fmt(last)}"
                        + (" (a manual `recaug run`)" if long_state.get("manual") else "")
                        + f"; next due {_fmt(last + sched.long_every_s)}")

    last_s = short_state.get("last_success")
    if not has_snapshot and not long.due:
        short = Decision(SHORT, False, "no published snapshot to train on yet")
    elif short_state.get("status") in ("running", "failed"):
        short = Decision(SHORT, True, f"the short job started {_fmt(short_state.get('last_start'))} did not finish: running it again")
    elif last_s is None:
        short = Decision(SHORT, True, "no CTR model trained yet")
    elif now - last_s >= sched.short_every_s:
        short = Decision(SHORT, True, f"last CTR retrain {_fmt(last_s)}, cadence {sched.short_every_s // 3600} h")
    else:
        short = Decision(SHORT, False, f"last CTR retrain {_fmt(last_s)}"
                         + (" (a manual `recaug train`)" if short_state.get("manual") else "")
                         + f"; next due {_fmt(last_s + sched.short_every_s)}")
    return [long, short]


# long_job(cfg, now, full_refresh) -> {"snapshot": id, ...};  short_job(cfg, now, warm_start) -> {"checkpoint": path, ...}
LongJob = Callable[[PipelineConfig, int, bool], dict[str, Any]]
ShortJob = Callable[[PipelineConfig, int, str | None], dict[str, Any]]


def tick(
    cfg: PipelineConfig,
    long_job: LongJob,
    short_job: ShortJob,
    has_snapshot: Callable[[], bool],
    now: int | None = None,
    dry_run: bool = False,
    log=print,
) -> TickResult:
    now = int(time.time()) if now is None else int(now)
    workdir = cfg.workdir_path()
    try:
        lock = RunLock(workdir / "schedule.lock").__enter__()
    except RunLocked as exc:
        log(f"nothing to do: another tick holds the lock ({exc})")
        return TickResult(now, [], skipped_locked=True)
    try:
        state = ScheduleState(workdir / "schedule" / "state.json")
        decisions = decide(cfg, state, now, has_snapshot())
        result = TickResult(now, decisions)
        for d in decisions:
            log(f"{d.job:<5} {'DUE ' if d.due else 'idle'}  {d.reason}")
        if dry_run:
            return result
        for d in decisions:
            if not d.due:
                continue
            if d.job == SHORT and not has_snapshot():
                log("short job skipped: the long job published no snapshot")
                continue
            js = state.job(d.job)
            before = dict(js)
            js.update(status="running", last_start=now, full_refresh=d.full_refresh)
            state.save()
            started = time.perf_counter()
            try:
                if d.job == LONG:
                    out = long_job(cfg, now, d.full_refresh)
                    js.update(fingerprint=fingerprint(cfg))
                else:
                    out = short_job(cfg, now, _with_manual(cfg, state)[1].get("checkpoint"))
            except RunLocked as exc:
                # a manual run holds the workdir: this tick did nothing, so it records nothing either
                js.clear()
                js.update(before)
                state.save()
                log(f"nothing to do: another run holds the lock ({exc}); the next tick tries again")
                result.skipped_locked = True
                return result
            except BaseException as exc:
                js.update(status="failed", last_error=f"{type(exc).__name__}: {exc}")
                state.save()
                raise
            js.update(status="ok", last_success=now, last_error=None, **{k: v for k, v in out.items() if k in ("snapshot", "checkpoint")})
            entry = {"job": d.job, "now": now, "reason": d.reason, "seconds": round(time.perf_counter() - started, 3), **out}
            state.data["history"].append(entry)
            state.save()
            result.ran.append(entry)
        return result
    finally:
        lock.__exit__(None, None, None)
