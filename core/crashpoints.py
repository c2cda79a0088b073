"""Named crash points: a test seam that kills this process with SIGKILL at a chosen step of the long job.

    RECAUG_CRASH_AT=<point>        die the first time this process reaches <point>
    RECAUG_CRASH_AT=<point>:<n>    die the n-th time (e.g. generate.shard_committed:3)

The process kills itself with SIGKILL, a true `kill -9`: no exception is raised, no `finally`, `atexit`
or signal handler runs, buffers are not flushed, so what is left on disk is exactly what a power cut or
the OOM killer would leave at that step. Unset (always, in production) a point costs one environment
lookup. The points are counted per process; a Ray actor or Beam worker that reaches a point kills
itself, not the driver. tests/reliability/test_kill_points.py runs a real `recaug run` to every point.

The older `RECAUG_SNAPSHOT_CRASH_AT=<step>` (publish steps only) still works; here those steps are
named `publish.<step>`.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "RECAUG_CRASH_AT"

POINTS: dict[str, str] = {
    "generate.cache_write": "a generation-cache shard is written and fsynced under its temporary name, not renamed",
    "generate.shard_committed": "a generation-cache shard was renamed into place",
    "generate.compact": "cache compaction wrote the merged shard and removed one of its sources",
    "generate.run_written": "the augmentation run folder is in place; nothing is encoded yet",
    "encode.batch": "one encoder batch was computed (in memory only)",
    "encode.cache_write": "an encoding-cache shard is written and fsynced under its temporary name, not renamed",
    "encode.cache_committed": "an encoding-cache shard was renamed into place",
    "gate.passed": "the output gate passed and wrote its report; nothing is published",
    "publish.locked": "the publish lock is held; nothing is written",
    "publish.first_table": "the first table of the new snapshot is written in its hidden folder",
    "publish.tables_written": "every table is written, the manifest is not",
    "publish.manifest_written": "the hidden folder is complete but not renamed",
    "publish.renamed": "the snapshot folder is in place but LATEST still names the previous one",
    "publish.committed": "LATEST names the new snapshot (the commit point); retention has not run",
    "publish.retention": "retention moved an old snapshot to the trash and has not deleted it",
}

_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process if RECAUG_CRASH_AT names `name` and this is the chosen occurrence."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
