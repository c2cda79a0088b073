"""Times given by people (CLI flags, config values) as unix seconds."""

from __future__ import annotations

import datetime as dt
from typing import Any


def to_unix_seconds(value: Any, what: str = "time") -> int:
    """int/float seconds (or their text), a date, a datetime (naive = UTC) or an ISO-8601 string
    (a trailing Z allowed) -> int unix seconds. Anything else raises ValueError/TypeError naming `what`."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a time, got a bool")
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"{what} {text!r} is not a time (use unix seconds or ISO-8601: 2026-11-22, 2026-11-22T06:00, 2026-11-22T06:00:00Z)"
            ) from None
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return int(value.timestamp())
    raise TypeError(f"{what} must be unix seconds, a datetime or an ISO-8601 string, got {type(value).__name__}")


def format_utc(seconds: int | None) -> str:
    """'2026-11-22 06:00:00 UTC', or '-' for no time. A value within 30 days of 1970 is shown as a
    number, not a date: it is a row number (split.mode by_row_order) or a derived timestamp, and a
    1970 date would mislead."""
    if seconds is None:
        return "-"
    if 0 <= seconds < 30 * 86_400:
        return f"{seconds:,} (not a date: within 30 days of 1970, i.e. row numbers or derived timestamps)"
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
