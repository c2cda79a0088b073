"""When a long step shows a progress bar: one policy for every bar recaug draws."""

from __future__ import annotations

import os
import sys


def progress_wanted(progress: bool | None) -> bool:
    """An explicit flag wins; otherwise a bar only on a terminal and unless RECAUG_NO_PROGRESS is set
    (a cron log or a CI log gets the summary lines, not thousands of carriage returns)."""
    if progress is not None:
        return progress
    if os.environ.get("RECAUG_NO_PROGRESS", "").strip() not in ("", "0", "false", "False"):
        return False
    return sys.stderr.isatty()
