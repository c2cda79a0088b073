"""The input gate: raw users / items / interactions in, clean conformed tables and a quarantine out.

The loaders hand over tables whose columns carry our names but whose values are whatever the
source held (CSV text, numbers as ints or floats, genres as a list or a "|"-joined string). The
gate works in three steps, all columnar:

1. **Table checks** (polars): every table present, not empty, required columns there. A failure
   makes the whole table unusable and raises `InputSchemaError`.
2. **Conversion** (polars, `strict=False` casts): each column is converted to its contract type;
   a value that was present but did not convert becomes a `<column>.type` failure with its reason.
   Control characters (other than newline and tab) are stripped from free text and counted in
   `counts[table]["sanitized"]`; in ids they are a quarantine reason instead (an id is a key, so
   silently changing it would join it to the wrong thing).
3. **Row checks** (great-expectations): one ExpectationSuite per table over the converted frame,
   validated with result_format COMPLETE; `unexpected_index_list` names the failing rows. Checks GX
   has no expectation for (did the value convert? is the id in the clean users?) are computed into
   boolean columns first and judged by GX with ExpectColumnValuesToBeInSet([True]). Membership is
   computed that way on purpose: GX re-serialises an expectation's `value_set` many times per
   validation, so a direct in-set over the ids costs ~0.4 s for ML-100K's 1,682 items and ~28 s
   for 200k ids, while the boolean column costs ~0.03 s whatever the catalogue size. GX gets the
   frame a block of rows at a time (`_GX_BLOCK`), so its pandas copy is one block's, not a whole
   catalogue's; uniqueness, which needs every row at once, is judged on one frame of integer codes
   of the key columns.

Every failed check of a row is one quarantine row (QUARANTINE schema) with the check name, a
readable reason naming the value, and the raw row as JSON. A row that fails anything is not in the
clean tables. Users and items are gated first, so interactions that point at a quarantined user or
item fail referential integrity with a reason that says so. `enforce_threshold` then stops the run
when a table's quarantined share is above `input_gate.max_quarantine_share`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa

from recaug.core.config import InputGateConfig
from recaug.core.memory import release_memory
from recaug.core.errors import InputGateStopped, InputUnusable
from recaug.schemas.tables import ATTRIBUTE_PREFIX, INTERACTIONS, ITEMS, QUARANTINE, REQUIRED_COLUMNS, USERS, conform

TABLES = ("users", "items", "interactions")  # gate order: interactions are checked against the clean users/items
SCHEMAS = {"users": USERS, "items": ITEMS, "interactions": INTERACTIONS}
ID_COLUMNS = {"users": ("user_id",), "items": ("item_id",), "interactions": ("user_id", "item_id")}
TEXT_LIMITED = {"items": ("title", "description")}  # columns held to max_text_chars
INTERACTION_KEY = ("user_id", "item_id", "timestamp")
# users/items may carry extra text columns `attr_<name>` (dataset.<table>.attributes): nullable text,
# checked like other free text (control characters, encoding, max_text_chars)


def table_schema(table: str, column_names: list[str]) -> pa.Schema:
    """The contract of one table as this dataset has it: SCHEMAS[table] plus the attribute columns
    the source maps (users and items only), in the source's order."""
    schema = SCHEMAS[table]
    if table == "interactions":
        return schema
    attrs = [c for c in column_names if c.startswith(ATTRIBUTE_PREFIX) and c not in schema.names]
    for name in attrs:
        schema = schema.append(pa.field(name, pa.string()))
    return schema

# C0 controls except \t and \n, DEL, and C1 controls. Stripped from free text.
CONTROL_CHARS = r"[\x00-\x08\x0B-\x1F\x7F-\x9F]"
# In ids every control character is a fault, tab and newline included.
ID_CONTROL_CHARS = r"[\x00-\x1F\x7F-\x9F]"
# Invisible characters an id may not hold: zero-width characters (U+200B..U+200D, U+2060, U+FEFF, the
# soft hyphen, the combining grapheme joiner, Hangul and Mongolian fillers), and the bidi controls
# (U+200E/U+200F, U+202A..U+202E, U+2066..U+2069, U+061C): "u1" and "u1\u200b" look the same to a person.
INVISIBLE_ID_CHARS = (
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufeff\uffa0\ufff9-\ufffb]"
)
# U+FFFD: what invalid UTF-8 bytes decode to (here, or in the loader's utf8-lossy CSV read).
REPLACEMENT_CHAR = "\ufffd"
BLANK = r"^\s*$"
# Text that means "no value" in a numeric column (case-insensitive); "\N" is MySQL's dump marker.
MISSING_TOKENS = ("", "na", "n/a", "nan", "null", "none", "\\n")

_INT_RANGE = {pl.Int32: (-(2**31), 2**31 - 1), pl.Int64: (-(2**63), 2**63 - 1)}


class InputSchemaError(InputUnusable, ValueError):
    """A whole table is unusable (missing, empty, or without a required column)."""


class QuarantineThresholdExceeded(InputGateStopped, RuntimeError):
    """Too many rows of a table were quarantined for the run to go on."""

    def __init__(self, message: str, result: "InputGateResult", tables: list[str]):
        super().__init__(message)
        self.result = result
        self.tables = tables


@dataclass
class InputGateResult:
    tables: dict[str, pa.Table]  # clean rows conformed exactly to USERS / ITEMS / INTERACTIONS
    quarantine: pa.Table  # QUARANTINE schema, ordered by table, row_number, check
    # per table: rows_in, rows_ok, rows_quarantined, share, by_check {check: rows}, sanitized {what: values}
    counts: dict[str, dict]
    # per GX expectation: table, check, expectation, column, success, unexpected_count (GX's own count)
    expectations: list[dict]
    max_quarantine_share: float | None = None  # the threshold the gate ran with, for the summary
    timestamp_max: int | None = None  # the newest timestamp accepted (as_of or now, plus slack)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for run reports and manifests (the quarantine table itself is written apart)."""
        return {
            "counts": self.counts,
            "expectations": self.expectations,
            "quarantined_rows": self.quarantine.num_rows,
            "max_quarantine_share": self.max_quarantine_share,
            "timestamp_max": self.timestamp_max,
        }

    def reasons(self, table: str, check: str | None = None) -> list[str]:
        """The quarantine reasons of one table (and check), in row order."""
        q = pl.from_arrow(self.quarantine).filter(pl.col("table") == table)
        if check is not None:
            q = q.filter(pl.col("check") == check)
        return q["reason"].to_list()

    def summary(self) -> str:
        header = ["table", "rows in", "clean", "quarantined", "share", "checks that failed (rows)"]
        rows = []
        for table in TABLES:
            c = self.counts.get(table)
            if c is None:
                continue
            top = ", ".join(f"{k} ({v:,})" for k, v in c["by_check"].items()) or "-"
            rows.append([table, f"{c['rows_in']:,}", f"{c['rows_ok']:,}", f"{c['rows_quarantined']:,}", f"{c['share']:.2%}", top])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        right = {1, 2, 3, 4}

        def line(cells):
            return "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        total = sum(c["rows_quarantined"] for c in self.counts.values())
        lines = [f"input gate: {total:,} row(s) quarantined ({self.quarantine.num_rows:,} quarantine entries)"]
        lines.append(line(header))
        lines.extend(line(r) for r in rows)
        if self.max_quarantine_share is not None:
            over = [t for t, c in self.counts.items() if c["share"] > self.max_quarantine_share]
            verdict = f"above it: {', '.join(over)}" if over else "every table is within it"
            lines.append(f"threshold: at most {self.max_quarantine_share:.2%} of a table's rows may be quarantined; {verdict}")
        sanitized = [f"{t}.{k} in {n:,} value(s)" for t, c in self.counts.items() for k, n in c.get("sanitized", {}).items()]
        if sanitized:
            lines.append("sanitized (kept, not quarantined): " + "; ".join(sanitized))
        failed = [e for e in self.expectations if not e["success"]]
        lines.append(f"expectations (great-expectations): {len(self.expectations)} run, {len(failed)} failed")
        for e in failed:
            lines.append(f"  FAIL {e['table']:<12} {e['check']:<34} {e['expectation']} ({e['unexpected_count']:,} unexpected)")
        return "\n".join(lines)


# --- small helpers -----------------------------------------------------------------------------------


def _show(value: Any, limit: int = 60) -> str:
    """A value as a reason shows it: text quoted with escapes visible, long text cut."""
    if value is None:
        return "null"
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        if len(value) > limit:
            return repr(value[:limit]) + f"... ({len(value):,} chars)"
        return repr(value)
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time, dt.timedelta)):
        return value.isoformat() if hasattr(value, "isoformat") else str(value)
    return value


def _iso(ts: int) -> str:
    try:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "out of calendar range"


def _decode_binary(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Binary -> text. Valid UTF-8 converts columnar; only a column that holds invalid bytes is
    decoded value by value, with U+FFFD for the bad bytes, so the encoding check can name them."""
    target = pa.large_string() if pa.types.is_large_binary(col.type) else pa.string()
    try:
        return col.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = [None if v is None else v.decode("utf-8", "replace") for v in col.to_pylist()]
        return pa.chunked_array([pa.array(values, target)], target)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or (
        hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t)
    )


@contextlib.contextmanager
def _quiet_gx() -> Iterator[None]:
    """GX logs at INFO/WARNING while it validates; the gate reports through its result instead."""
    logger = logging.getLogger("great_expectations")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _gx_context():
    # analytics off before great_expectations is imported: the pipeline runs offline
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    with _quiet_gx():
        ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return gx, ctx


# --- conversion: raw values -> contract types -----------------------------------------------------------
# Each converter returns (converted series, problem series): problem is null where the value is fine
# (or missing) and otherwise says why the present value could not be converted.


def _missing_text(s: pl.Series) -> pl.Series:
    return s.is_null() | s.str.strip_chars().str.to_lowercase().is_in(list(MISSING_TOKENS))


def _to_number(s: pl.Series, target: pl.DataType, *, truncate: bool = False, hint: str = "") -> tuple[pl.Series, pl.Series]:
    """Text / int / float / datetime -> Int32, Int64 or Float64. NaN and the MISSING_TOKENS are
    missing values (null), not failures; `truncate` floors fractional values (timestamps) instead of
    rejecting them."""
    n = len(s)
    as_int: pl.Series | None = None
    if s.dtype == pl.String:
        text = s.str.strip_chars()
        missing = _missing_text(s)
        as_float = text.cast(pl.Float64, strict=False)
        as_int = text.cast(pl.Int64, strict=False)
        not_a_number = "is not a number" + hint
    elif s.dtype.is_integer():
        missing = s.is_null()
        as_int = s.cast(pl.Int64, strict=False)
        as_float = s.cast(pl.Float64, strict=False)
        not_a_number = "is out of range"
    elif s.dtype.is_float():
        missing = s.is_null() | s.is_nan()
        as_float = s.cast(pl.Float64)
        not_a_number = "is not a number"
    elif s.dtype == pl.Boolean:
        missing = s.is_null()
        as_float = pl.Series([None] * n, dtype=pl.Float64)
        not_a_number = "is a boolean, not a number"
    elif s.dtype in (pl.Date, pl.Datetime) or isinstance(s.dtype, pl.Datetime):
        missing = s.is_null()
        epoch = s.cast(pl.Datetime("us")).dt.epoch("s") if s.dtype == pl.Date else s.dt.epoch("s")
        as_int = epoch
        as_float = epoch.cast(pl.Float64)
        not_a_number = "is out of range"
    else:
        missing = s.is_null()
        as_float = pl.Series([None] * n, dtype=pl.Float64)
        not_a_number = f"has type {s.dtype}, not a number"

    frame = pl.DataFrame(
        {
            "missing": missing,
            "i": as_int if as_int is not None else pl.Series([None] * n, dtype=pl.Int64),
            "f": as_float,
        }
    )
    f = pl.col("f")
    if target == pl.Float64:
        out = frame.select(
            value=pl.when(pl.col("missing")).then(None).otherwise(f),
            problem=pl.when(pl.col("missing"))
            .then(None)
            .when(f.is_null())
            .then(pl.lit(not_a_number))
            .when(f.is_infinite())
            .then(pl.lit("is not a finite number"))
            .otherwise(None),
        )
        return out["value"], out["problem"]

    lo, hi = _INT_RANGE[target]
    whole = f.floor() if truncate else f
    from_float_ok = f.is_finite() & (pl.lit(truncate) | (f == f.floor())) & (whole >= lo) & (whole <= hi)
    out = frame.select(
        value=pl.when(pl.col("missing"))
        .then(None)
        .when(pl.col("i").is_not_null() & pl.col("i").is_between(lo, hi))
        .then(pl.col("i"))
        .when(pl.col("i").is_null() & from_float_ok)
        .then(whole.cast(pl.Int64, strict=False))
        .otherwise(None),
        problem=pl.when(pl.col("missing"))
        .then(None)
        .when(pl.col("i").is_not_null())
        .then(pl.when(pl.col("i").is_between(lo, hi)).then(None).otherwise(pl.lit(f"is out of range for {str(target).lower()}")))
        .when(f.is_null())
        .then(pl.lit(not_a_number))
        .when(~f.is_finite())
        .then(pl.lit("is not a finite number"))
        .when(pl.lit(not truncate) & (f != f.floor()))
        .then(pl.lit("is not a whole number"))
        .when((whole < lo) | (whole > hi))
        .then(pl.lit(f"is out of range for {str(target).lower()}"))
        .otherwise(None),
    )
    return out["value"].cast(target), out["problem"]


def _to_id(s: pl.Series) -> tuple[pl.Series, pl.Series]:
    """Ids are text. Numbers become their decimal text (42.0 -> "42", so a float-typed id column
    from a NaN-holding export still joins); surrounding whitespace is trimmed."""
    none = pl.Series([None] * len(s), dtype=pl.String)
    if s.dtype == pl.String:
        return s.str.strip_chars(), none
    if s.dtype.is_integer():
        return s.cast(pl.String), none
    if s.dtype.is_float():
        frame = pl.DataFrame({"f": s})
        f = pl.col("f")
        ok = f.is_finite() & (f == f.floor()) & (f.abs() < 2**63)
        out = frame.select(
            value=pl.when(ok).then(f.cast(pl.Int64, strict=False).cast(pl.String)).otherwise(None),
            problem=pl.when(f.is_null() | f.is_nan()).then(None).when(ok).then(None).otherwise(pl.lit("is not a whole number")),
        )
        value = out["value"]
        return value, out["problem"]
    return _to_text(s)


def _to_text(s: pl.Series) -> tuple[pl.Series, pl.Series]:
    if s.dtype == pl.String:
        return s, pl.Series([None] * len(s), dtype=pl.String)
    if isinstance(s.dtype, (pl.Struct, pl.List, pl.Array, pl.Object)):
        value = pl.Series([None] * len(s), dtype=pl.String)
        problem = pl.select(pl.when(s.is_not_null()).then(pl.lit(f"has type {s.dtype}, not text"))).to_series()
        return value, problem
    try:
        value = s.cast(pl.String, strict=False)
    except (pl.exceptions.PolarsError, TypeError):
        value = pl.Series([None] * len(s), dtype=pl.String)
    problem = pl.select(
        pl.when(s.is_not_null() & value.is_null()).then(pl.lit(f"has type {s.dtype}, not text")).otherwise(None)
    ).to_series()
    return value, problem


def _to_list_of_text(s: pl.Series, separator: str) -> tuple[pl.Series, pl.Series]:
    """list<string>: lists pass through (elements as text), text is split on `separator`.
    Elements are trimmed and empty ones dropped ("Action| Comedy|" -> ["Action", "Comedy"])."""
    none = pl.Series([None] * len(s), dtype=pl.String)
    if isinstance(s.dtype, (pl.List, pl.Array)):
        try:
            lists = s.cast(pl.List(pl.String))
            problem = none
        except (pl.exceptions.PolarsError, TypeError):
            lists = pl.Series([None] * len(s), dtype=pl.List(pl.String))
            problem = pl.select(pl.when(s.is_not_null()).then(pl.lit(f"has type {s.dtype}, not a list of text"))).to_series()
    else:
        text, problem = _to_text(s)
        lists = text.str.split(separator)
    cleaned = lists.list.eval(pl.element().str.strip_chars().filter(pl.element().str.len_chars() > 0))
    return cleaned, problem


def _strip_controls(s: pl.Series) -> tuple[pl.Series, int]:
    if isinstance(s.dtype, pl.List):
        hit = int(s.list.eval(pl.element().str.contains(CONTROL_CHARS).any()).list.first().fill_null(False).sum())
        return (s.list.eval(pl.element().str.replace_all(CONTROL_CHARS, "")) if hit else s), hit
    hit = int(s.str.contains(CONTROL_CHARS).fill_null(False).sum())
    return (s.str.replace_all(CONTROL_CHARS, "") if hit else s), hit


@dataclass
class _Converted:
    frame: pl.DataFrame  # contract columns (absent optional ones as nulls), contract-ish polars types
    schema: pa.Schema  # the contract with this dataset's attribute columns
    present: list[str]  # contract columns the raw table had
    problems: dict[str, pl.Series]  # column -> type problem per row (null = fine)
    sanitized: dict[str, int] = field(default_factory=dict)


def _convert(table: str, raw: pa.Table, list_separator: str, timestamp_format: str | None = None) -> _Converted:
    schema = table_schema(table, raw.column_names)
    columns: dict[str, pl.Series] = {}
    problems: dict[str, pl.Series] = {}
    sanitized: dict[str, int] = {}
    present = [f.name for f in schema if f.name in raw.column_names]
    ids = set(ID_COLUMNS[table])
    n = raw.num_rows
    for fld in schema:
        name = fld.name
        if name not in raw.column_names:
            columns[name] = pl.Series(name, [None] * n, dtype=pl.from_arrow(pa.array([], fld.type)).dtype)
            continue
        col = raw.column(name)
        if _is_binary(col.type):
            col = _decode_binary(col)
        try:
            s = pl.from_arrow(col)
        except (pl.exceptions.PolarsError, pa.ArrowException, TypeError, ValueError):
            # a type polars cannot read (rare): its values as text, judged like any other text
            s = pl.Series(name, [None if v is None else str(v) for v in col.to_pylist()], dtype=pl.String)
        if isinstance(s.dtype, (pl.Categorical, pl.Enum)):
            s = s.cast(pl.String)
        if name in ids:
            value, problem = _to_id(s)
            value, hit = _normalise_id(value)
            if hit:
                sanitized[f"{name}.nfc_normalised"] = hit
        elif fld.type == pa.int32():
            value, problem = _to_number(s, pl.Int32)
        elif fld.type == pa.int64():  # timestamp
            hint = (f" (it does not match dataset.interactions.timestamp_format {timestamp_format!r}; fix the format or the value)"
                    if timestamp_format else
                    " (timestamps are unix seconds; set dataset.interactions.timestamp_format to parse dates)")
            value, problem = _to_number(s, pl.Int64, truncate=True, hint=hint)
        elif pa.types.is_floating(fld.type):
            value, problem = _to_number(s, pl.Float64)
            problem = _nan_is_not_missing(s, problem, name)
        elif pa.types.is_list(fld.type):
            value, problem = _to_list_of_text(s, list_separator)
            value, hit = _strip_controls(value)
            if hit:
                sanitized[f"{name}.control_chars_stripped"] = hit
        else:
            value, problem = _to_text(s)
            value, hit = _strip_controls(value)
            if hit:
                sanitized[f"{name}.control_chars_stripped"] = hit
        if problem.null_count() < len(problem):
            # a value that failed conversion is reported once, as a type failure: no range check on it
            value = pl.select(pl.when(problem.is_null()).then(value)).to_series()
        columns[name] = value.rename(name)
        problems[name] = problem
    return _Converted(frame=pl.DataFrame(columns), schema=schema, present=present, problems=problems, sanitized=sanitized)


def _normalise_id(value: pl.Series) -> tuple[pl.Series, int]:
    """Ids in Unicode NFC, so "Cafe\u0301" and "Caf\u00e9" (the same text to a person) are one key
    everywhere; returns the ids and how many changed."""
    if value.dtype != pl.String:
        return value, 0
    normal = value.str.normalize("NFC")
    changed = int((normal != value).fill_null(False).sum())
    return (normal if changed else value), changed


def _nan_is_not_missing(raw: pl.Series, problem: pl.Series, column: str) -> pl.Series:
    """A NaN rating is a fault, not a missing rating: a missing rating makes the interaction a click
    (label 1), and NaN is what a failed computation writes, so taking it as "no rating" would turn it
    into a positive without a word. Other NaNs (ages, years) stay missing values."""
    if column != "rating":
        return problem
    if raw.dtype == pl.String:
        nan = raw.str.strip_chars().str.to_lowercase().is_in(["nan", "+nan", "-nan"])
    elif raw.dtype.is_float():
        nan = raw.is_nan()
    else:
        return problem
    nan = nan.fill_null(False)
    if not nan.any():
        return problem
    why = "is NaN, not a rating (leave the value empty if the interaction has none: it then counts as a click)"
    return pl.select(pl.when(nan).then(pl.lit(why)).otherwise(problem)).to_series()


def _first_invisible(value: str) -> str:
    import re
    import unicodedata

    found = re.search(INVISIBLE_ID_CHARS, value)
    if not found:
        return "an invisible character"
    ch = found.group(0)
    return f"U+{ord(ch):04X} {unicodedata.name(ch, 'FORMAT CHARACTER')}"


def _identity_and_range_checks(E, table: str, conv: "_Converted", cfg: InputGateConfig) -> list["_Check"]:
    """Ids holding invisible (zero-width or bidi-control) characters; users' ages outside
    [input_gate.age_min, input_gate.age_max]."""
    frame = conv.frame
    checks: list[_Check] = []
    for column in ID_COLUMNS[table]:
        def invisible_reasons(rows, column=column):
            return rows, [
                f"{column} {_show(v)} contains {_first_invisible(v)}, a zero-width or bidi-control character: it "
                "would look like another id; remove it at the source"
                for v in _values(frame, column, rows)
            ]

        checks.append(_Check(f"{column}.invisible_chars", column,
                             E.ExpectColumnValuesToNotMatchRegex(column=column, regex=INVISIBLE_ID_CHARS), invisible_reasons))
    if table == "users" and "age" in conv.present:
        def age_reasons(rows):
            return rows, [f"age {_show(v)} is outside [{cfg.age_min}, {cfg.age_max}] (input_gate.age_min, age_max)"
                          for v in _values(frame, "age", rows)]

        checks.append(_Check("age.range", "age",
                             E.ExpectColumnValuesToBeBetween(column="age", min_value=cfg.age_min, max_value=cfg.age_max),
                             age_reasons))
    return checks


# --- checks ------------------------------------------------------------------------------------------


@dataclass
class _Check:
    name: str  # "<column>.<rule>": the quarantine `check` value
    column: str
    expectation: Any  # a GX expectation over the GX frame
    # (rows flagged by GX) -> (rows to quarantine, their reasons)
    reasons: Callable[[np.ndarray], tuple[np.ndarray, list[str]]]


def _values(frame: pl.DataFrame, column: str, rows: np.ndarray) -> list[Any]:
    return frame[column].gather(rows).to_list() if len(rows) else []


def _raw_values(raw: pa.Table, column: str, rows: np.ndarray) -> list[Any]:
    return raw.column(column).take(pa.array(rows, pa.int64())).to_pylist() if len(rows) else []


def _build_checks(
    gx, table: str, raw: pa.Table, conv: _Converted, cfg: InputGateConfig, timestamp_max: int,
    gx_frame: dict[str, Any], clean_ids: dict[str, pl.Series], quarantined_ids: dict[str, dict[str, str]],
) -> list[_Check]:
    """The checks of one table, and the extra columns they need in the GX frame (added to gx_frame)."""
    E = gx.expectations
    frame = conv.frame
    checks: list[_Check] = []
    type_failed: dict[str, np.ndarray] = {}

    # 1. values that did not convert to the contract type
    for column in conv.present:
        problem = conv.problems[column]
        failed = problem.is_not_null()
        type_failed[column] = failed.to_numpy()
        if not failed.any():
            continue  # nothing to judge; keeps the suite small on clean data
        gx_frame[f"{column}__converts"] = _tristate(raw_present(raw, column), ~type_failed[column])

        def type_reasons(rows, column=column, problem=problem):
            raw_vals = _raw_values(raw, column, rows)
            why = problem.gather(rows).to_list()
            return rows, [f"{column} {_show(v)} {w}" for v, w in zip(raw_vals, why)]

        checks.append(_Check(f"{column}.type", column, E.ExpectColumnValuesToBeInSet(column=f"{column}__converts", value_set=[True]), type_reasons))

    schema = conv.schema
    required = [f.name for f in schema if not f.nullable]
    text_columns = [f.name for f in schema if f.name in conv.present and (pa.types.is_string(f.type) or pa.types.is_list(f.type))]
    ids = ID_COLUMNS[table]

    # 2. required values present (a value that failed its type is reported once, as a type failure)
    for column in required:
        def null_reasons(rows, column=column):
            keep = rows[~type_failed.get(column, np.zeros(frame.height, bool))[rows]]
            raw_vals = _raw_values(raw, column, keep)
            return keep, [f"{column} is missing" + ("" if v is None else f" (the source has {_show(v)})") for v in raw_vals]

        checks.append(_Check(f"{column}.not_null", column, E.ExpectColumnValuesToNotBeNull(column=column), null_reasons))

    # 3. ids and titles not blank; ids free of control characters
    for column in (*ids, "title") if table == "items" else ids:
        def blank_reasons(rows, column=column):
            vals = _values(frame, column, rows)
            return rows, [f"{column} is empty" if v == "" else f"{column} {_show(v)} is blank" for v in vals]

        # ids are trimmed, so a blank id is an empty one and the cheap length check finds it; a
        # whitespace-class regex over 100k ids costs ~0.1 s per column in pandas
        expectation = (
            E.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1)
            if column in ids
            else E.ExpectColumnValuesToNotMatchRegex(column=column, regex=BLANK)
        )
        checks.append(_Check(f"{column}.not_empty", column, expectation, blank_reasons))
    for column in ids:
        def control_reasons(rows, column=column):
            return rows, [f"{column} {_show(v)} contains control characters" for v in _values(frame, column, rows)]

        checks.append(
            _Check(f"{column}.control_chars", column, E.ExpectColumnValuesToNotMatchRegex(column=column, regex=ID_CONTROL_CHARS), control_reasons)
        )
    checks.extend(_identity_and_range_checks(E, table, conv, cfg))

    # 4. invalid UTF-8 (decoded to U+FFFD here or by the loader)
    for column in text_columns:
        def encoding_reasons(rows, column=column):
            vals = _values(frame, column, rows)
            return rows, [
                f"{column} {_show(v)} has invalid UTF-8 bytes (shown as U+FFFD); if the file is not UTF-8, "
                f"set dataset.{table}.encoding (e.g. latin-1, cp1252)" for v in vals
            ]

        checks.append(
            _Check(f"{column}.encoding", column, E.ExpectColumnValuesToNotMatchRegex(column=column, regex=REPLACEMENT_CHAR), encoding_reasons)
        )

    # 5. text length
    attributes = tuple(c for c in schema.names if c.startswith(ATTRIBUTE_PREFIX))
    for column in (*TEXT_LIMITED.get(table, ()), *attributes):
        if column not in conv.present:
            continue

        def length_reasons(rows, column=column):
            vals = _values(frame, column, rows)
            return rows, [
                f"{column} is {len(v):,} characters long, above input_gate.max_text_chars = {cfg.max_text_chars:,} (starts {_show(v, 40)})"
                for v in vals
            ]

        checks.append(
            _Check(f"{column}.max_length", column, E.ExpectColumnValueLengthsToBeBetween(column=column, max_value=cfg.max_text_chars), length_reasons)
        )

    # 6. ranges
    if table == "interactions":
        if "rating" in conv.present:
            def rating_reasons(rows):
                return rows, [f"rating {_show(v)} is outside [{cfg.rating_min:g}, {cfg.rating_max:g}]" for v in _values(frame, "rating", rows)]

            checks.append(
                _Check("rating.range", "rating",
                       E.ExpectColumnValuesToBeBetween(column="rating", min_value=cfg.rating_min, max_value=cfg.rating_max), rating_reasons)
            )

        def ts_reasons(rows):
            out = []
            for v in _values(frame, "timestamp", rows):
                if v < cfg.timestamp_min:
                    out.append(f"timestamp {v} ({_iso(v)}) is before input_gate.timestamp_min = {cfg.timestamp_min} ({_iso(cfg.timestamp_min)})")
                else:
                    hint = "; milliseconds? timestamps must be unix seconds" if v > 10**11 else ""
                    out.append(
                        f"timestamp {v} ({_iso(v)}) is after {timestamp_max} ({_iso(timestamp_max)}) = as_of or now "
                        f"+ input_gate.future_slack_s{hint}"
                    )
            return rows, out

        checks.append(
            _Check("timestamp.range", "timestamp",
                   E.ExpectColumnValuesToBeBetween(column="timestamp", min_value=cfg.timestamp_min, max_value=timestamp_max), ts_reasons)
        )

        # 7. referential integrity against the clean users / items
        for column, other in (("user_id", "users"), ("item_id", "items")):
            ids_ok = (frame[column].is_not_null() & (frame[column] != "")).to_numpy()
            member = frame[column].is_in(clean_ids[other].implode()).fill_null(False).to_numpy()
            gx_frame[f"{column}__in_{other}"] = _tristate(ids_ok, member)

            def ref_reasons(rows, column=column, other=other):
                out = []
                for v in _values(frame, column, rows):
                    why = quarantined_ids[other].get(v)
                    if why:
                        out.append(f"{column} {_show(v)} is not in the clean {other}: its {other} row was quarantined ({why})")
                    else:
                        out.append(f"{column} {_show(v)} is not in {other}")
                return rows, out

            checks.append(
                _Check(f"{column}.in_{other}", column, E.ExpectColumnValuesToBeInSet(column=f"{column}__in_{other}", value_set=[True]), ref_reasons)
            )

    # 8. uniqueness: GX finds every row of a duplicated key; the first occurrence is kept
    key = list(INTERACTION_KEY) if table == "interactions" else list(ids)
    usable = pl.all_horizontal([frame[c].is_not_null() for c in key])
    for c in key:
        if frame[c].dtype == pl.String:
            usable = usable & (frame[c].str.strip_chars() != "")
    keyed = frame.select(key).with_row_index("row").with_columns(usable=usable)
    firsts = keyed.filter(pl.col("usable")).with_columns(first=pl.col("row").min().over(key))
    later = np.zeros(frame.height, bool)
    first_row = np.full(frame.height, -1, np.int64)
    if firsts.height:
        idx = firsts["row"].to_numpy()
        fr = firsts["first"].to_numpy()
        later[idx] = idx != fr
        first_row[idx] = fr

    def dup_reasons(rows):
        keep = rows[later[rows]]
        if table == "interactions":
            vals = frame.select(key)[keep].rows() if len(keep) else []
            return keep, [
                f"duplicate interaction user_id {_show(u)}, item_id {_show(i)}, timestamp {t} (first at row {first_row[r]})"
                for r, (u, i, t) in zip(keep, vals)
            ]
        return keep, [f"duplicate {key[0]} {_show(v)} (first at row {first_row[r]})" for r, v in zip(keep, _values(frame, key[0], keep))]

    if table == "interactions":
        checks.append(_Check("user_id+item_id+timestamp.unique", "user_id,item_id,timestamp",
                             E.ExpectCompoundColumnsToBeUnique(column_list=key), dup_reasons))
    else:
        checks.append(_Check(f"{key[0]}.unique", key[0], E.ExpectColumnValuesToBeUnique(column=key[0]), dup_reasons))
    return checks


def raw_present(raw: pa.Table, column: str) -> np.ndarray:
    """True where the raw table holds a value (not null) in `column`."""
    return np.asarray(raw.column(column).is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _tristate(applies: np.ndarray, passed: np.ndarray) -> np.ndarray:
    """A derived check column for GX: True / False where the check applies, None where it does not
    (GX leaves missing values to the not-null checks)."""
    out = np.full(len(applies), None, dtype=object)
    out[applies] = passed[applies].tolist()
    return out


def _gx_frame(conv: _Converted):
    """The pandas frame GX validates: contract columns as converted (lists joined to text), index =
    row number in the raw table."""
    frame = conv.frame
    cols = {}
    for name in frame.columns:
        s = frame[name]
        if isinstance(s.dtype, pl.List):
            s = s.list.join("|")
        cols[name] = s
    return pl.DataFrame(cols)


# rows per frame handed to GX for the row-by-row checks (as in the output gate): one pandas copy of a
# million-row table, as Python objects, cost ~300 MB on top of the tables
_GX_BLOCK = 250_000
# checks whose verdict on a row depends on that row alone: validated block by block, results added up
_ROW_BY_ROW = (
    "expect_column_values_to_not_be_null", "expect_column_values_to_be_in_set", "expect_column_values_to_be_between",
    "expect_column_value_lengths_to_be_between", "expect_column_values_to_not_match_regex",
)
# checks that need every row at once: judged on one frame of integer codes of their columns
_WHOLE_TABLE = ("expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique")


@dataclass
class _Outcome:
    """One check's result over every block: `result` holds unexpected_count and unexpected_index_list
    (row numbers in the whole table)."""

    type: str
    success: bool
    result: dict[str, Any]


def _row_blocks(frame: pl.DataFrame, extra: dict[str, np.ndarray], block: int):
    """pandas frames of at most `block` rows, indexed by row number in the whole table."""
    import pandas as pd

    for start in range(0, max(frame.height, 1), block):
        stop = min(start + block, frame.height)
        pdf = frame.slice(start, stop - start).to_pandas()
        for name, values in extra.items():
            pdf[name] = pd.Series(values[start:stop], dtype=object)
        pdf.index = pd.RangeIndex(start, stop)
        yield pdf
        del pdf  # before the next block is built


def _key_codes(frame: pl.DataFrame, columns: list[str]):
    """The key columns as dense integer ranks (null stays null): uniqueness is the same on them, and a
    frame of integers is a fraction of one of strings."""
    import pandas as pd

    pdf = frame.select([pl.col(c).rank("dense").cast(pl.Int64) for c in columns]).to_pandas()
    pdf.index = pd.RangeIndex(frame.height)
    return pdf


def _validate(gx, ctx, table: str, frame: pl.DataFrame, extra: dict[str, np.ndarray], checks: list[_Check]) -> dict[str, _Outcome]:
    for c in checks:
        kind = c.expectation.expectation_type
        # a `mostly` or an aggregate check would not add up over blocks
        if kind not in _ROW_BY_ROW + _WHOLE_TABLE or c.expectation.configuration.kwargs.get("mostly") is not None:
            raise TypeError(f"input gate check {c.name}: {kind} is neither row-by-row nor a uniqueness check")
    whole = [c for c in checks if c.expectation.expectation_type in _WHOLE_TABLE]
    per_row = [c for c in checks if c.expectation.expectation_type in _ROW_BY_ROW]
    source = ctx.data_sources.add_pandas(f"recaug_input_{table}")
    outcomes: dict[str, _Outcome] = {}
    try:
        if per_row:
            outcomes.update(_run_suite(gx, source, table, "rows", per_row, _row_blocks(frame, extra, _GX_BLOCK)))
        if whole:
            columns = sorted({col for c in whole for col in _columns(c.expectation)})
            outcomes.update(_run_suite(gx, source, table, "keys", whole, [_key_codes(frame, columns)]))
    finally:
        ctx.data_sources.delete(source.name)  # GX keeps the last batch (a whole frame) while its source lives
    return outcomes


def _columns(expectation) -> list[str]:
    kwargs = expectation.configuration.kwargs
    return list(kwargs.get("column_list") or [kwargs["column"]])


def _run_suite(gx, source, table: str, part: str, checks: list[_Check], frames) -> dict[str, _Outcome]:
    """One suite of `checks` over every frame; per check: passed in every frame, unexpected rows of all."""
    asset = source.add_dataframe_asset(f"{table}_{part}")
    definition = asset.add_batch_definition_whole_dataframe("all")
    suite = gx.ExpectationSuite(name=f"recaug_input_{table}_{part}")
    for check in checks:
        check.expectation.meta = {"recaug_check": check.name}
        suite.add_expectation(check.expectation)
    outcomes: dict[str, _Outcome] = {}
    for pdf in frames:
        with _quiet_gx():
            validation = definition.get_batch(batch_parameters={"dataframe": pdf}).validate(suite, result_format="COMPLETE")
        for res in validation.results:
            name = (res.expectation_config.meta or {}).get("recaug_check")
            info = res.exception_info or {}
            raised = info.get("raised_exception") if "raised_exception" in info else any(
                isinstance(v, dict) and v.get("raised_exception") for v in info.values()
            )
            if raised:
                message = info.get("exception_message") or next(
                    (v.get("exception_message") for v in info.values() if isinstance(v, dict) and v.get("exception_message")), "unknown error"
                )
                raise RuntimeError(f"input gate check {table}/{name} could not run in great-expectations: {message}")
            result = res.result or {}
            out = outcomes.setdefault(name, _Outcome(res.expectation_config.type, True, {"unexpected_count": 0, "unexpected_index_list": []}))
            out.success = out.success and bool(res.success)
            out.result["unexpected_count"] += int(result.get("unexpected_count") or 0)
            out.result["unexpected_index_list"].extend(result.get("unexpected_index_list") or [])
        del pdf, validation
        release_memory()
    return outcomes


# --- the gate ----------------------------------------------------------------------------------------


def _check_tables(raw: dict[str, Any]) -> dict[str, pa.Table]:
    missing = [t for t in TABLES if t not in raw or raw[t] is None]
    if missing:
        raise InputSchemaError(f"the input gate needs the tables {list(TABLES)}; missing: {missing} (got {sorted(raw)})")
    tables = {}
    for t in TABLES:
        tbl = raw[t]
        if isinstance(tbl, pl.DataFrame):
            tbl = tbl.to_arrow()
        if not isinstance(tbl, pa.Table):
            raise InputSchemaError(f"{t}: expected a pyarrow Table, got {type(tbl).__name__}")
        absent = [c for c in REQUIRED_COLUMNS[t] if c not in tbl.column_names]
        if absent:
            raise InputSchemaError(
                f"{t}: required column(s) {absent} missing; the table has {tbl.column_names}. "
                f"Map the source's names to ours with dataset.{t}.columns (ours: theirs)"
            )
        if tbl.num_rows == 0:
            raise InputSchemaError(f"{t}: the table has no rows; check the source file and its filters")
        tables[t] = tbl
    return tables


def run_input_gate(
    raw: dict[str, pa.Table],
    cfg: InputGateConfig,
    as_of: int | None = None,
    *,
    list_separator: str = "|",
    timestamp_format: str | None = None,
) -> InputGateResult:
    """Check raw users / items / interactions; return the clean conformed tables and the quarantine.

    Raises InputSchemaError when a table is unusable as a whole. Never raises for bad rows: those
    are quarantined; call `enforce_threshold` to stop when there are too many.
    """
    tables = _check_tables(raw)
    timestamp_max = int(as_of if as_of is not None else time.time()) + int(cfg.future_slack_s)
    gx, ctx = _gx_context()

    clean: dict[str, pa.Table] = {}
    clean_ids: dict[str, pl.Series] = {}
    quarantined_ids: dict[str, dict[str, str]] = {}
    counts: dict[str, dict] = {}
    expectations: list[dict] = []
    q_parts: list[pl.DataFrame] = []

    for table in TABLES:
        raw_t = tables[table]
        conv = _convert(table, raw_t, list_separator, timestamp_format if table == "interactions" else None)
        extra: dict[str, np.ndarray] = {}
        checks = _build_checks(gx, table, raw_t, conv, cfg, timestamp_max, extra, clean_ids, quarantined_ids)
        results = _validate(gx, ctx, table, _gx_frame(conv), extra, checks)
        release_memory()  # the pandas blocks GX validated

        bad = np.zeros(raw_t.num_rows, bool)
        entries_rows: list[np.ndarray] = []
        entries_check: list[str] = []
        entries_reason: list[str] = []
        by_check: dict[str, int] = {}
        for check in checks:
            res = results[check.name]
            result = res.result or {}
            expectations.append(
                {
                    "table": table,
                    "check": check.name,
                    "expectation": res.type,
                    "column": check.column,
                    "success": bool(res.success),
                    "unexpected_count": int(result.get("unexpected_count") or 0),
                }
            )
            flagged = np.asarray(result.get("unexpected_index_list") or [], dtype=np.int64)
            rows, reasons = check.reasons(np.unique(flagged))
            if len(rows):
                bad[rows] = True
                by_check[check.name] = len(rows)
                entries_rows.append(rows)
                entries_check.extend([check.name] * len(rows))
                entries_reason.extend(reasons)

        bad_rows = np.flatnonzero(bad)
        if len(entries_rows):
            all_rows = np.concatenate(entries_rows)
            records_by_row = {
                int(r): json.dumps(_jsonable(rec), ensure_ascii=False, default=str)
                for r, rec in zip(bad_rows, raw_t.take(pa.array(bad_rows, pa.int64())).to_pylist())
            }
            q_parts.append(
                pl.DataFrame(
                    {
                        "table": [table] * len(all_rows),
                        "row_number": all_rows,
                        "check": entries_check,
                        "reason": entries_reason,
                        "record": [records_by_row[int(r)] for r in all_rows],
                    },
                    schema={"table": pl.String, "row_number": pl.Int64, "check": pl.String, "reason": pl.String, "record": pl.String},
                )
            )
        ok = ~bad
        clean_frame = conv.frame.filter(pl.Series(ok))
        clean[table] = conform(clean_frame.to_arrow(), conv.schema)
        if table != "interactions":
            id_col = ID_COLUMNS[table][0]
            clean_ids[table] = clean_frame[id_col]
            # first failed check per quarantined id, for the interactions' referential reasons
            if len(entries_rows):
                q = q_parts[-1].join(
                    pl.DataFrame({"row_number": np.arange(raw_t.num_rows, dtype=np.int64), "id": conv.frame[id_col]}),
                    on="row_number",
                ).filter(pl.col("id").is_not_null() & ~pl.col("id").is_in(clean_ids[table].implode()))
                quarantined_ids[table] = dict(
                    q.group_by("id", maintain_order=True).agg(pl.format("{} at row {}", "check", "row_number").first()).iter_rows()
                )
            else:
                quarantined_ids[table] = {}
        rows_in = raw_t.num_rows
        counts[table] = {
            "rows_in": rows_in,
            "rows_ok": int(ok.sum()),
            "rows_quarantined": int(bad.sum()),
            "share": float(bad.sum()) / rows_in,
            "by_check": dict(sorted(by_check.items(), key=lambda kv: (-kv[1], kv[0]))),
            "sanitized": conv.sanitized,
        }

    if q_parts:
        quarantine = pl.concat(q_parts).sort(
            [pl.col("table").replace_strict({t: i for i, t in enumerate(TABLES)}, return_dtype=pl.Int8), "row_number", "check"]
        )
        quarantine = conform(quarantine.to_arrow(), QUARANTINE)
    else:
        quarantine = QUARANTINE.empty_table()
    return InputGateResult(
        tables=clean,
        quarantine=quarantine,
        counts=counts,
        expectations=expectations,
        max_quarantine_share=cfg.max_quarantine_share,
        timestamp_max=timestamp_max,
    )


def enforce_threshold(result: InputGateResult, cfg: InputGateConfig, quarantine_path: Any = None) -> None:
    """Raise QuarantineThresholdExceeded when any table's quarantined share is above
    `cfg.max_quarantine_share` (a share equal to it passes)."""
    over = [t for t in TABLES if t in result.counts and result.counts[t]["share"] > cfg.max_quarantine_share]
    if not over:
        return
    q = pl.from_arrow(result.quarantine)
    parts = []
    advice = []
    for table in over:
        c = result.counts[table]
        top = list(c["by_check"].items())[:3]
        examples = []
        for check, n in top:
            example = q.filter((pl.col("table") == table) & (pl.col("check") == check))["reason"].head(1).to_list()
            examples.append(f"{check}: {n:,} row(s), e.g. {example[0] if example else '-'}")
        parts.append(
            f"  - {table}: {c['share']:.2%} of rows quarantined ({c['rows_quarantined']:,} of {c['rows_in']:,}), "
            f"above the threshold input_gate.max_quarantine_share = {cfg.max_quarantine_share:.2%}; top reasons: "
            + "; ".join(examples)
        )
        encoding = [check for check, _ in top if check.endswith(".encoding")]
        if encoding:
            advice.append(
                f"{table}: {', '.join(encoding)} failed, so the file is probably not UTF-8: set dataset.{table}.encoding "
                "to its encoding (e.g. latin-1 or cp1252) instead of raising the threshold."
            )
    message = "\n".join(
        [
            # the CLI prefixes "input gate stopped the run: "; the message does not repeat it
            "too many rows quarantined",
            *parts,
            *advice,
            "Every quarantined row and its reason is in the quarantine table"
            + (f" {quarantine_path}" if quarantine_path is not None else "")
            + "; fix the source data, or raise input_gate.max_quarantine_share if these rows may be dropped.",
        ]
    )
    raise QuarantineThresholdExceeded(message, result, over)
