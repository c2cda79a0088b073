"""One exclusive lock: an flock on a file, which the kernel releases when the holder dies, so a
crashed job never leaves a stale lock behind. The file names its holder ("pid 123 since ...") so a
process that finds the lock busy can say who holds it.

Used for one job at a time per workdir (`RunLock`), one publish at a time per snapshot root and one
conversion of the packaged model per machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from recaug.core.errors import Locked, writing_into


class LockBusy(RuntimeError):
    """The lock stayed held for longer than the caller would wait; `holder` says by whom."""

    def __init__(self, path: Path, holder: str, message: str):
        super().__init__(message)
        self.path, self.holder = path, holder


class RunLocked(Locked, LockBusy):
    """Another run holds the workdir's run lock (exit 6)."""


@contextlib.contextmanager
def exclusive_lock(
    path: Path,
    wait: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    busy: Callable[[Path, str], Exception] | None = None,
    poll_s: float = 0.05,
    workdir: Path | None = None,
) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block.

    `wait=None` blocks until the lock is free; otherwise the lock is tried for `wait` seconds and then
    `busy(path, holder)` is raised (default: `LockBusy`). `on_wait(holder)` is called once when the lock
    is found busy and the caller is willing to wait, so it can say why it sits idle. A lock that lives
    in a `workdir` reports a full or read-only one as such (exit 7) when it cannot be written.
    """
    path = Path(path)
    what = f"the lock file {path}"
    with writing_into(workdir or path.parent, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
    with fh:
        deadline = None if wait is None else time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    raise (busy or _default_busy)(path, holder) from None
                if on_wait is not None and not told:
                    on_wait(holder)
                    told = True
                time.sleep(poll_s)
        try:
            with writing_into(workdir or path.parent, what):
                fh.seek(0)
                fh.truncate()
                fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
                fh.flush()
            yield
        finally:
            try:
                fh.seek(0)
                fh.truncate()
                fh.flush()
            except OSError:
                pass  # a full or read-only disk: the holder line stays, the flock is what counts
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _default_busy(path: Path, holder: str) -> LockBusy:
    return LockBusy(path, holder, f"{path} is held by {holder}")


def _run_busy(path: Path, holder: str) -> RunLocked:
    return RunLocked(path, holder, f"{path} is held by {holder}; another run is in progress (use --wait SECONDS to wait)")


class RunLock:
    """One job at a time per workdir. `on_wait(holder)` is called once when the lock is busy and
    `wait` > 0 (holder: e.g. "pid 123 since 2026-11-22T06:00:01Z")."""

    def __init__(self, path: Path, wait: float = 0.0, on_wait: Callable[[str], None] | None = None):
        self.path, self.wait, self.on_wait = Path(path), wait, on_wait
        self._held: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> "RunLock":
        held = exclusive_lock(self.path, wait=self.wait, on_wait=self.on_wait, busy=_run_busy, poll_s=0.2)
        held.__enter__()
        self._held = held
        return self

    def __exit__(self, *exc) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            held.__exit__(None, None, None)
