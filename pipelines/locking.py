"""One job at a time per workdir: an flock that the kernel releases when the process dies, so a
crashed job never leaves a stale lock behind."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Callable

from recaug.errors import Locked, writing_into


class RunLocked(Locked, RuntimeError):
    """Another run holds the workdir's run lock (exit 6)."""


class RunLock:
    """`on_wait(holder)` is called once when the lock is busy and `wait` > 0, so a caller can say why it
    sits idle (holder: e.g. "pid 123 since 2026-11-22T06:00:01Z")."""

    def __init__(self, path: Path, wait: float = 0.0, on_wait: Callable[[str], None] | None = None):
        self.path, self.wait, self.on_wait, self.fh = Path(path), wait, on_wait, None

    def __enter__(self) -> "RunLock":
        # the lock lives in the workdir: a full or read-only one is reported as such (exit 7)
        with writing_into(self.path.parent, f"the lock file {self.path}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.path, "a+")
        deadline = time.monotonic() + self.wait
        told = False
        while True:
            try:
                fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                self.fh.seek(0)
                holder = self.fh.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    self.fh.close()
                    raise RunLocked(f"{self.path} is held by {holder}; another run is in progress (use --wait SECONDS to wait)") from None
                if self.on_wait is not None and not told:
                    self.on_wait(holder)
                    told = True
                time.sleep(0.2)
        try:
            with writing_into(self.path.parent, f"the lock file {self.path}"):
                self.fh.seek(0)
                self.fh.truncate()
                self.fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
                self.fh.flush()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.fh:
            fh, self.fh = self.fh, None
            try:
                fh.seek(0)
                fh.truncate()
            except OSError:
                pass  # a full or read-only disk: the holder line stays, the flock is what counts
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                try:
                    fh.close()
                except OSError:
                    pass  # an unwritable buffer; the descriptor is closed all the same
