"""The product's own errors, each carrying the exit code `recaug` ends with (README, "Exit codes").

Every error a user can act on derives from `RecaugError`; the CLI turns one into its exit code by
its class (`exit_code`) and prints `prefix` + the message, never matching class names or message
text. The concrete errors keep their older base classes too (`ConfigError` is still a ValueError,
`SnapshotNotFound` a LookupError), so code that caught those goes on working.

This module imports nothing from recaug, so every layer may raise these.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2  # usage or config error
EXIT_INPUT = 3  # an input table cannot be used at all
EXIT_INPUT_GATE = 4  # too many input rows quarantined
EXIT_OUTPUT_GATE = 5  # the output gate failed: nothing published
EXIT_LOCKED = 6  # another run holds the lock
EXIT_WORKDIR = 7  # the workdir is full or not writable: nothing published


class RecaugError(Exception):
    """An error whose message is meant for the person running recaug."""

    exit_code = EXIT_UNEXPECTED
    prefix = ""  # what the CLI prints before the message, after "recaug: "


class UsageError(RecaugError):
    """A wrong command line or config (a name that does not exist, a value out of range)."""

    exit_code = EXIT_USAGE


class InputUnusable(RecaugError):
    """An input table cannot be used at all (missing, unreadable, without a required column)."""

    exit_code = EXIT_INPUT
    prefix = "input unusable: "


class InputGateStopped(RecaugError):
    """The input gate quarantined more rows than the threshold allows."""

    exit_code = EXIT_INPUT_GATE
    prefix = "input gate stopped the run: "


class NothingPublished(RecaugError):
    """The output gate failed; no snapshot was published."""

    exit_code = EXIT_OUTPUT_GATE
    prefix = "nothing published: "


class Locked(RecaugError):
    """Another run holds the workdir's lock."""

    exit_code = EXIT_LOCKED


# --- a full or read-only workdir ---------------------------------------------------------------------

# errno values that mean "the disk is full" / "this place cannot be written"
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
# polars' IO errors carry no errno, only Rust's "(os error N)" in their text
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a failed write that means a full or read-only file system, else None."""
    code = getattr(exc, "errno", None)
    if not isinstance(code, int) and not isinstance(exc, OSError):
        found = _RUST_OS_ERROR.search(str(exc))
        code = int(found.group(1)) if found else None
    return code if code in FULL_ERRNOS | READ_ONLY_ERRNOS else None


class WorkdirUnwritable(RecaugError):
    """Writing into the workdir failed because its file system is full or read-only. Raised only
    where nothing was published; whoever raises it has removed what the failed write left behind."""

    exit_code = EXIT_WORKDIR

    def __init__(self, workdir: Path | str, what: str, cause: BaseException):
        self.workdir, self.what, self.cause = Path(workdir), what, cause
        self.errno = storage_errno(cause)
        self.full = self.errno in FULL_ERRNOS
        filename = getattr(cause, "filename", None)
        where = f" ({filename})" if filename and str(filename) not in what else ""
        reason = os.strerror(self.errno) if self.errno is not None else str(cause).strip().splitlines()[0][:200]
        if self.full:
            state, todo = "is full", "free space and re-run"
        else:
            state, todo = "is not writable", "make it writable (or point workdir at a writable folder) and re-run"
        super().__init__(
            f"workdir {self.workdir} {state}: {what}{where} failed ({reason}); nothing was published; {todo}"
        )


@contextmanager
def writing_into(workdir: Path | str, what: str) -> Iterator[None]:
    """Turn a full or read-only file system met inside the block into `WorkdirUnwritable`, naming
    `what` was being written ("writing the generation cache under ..."). Other errors pass as they are.
    A write error that names a file outside the workdir is not the workdir's and passes too."""
    try:
        yield
    except WorkdirUnwritable:
        raise
    except Exception as exc:
        if storage_errno(exc) is None:
            raise
        filename = getattr(exc, "filename", None)
        if filename and not _inside(Path(str(filename)), Path(workdir)):
            raise
        raise WorkdirUnwritable(workdir, what, exc) from exc


def ensure_writable(workdir: Path | str) -> Path:
    """Create the workdir when missing and prove it can be written (a small file written, synced and
    removed), so that a full or read-only workdir stops a command before any work, with one line."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if storage_errno(exc) is not None:
            raise WorkdirUnwritable(workdir, "creating the workdir", exc) from exc
        raise UsageError(f"workdir {workdir} cannot be created: {exc.strerror or exc}; set workdir to a folder "
                         "recaug may create") from exc
    probe = workdir / f".recaug-write-test-{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"recaug")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if storage_errno(exc) is None:
            raise
        raise WorkdirUnwritable(workdir, "a test write", exc) from exc
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only file system: nothing was created
    return workdir


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False
