"""The input gate, run for real through great-expectations on small hand-built tables and on the
full MovieLens-100K files.

One dirty dataset holds one bad row per kind of fault at a known row; it is gated once (GX costs
about a second per run) and every check is asserted against that one result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import polars as pl
import pyarrow as pa
import pytest

from recaug.core.config import InputGateConfig
from recaug.core.packaged import ml100k_dir
from recaug.schemas.input_gate import (
    InputGateResult,
    InputSchemaError,
    QuarantineThresholdExceeded,
    enforce_threshold,
    run_input_gate,
)
from recaug.schemas.tables import INTERACTIONS, ITEMS, QUARANTINE, USERS, conform

AS_OF = 900_000_000  # 1998-07-09
CFG = InputGateConfig(max_text_chars=50, rating_min=1, rating_max=5, max_quarantine_share=1.0)


def _dirty_raw() -> dict[str, pa.Table]:
    """CSV-like raw tables: every value is text, as a loader hands them over."""
    users = pa.table(
        {
            "user_id": ["u1", "u2", None, "  ", "u1", "u\x01x", "u3", "u4"],
            "age": ["30", "x", "20", "20", "40", "20", "", "NA"],
            "gender": ["F", "M", "F", "F", "M", "F", "M", "F"],
        }
    )
    long_title = "T" * 51
    items = pa.table(
        {
            "item_id": ["i1", "i2", "i3", "i1", "i4", "i5", "i6", "i7", "i8", "i9", "i10"],
            # binary, as a parquet file without a string annotation would give it; row 7 is Latin-1
            "title": pa.array(
                [
                    b"Toy Story",
                    b"",
                    None,
                    b"Other",
                    long_title.encode(),
                    b"Short",
                    b"Half",
                    b"Caf\xe9",
                    b"Bad\x07Bell\r\nNext\tline",
                    b"Huge",
                    b"Fine",
                ],
                pa.binary(),
            ),
            "year": ["1995", "1990", "1990", "1990", "1990", "1990", "1995.5", "1990", "1990", "3000000000", ""],
            "genres": ["Animation|Comedy", "", None, "Drama", "Drama", "Drama", "Drama", "Drama", " Drama |", "Drama", "Drama"],
            "description": [None, None, None, None, None, "d" * 51, None, None, None, None, "ok \ufffd bytes"],
        }
    )
    ts = "881250949"
    interactions = pa.table(
        {
            "user_id": ["u1", "u1", "u1", "u4", "u3", "u3", "u3", "u1", "u2", "u1", None, "u1", "u3", "u4", "u1", "u1"],
            "item_id": ["i1", "i8", "i1", "i8", "i1", "i1", "i8", "nope", "i1", "i1", "i1", "i2", "i8", "i1", "i1", "nope2"],
            "rating": ["4", "abc", "4", "7", "3", "3", "3", "3", "3", "4", "3", "3", "", "5", "NA", "abc"],
            "timestamp": [
                ts, ts, "yesterday", ts, "-5", str(AS_OF + 2 * 86_400), str(AS_OF * 1000), ts, ts, ts, ts, ts, ts,
                "881250950.7", None, ts,
            ],
        }
    )
    return {"users": users, "items": items, "interactions": interactions}


@pytest.fixture(scope="module")
def dirty() -> InputGateResult:
    return run_input_gate(_dirty_raw(), CFG, as_of=AS_OF)


def _entries(result: InputGateResult, table: str) -> pl.DataFrame:
    return pl.from_arrow(result.quarantine).filter(pl.col("table") == table)


# (table, row_number, check, text the reason must contain)
BAD_ROWS = [
    ("users", 1, "age.type", "age 'x' is not a number"),
    ("users", 2, "user_id.not_null", "user_id is missing"),
    ("users", 3, "user_id.not_empty", "user_id is empty"),
    ("users", 4, "user_id.unique", "duplicate user_id 'u1' (first at row 0)"),
    ("users", 5, "user_id.control_chars", "user_id 'u\\x01x' contains control characters"),
    ("items", 1, "title.not_empty", "title is empty"),
    ("items", 2, "title.not_null", "title is missing"),
    ("items", 3, "item_id.unique", "duplicate item_id 'i1' (first at row 0)"),
    ("items", 4, "title.max_length", "title is 51 characters long, above input_gate.max_text_chars = 50"),
    ("items", 5, "description.max_length", "description is 51 characters long"),
    ("items", 6, "year.type", "year '1995.5' is not a whole number"),
    ("items", 7, "title.encoding", "title 'Caf\ufffd' has invalid UTF-8 bytes"),
    ("items", 9, "year.type", "year '3000000000' is out of range for int32"),
    ("items", 10, "description.encoding", "description 'ok \ufffd bytes' has invalid UTF-8 bytes"),
    ("interactions", 1, "rating.type", "rating 'abc' is not a number"),
    ("interactions", 2, "timestamp.type", "timestamp 'yesterday' is not a number (timestamps are unix seconds"),
    ("interactions", 3, "rating.range", "rating 7 is outside [1, 5]"),
    ("interactions", 4, "timestamp.range", "timestamp -5 (1969-12-31 23:59:55 UTC) is before input_gate.timestamp_min = 0"),
    ("interactions", 5, "timestamp.range", f"timestamp {AS_OF + 2 * 86_400} (1998-07-11 "),
    ("interactions", 6, "timestamp.range", "milliseconds? timestamps must be unix seconds"),
    ("interactions", 7, "item_id.in_items", "item_id 'nope' is not in items"),
    ("interactions", 8, "user_id.in_users", "user_id 'u2' is not in the clean users: its users row was quarantined (age.type at row 1)"),
    ("interactions", 9, "user_id+item_id+timestamp.unique",
     "duplicate interaction user_id 'u1', item_id 'i1', timestamp 881250949 (first at row 0)"),
    ("interactions", 10, "user_id.not_null", "user_id is missing"),
    ("interactions", 11, "item_id.in_items", "its items row was quarantined (title.not_empty at row 1)"),
    ("interactions", 14, "timestamp.not_null", "timestamp is missing"),
    ("interactions", 15, "rating.type", "rating 'abc' is not a number"),
    ("interactions", 15, "item_id.in_items", "item_id 'nope2' is not in items"),
]


@pytest.mark.parametrize("table,row,check,reason", BAD_ROWS, ids=[f"{t}-{r}-{c}" for t, r, c, _ in BAD_ROWS])
def test_every_kind_of_bad_row_is_quarantined_with_its_reason(dirty, table, row, check, reason):
    hits = _entries(dirty, table).filter((pl.col("row_number") == row) & (pl.col("check") == check))
    assert hits.height == 1, _entries(dirty, table)
    assert reason in hits["reason"][0], hits["reason"][0]
    # the record is the raw row as JSON, bytes shown with their escapes
    record = json.loads(hits["record"][0])
    raw = _dirty_raw()[table].slice(row, 1).to_pylist()[0]
    for column, value in raw.items():
        expected = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value
        assert record[column] == expected


def test_each_bad_row_reports_only_its_own_faults(dirty):
    expected = {(t, r, c) for t, r, c, _ in BAD_ROWS}
    got = {(t, r, c) for t, r, c in pl.from_arrow(dirty.quarantine).select("table", "row_number", "check").iter_rows()}
    assert got == expected
    assert dirty.quarantine.schema.equals(QUARANTINE, check_metadata=True)


def test_clean_rows_are_exactly_the_good_ones_conformed(dirty):
    assert dirty.tables["users"].schema.equals(USERS, check_metadata=True)
    assert dirty.tables["items"].schema.equals(ITEMS, check_metadata=True)
    assert dirty.tables["interactions"].schema.equals(INTERACTIONS, check_metadata=True)
    assert dirty.tables["users"].to_pylist() == [
        {"user_id": "u1", "age": 30, "gender": "F", "occupation": None, "region": None},
        {"user_id": "u3", "age": None, "gender": "M", "occupation": None, "region": None},
        {"user_id": "u4", "age": None, "gender": "F", "occupation": None, "region": None},
    ]
    assert dirty.tables["items"].to_pylist() == [
        {"item_id": "i1", "title": "Toy Story", "year": 1995, "genres": ["Animation", "Comedy"], "description": None},
        # control characters stripped from free text, newline and tab kept; genres trimmed
        {"item_id": "i8", "title": "BadBell\nNext\tline", "year": 1990, "genres": ["Drama"], "description": None},
    ]
    inter = dirty.tables["interactions"].to_pylist()
    assert inter == [
        {"user_id": "u1", "item_id": "i1", "rating": 4.0, "timestamp": 881250949},
        {"user_id": "u3", "item_id": "i8", "rating": None, "timestamp": 881250949},
        # fractional seconds are truncated
        {"user_id": "u4", "item_id": "i1", "rating": 5.0, "timestamp": 881250950},
    ]


def test_counts_and_expectations(dirty):
    users, items, inter = (dirty.counts[t] for t in ("users", "items", "interactions"))
    assert (users["rows_in"], users["rows_ok"], users["rows_quarantined"]) == (8, 3, 5)
    assert users["share"] == pytest.approx(5 / 8)
    assert users["by_check"] == {"age.type": 1, "user_id.control_chars": 1, "user_id.not_empty": 1, "user_id.not_null": 1, "user_id.unique": 1}
    assert (items["rows_in"], items["rows_ok"], items["rows_quarantined"]) == (11, 2, 9)
    assert items["by_check"]["year.type"] == 2
    assert items["sanitized"] == {"title.control_chars_stripped": 1}
    # row 15 fails two checks: two quarantine entries, one quarantined row
    assert (inter["rows_in"], inter["rows_ok"], inter["rows_quarantined"]) == (16, 3, 13)
    assert inter["by_check"]["item_id.in_items"] == 3 and inter["by_check"]["rating.type"] == 2
    assert sum(inter["by_check"].values()) == 14

    by_name = {(e["table"], e["check"]): e for e in dirty.expectations}
    unique = by_name[("users", "user_id.unique")]
    # GX counts every row of a duplicated id; the gate keeps the first and quarantines the rest
    assert unique["expectation"] == "expect_column_values_to_be_unique"
    assert (unique["success"], unique["unexpected_count"]) == (False, 2)
    ref = by_name[("interactions", "item_id.in_items")]
    assert (ref["expectation"], ref["column"], ref["unexpected_count"]) == ("expect_column_values_to_be_in_set", "item_id", 3)
    assert by_name[("interactions", "rating.range")]["expectation"] == "expect_column_values_to_be_between"
    assert by_name[("users", "user_id.not_null")]["expectation"] == "expect_column_values_to_not_be_null"
    assert all(set(e) >= {"table", "expectation", "column", "success", "unexpected_count"} for e in dirty.expectations)


def test_gating_in_blocks_of_rows_gives_the_whole_table_result(dirty, monkeypatch):
    """GX sees a million-row table a block of rows at a time (uniqueness on integer codes of the keys,
    all rows at once): blocks of 3 rows, with duplicates across blocks, give the one-block result."""
    import recaug.schemas.input_gate as input_gate

    monkeypatch.setattr(input_gate, "_GX_BLOCK", 3)
    blocked = run_input_gate(_dirty_raw(), CFG, as_of=AS_OF)
    assert blocked.quarantine.equals(dirty.quarantine)
    assert blocked.counts == dirty.counts
    assert blocked.expectations == dirty.expectations
    for table in ("users", "items", "interactions"):
        assert blocked.tables[table].equals(dirty.tables[table]), table


def test_summary_reads_as_a_table(dirty):
    text = dirty.summary()
    lines = text.splitlines()
    assert lines[0].startswith("input gate: 27 row(s) quarantined")
    row = next(line for line in lines if line.strip().startswith("interactions"))
    assert "16" in row and "13" in row and "81.25%" in row and "item_id.in_items (3)" in row
    assert "sanitized (kept, not quarantined): items.title.control_chars_stripped in 1 value(s)" in text
    assert "FAIL users" in text and "user_id.unique" in text


def test_threshold_stops_the_run_with_a_clear_message(dirty):
    share = max(c["share"] for c in dirty.counts.values())  # items: 9 of 11
    enforce_threshold(dirty, InputGateConfig(max_quarantine_share=share))  # equal to the share passes
    with pytest.raises(QuarantineThresholdExceeded) as err:
        enforce_threshold(dirty, InputGateConfig(max_quarantine_share=0.7))
    message = str(err.value)
    assert err.value.tables == ["items", "interactions"]
    assert "interactions: 81.25% of rows quarantined (13 of 16), above the threshold input_gate.max_quarantine_share = 70.00%" in message
    assert "items: 81.82% of rows quarantined (9 of 11)" in message
    assert "users:" not in message  # 62.5% is within the threshold
    assert "item_id.in_items: 3 row(s), e.g. item_id 'nope' is not in items" in message
    assert "raise input_gate.max_quarantine_share" in message
    assert err.value.result is dirty


def test_missing_required_column_is_a_schema_error():
    raw = _dirty_raw()
    raw["items"] = raw["items"].drop_columns(["title"]).append_column("name", pa.array(["x"] * raw["items"].num_rows))
    with pytest.raises(InputSchemaError) as err:
        run_input_gate(raw, CFG, as_of=AS_OF)
    message = str(err.value)
    assert "items: required column(s) ['title'] missing" in message
    assert "['item_id', 'year', 'genres', 'description', 'name']" in message
    assert "dataset.items.columns" in message


def test_empty_or_absent_table_is_a_schema_error():
    raw = _dirty_raw()
    raw["interactions"] = raw["interactions"].slice(0, 0)
    with pytest.raises(InputSchemaError, match="interactions: the table has no rows"):
        run_input_gate(raw, CFG, as_of=AS_OF)
    raw = _dirty_raw()
    del raw["users"]
    with pytest.raises(InputSchemaError, match=r"missing: \['users'\]"):
        run_input_gate(raw, CFG, as_of=AS_OF)


def test_source_types_are_conformed_and_separators_honoured(capfd):
    """Ids as ints and integral floats, timestamps as floats / datetimes, genres as lists or text on
    a custom separator, numbers that mean 'missing', absent optional columns."""
    users = pa.table({"user_id": pa.array([1, 2], pa.int64()), "age": pa.array([30.0, float("nan")])})
    items = pa.table(
        {
            "item_id": pa.array([42, 7], pa.int32()),
            "title": ["A", "B"],
            "genres": pa.array([["Drama", " War "], None], pa.list_(pa.large_string())),
        }
    )
    inter = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "item_id": pa.array([42.0, 7.0]),  # a float id column, as a NaN-holding export gives
            "rating": pa.array([5, 3], pa.int8()),
            "timestamp": pa.array([881250949_000_000, 881250950_000_000], pa.timestamp("us", tz="UTC")),
        }
    )
    result = run_input_gate({"users": users, "items": items, "interactions": inter}, CFG, as_of=AS_OF)
    assert result.quarantine.num_rows == 0, result.quarantine.to_pylist()
    assert result.tables["users"].to_pylist() == [
        {"user_id": "1", "age": 30, "gender": None, "occupation": None, "region": None},
        {"user_id": "2", "age": None, "gender": None, "occupation": None, "region": None},
    ]
    assert result.tables["items"].column("genres").to_pylist() == [["Drama", "War"], None]
    assert result.tables["items"].column("item_id").to_pylist() == ["42", "7"]
    assert result.tables["interactions"].to_pylist() == [
        {"user_id": "1", "item_id": "42", "rating": 5.0, "timestamp": 881250949},
        {"user_id": "2", "item_id": "7", "rating": 3.0, "timestamp": 881250950},
    ]
    # GX's progress bars and logs are silenced
    out, err = capfd.readouterr()
    assert "Calculating Metrics" not in out + err

    text_genres = items.set_column(2, "genres", pa.array(["Drama; War;;", "Comedy"]))
    result = run_input_gate(
        {"users": users, "items": text_genres, "interactions": inter}, CFG, as_of=AS_OF, list_separator=";"
    )
    assert result.tables["items"].column("genres").to_pylist() == [["Drama", "War"], ["Comedy"]]


def test_gx_runs_offline_without_any_network_attempt(tmp_path):
    """In a fresh interpreter (so the GX import itself is covered), every socket connect and DNS
    lookup is recorded and refused while the gate runs."""
    script = textwrap.dedent(
        """
        import os, socket, sys
        os.environ.pop("GX_ANALYTICS_ENABLED", None)  # the gate must set it itself
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
            raise OSError("network disabled in this test")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.getaddrinfo = refuse
        socket.create_connection = refuse
        import pyarrow as pa
        from recaug.core.config import InputGateConfig
        from recaug.schemas.input_gate import run_input_gate
        raw = {
            "users": pa.table({"user_id": ["u1"]}),
            "items": pa.table({"item_id": ["i1"], "title": ["T"]}),
            "interactions": pa.table({"user_id": ["u1", "u9"], "item_id": ["i1", "i1"], "timestamp": [5, 6]}),
        }
        result = run_input_gate(raw, InputGateConfig(), as_of=10)
        assert os.environ["GX_ANALYTICS_ENABLED"] == "False"
        sys.stderr.write(f"ATTEMPTS={attempts!r} QUARANTINED={result.quarantine.num_rows}\\n")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ATTEMPTS=[] QUARANTINED=1" in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert "Calculating Metrics" not in proc.stderr


def _read_recbole(path, rename):
    df = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None)
    df = df.rename({c: c.split(":", 1)[0] for c in df.columns})
    return df.rename(rename).to_arrow()


def test_full_movielens_100k():
    """The packaged ML-100K files, read as text. Two items have a release year that is not a year
    ('unkonwn' for item 267 and 'V' for item 1412, a fragment of the original "(V)" title suffix);
    the gate quarantines those two and the 15 ratings that point at them, and nothing else."""
    root = ml100k_dir()
    raw = {
        "users": _read_recbole(root / "ml-100k.user", {"zip_code": "region"}),
        "items": _read_recbole(root / "ml-100k.item", {"movie_title": "title", "release_year": "year", "class": "genres"}),
        "interactions": _read_recbole(root / "ml-100k.inter", {}),
    }
    result = run_input_gate(raw, InputGateConfig(), list_separator=" ")
    enforce_threshold(result, InputGateConfig())  # within the default 1%

    assert result.counts["users"]["rows_ok"] == 943 and result.counts["users"]["rows_quarantined"] == 0
    q = pl.from_arrow(result.quarantine)
    items_q = q.filter(pl.col("table") == "items")
    assert items_q.select("row_number", "check", "reason").rows() == [
        (266, "year.type", "year 'unkonwn' is not a number"),
        (1411, "year.type", "year 'V' is not a number"),
    ]
    assert result.counts["items"]["rows_ok"] == 1_680
    inter_q = q.filter(pl.col("table") == "interactions")
    assert set(inter_q["check"]) == {"item_id.in_items"}
    assert inter_q.height == 15
    referenced = {json.loads(r)["item_id"] for r in inter_q["record"]}
    assert referenced == {"267", "1412"}
    assert pl.from_arrow(raw["interactions"]).filter(pl.col("item_id").is_in(["267", "1412"])).height == 15
    assert result.counts["interactions"]["rows_ok"] == 100_000 - 15

    items = pl.from_arrow(result.tables["items"])
    toy = items.filter(pl.col("item_id") == "1").row(0, named=True)
    assert toy == {"item_id": "1", "title": "Toy Story", "year": 1995, "genres": ["Animation", "Children's", "Comedy"], "description": None}
    inter = result.tables["interactions"]
    assert inter.schema.equals(INTERACTIONS, check_metadata=True)
    assert conform(inter, INTERACTIONS).equals(inter)
    assert pl.from_arrow(inter).select(pl.col("timestamp").min().alias("first"), pl.col("timestamp").max().alias("last")).row(0) == (874724710, 893286638)


@pytest.mark.parametrize("timestamp_format, advice", [
    (None, "set dataset.interactions.timestamp_format"),
    ("%Y-%m-%d", "does not match dataset.interactions.timestamp_format '%Y-%m-%d'"),
])
def test_a_bad_timestamp_gets_advice_that_fits_the_config(timestamp_format, advice):
    """Without a format the advice is to set one; with a format that a value does not match, the advice
    is about that mismatch, never 'set timestamp_format' when it is set."""
    users = pa.table({"user_id": ["1"]})
    items = pa.table({"item_id": ["7"], "title": ["A"]})
    inter = pa.table({"user_id": ["1", "1"], "item_id": ["7", "7"], "timestamp": ["881250949", "last tuesday"]})
    result = run_input_gate({"users": users, "items": items, "interactions": inter}, CFG, as_of=AS_OF,
                            timestamp_format=timestamp_format)
    reasons = [r["reason"] for r in result.quarantine.to_pylist() if r["check"] == "timestamp.type"]
    assert len(reasons) == 1 and advice in reasons[0], reasons
    assert ("set dataset.interactions.timestamp_format" in reasons[0]) == (timestamp_format is None)
