"""Dataset loaders: MovieLens-100K from the installed recbole package, or bring-your-own files.

Loaders only read and rename; they never coerce values. Every value goes to the input gate as it
was in the source (CSV columns as strings) so that a bad value becomes a quarantine row with its
reason instead of a crash or a silent NULL. Two documented exceptions, both asked for in the config:
`dataset.implicit_ratings` values lose their rating (the interaction stays), and with
`split.mode: by_row_order` the interactions' `timestamp` is their row number in the file.

CSV files are read with pyarrow's streaming CSV reader in the table's dialect (delimiter, encoding,
quote, escape); the first 64 KiB are looked at first so that a wrong delimiter, encoding or a binary
file is named as such instead of surfacing as a parse error (docs/input-gate.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recaug.core.config import DatasetConfig, PipelineConfig, TableSource
from recaug.core.packaged import ml100k_dir
from recaug.schemas import ITEMS, REQUIRED_COLUMNS, USERS, INTERACTIONS
from recaug.schemas.input_gate import InputSchemaError, _decode_binary, _is_binary
from recaug.schemas.tables import ATTRIBUTE_PREFIX

TABLES = ("users", "items", "interactions")
_KNOWN_COLUMNS = {"users": USERS.names, "items": ITEMS.names, "interactions": INTERACTIONS.names}


@dataclass
class RawDataset:
    tables: dict[str, pa.Table]  # our column names, source types
    list_separator: str  # how a text genres column is split
    sources: dict[str, str]  # table -> where it came from (for reports)
    notes: dict[str, int] = field(default_factory=dict)  # e.g. implicit_ratings: rows whose rating meant "not rated"


def _read_recbole(path: Path, rename: dict[str, str]) -> pa.Table:
    # recbole atomic files: tab-separated, header "name:type"; read everything as text so the
    # gate sees exactly what the file holds.
    df = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None)
    df = df.rename({c: c.split(":", 1)[0] for c in df.columns})
    return df.select([pl.col(src).alias(dst) for src, dst in rename.items()]).to_arrow()


def load_ml100k() -> RawDataset:
    root = ml100k_dir()
    files = {t: root / f"ml-100k.{ext}" for t, ext in (("users", "user"), ("items", "item"), ("interactions", "inter"))}
    users = _read_recbole(
        files["users"],
        {"user_id": "user_id", "age": "age", "gender": "gender", "occupation": "occupation", "zip_code": "region"},
    )
    items = _read_recbole(
        files["items"],
        {"item_id": "item_id", "movie_title": "title", "release_year": "year", "class": "genres"},
    )
    interactions = _read_recbole(
        files["interactions"],
        {"user_id": "user_id", "item_id": "item_id", "rating": "rating", "timestamp": "timestamp"},
    )
    # The packaged item file has two known defects in the optional year: item 267 reads 'unkonwn'
    # and item 1412 'V' (a leftover of the original "(V)" title suffix). A year is optional, so for
    # this dataset they are read as unknown instead of quarantining the items and their ratings.
    items = pl.from_arrow(items).with_columns(
        pl.when(pl.col("year").str.contains(r"^\d{4}$")).then(pl.col("year")).otherwise(None).alias("year")
    ).to_arrow()
    # genres are space-separated tokens there ("Children's", "Sci-Fi" and "Film-Noir" have no spaces)
    return RawDataset(
        tables={"users": users, "items": items, "interactions": interactions},
        list_separator=" ",
        sources={t: str(p) for t, p in files.items()},
    )


def _source_path(table: str, src: TableSource, cfg: PipelineConfig) -> Path:
    """The data file, checked: missing, a directory, a symlink loop or unreadable each get their own
    message naming the config key, never a traceback."""
    key = f"dataset.{table}.path"
    try:
        path = cfg.resolve_path(src.path)
    except (RuntimeError, OSError) as exc:  # Path.resolve raises RuntimeError on a symlink loop
        raise InputSchemaError(f"{table}: {src.path} cannot be resolved ({exc}); fix {key}") from None
    if path.is_dir():
        raise InputSchemaError(f"{table}: {path} is a directory, not a file; set {key} to the data file itself")
    if not path.exists():
        given = Path(src.path).expanduser()
        if not given.is_absolute() and cfg.source_path:
            given = Path(cfg.source_path).parent / given
        if given.is_symlink():
            raise InputSchemaError(
                f"{table}: {given} is a symbolic link to nothing (its target {path} is missing); fix {key}"
            )
        raise InputSchemaError(f"{table}: file not found: {path}")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputSchemaError(
            f"{table}: {path} cannot be opened: {exc.strerror or exc} (check the file's permissions, or fix {key})"
        ) from None
    return path


def _read_source(table: str, src: TableSource, cfg: PipelineConfig) -> tuple[pa.Table, dict[str, int]]:
    """One source table with our column names (values as in the file) and counts of what the loader
    did to it (implicit ratings)."""
    path = _source_path(table, src, cfg)
    fmt = src.format or {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv"}.get(
        path.suffix.lower()
    )
    if fmt is None:
        raise InputSchemaError(f"{table}: cannot tell the format of {path}; set dataset.{table}.format to parquet or csv")
    separator = "\t" if path.suffix.lower() == ".tsv" and src.csv_delimiter == "," else src.csv_delimiter

    unknown = sorted(set(src.columns) - set(_KNOWN_COLUMNS[table]))
    if unknown:
        raise InputSchemaError(
            f"dataset.{table}.columns maps unknown column(s) {unknown}; ours are {list(_KNOWN_COLUMNS[table])}"
        )
    if fmt == "csv":
        header = _csv_header(table, path, src, separator)
    else:
        try:
            header = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as exc:
            raise InputSchemaError(f"{table}: cannot read {path} as parquet: {str(exc).strip().splitlines()[0]}") from None

    wanted = dict(src.columns)  # ours -> theirs
    taken = [ours for ours in _KNOWN_COLUMNS[table] if ours not in src.columns and ours in header]
    if table == "interactions" and cfg.split.mode == "by_row_order":
        # the row number is the order; a timestamp column in the file is not read
        wanted.pop("timestamp", None)
        taken = [c for c in taken if c != "timestamp"]
    attributes = dict(src.attributes)
    missing = sorted({theirs for theirs in [*wanted.values(), *attributes.values()] if theirs not in header})
    if missing:
        raise InputSchemaError(
            f"{table}: {path.name} has no column(s) {missing} named in dataset.{table}.columns/attributes; "
            f"its columns are {header}{_header_hint(table, header, fmt, src)}"
        )
    used = {*wanted.values(), *attributes.values(), *taken}
    dup = sorted({c for c in header if c in used and header.count(c) > 1})
    if dup:
        raise InputSchemaError(
            f"{table}: the header of {path} names column(s) {dup} more than once; rename the copies so that "
            "each column this table reads has one name (recaug will not guess which copy is meant)"
        )
    absent = [c for c in REQUIRED_COLUMNS[table] if c not in wanted and c not in taken
              and not (c == "timestamp" and cfg.split.mode == "by_row_order")]
    if absent:
        # name the file's own columns (not what was selected from them) and the likely cause
        why = ""
        if table == "interactions" and absent == ["timestamp"]:
            why = "; data without timestamps: set split.mode: by_row_order (docs/config.md)"
        raise InputSchemaError(
            f"{table}: required column(s) {absent} not found in {path}; map them with dataset.{table}.columns "
            f"(ours: theirs); the file has {header}{_header_hint(table, header, fmt, src) or why}"
        )

    columns = sorted(used, key=header.index)
    if fmt == "parquet":
        try:
            df = pl.read_parquet(path, columns=columns)
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise InputSchemaError(f"{table}: cannot read {path}: {str(exc).strip().splitlines()[0]}") from None
    else:
        df = pl.from_arrow(_read_csv(table, path, src, separator, columns))
        if isinstance(df, pl.Series):
            df = df.to_frame()

    # ours <- theirs; unmapped columns that already carry one of our names are taken as they are
    select = [pl.col(theirs).alias(ours) for ours, theirs in wanted.items()]
    select += [pl.col(ours) for ours in taken]
    select += [pl.col(theirs).cast(pl.String, strict=False).alias(f"{ATTRIBUTE_PREFIX}{name}") for name, theirs in attributes.items()]
    out = df.select(select)
    counts: dict[str, int] = {}
    if table == "interactions":
        if cfg.split.mode == "by_row_order":
            out = out.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("timestamp"))
        implicit = cfg.dataset.implicit_ratings
        if implicit and "rating" in out.columns:
            out, counts["implicit_ratings"] = _implicit_to_null(out, implicit)
    if table == "interactions" and src.timestamp_format and "timestamp" in out.columns and out["timestamp"].dtype == pl.String:
        # a parse failure stays the original string so the gate quarantines it with the value
        parsed = out["timestamp"].str.strptime(pl.Datetime("us", "UTC"), src.timestamp_format, strict=False)
        out = out.with_columns(
            pl.when(parsed.is_not_null())
            .then(parsed.dt.epoch("s").cast(pl.String))
            .otherwise(pl.col("timestamp"))
            .alias("timestamp")
        )
    return out.to_arrow(), counts


def _implicit_to_null(df: pl.DataFrame, implicit: list[float]) -> tuple[pl.DataFrame, int]:
    """Ratings that mean "interacted, not rated" lose their rating: the interaction stays, and is
    labelled and shown like any interaction without a rating (docs/config.md, implicit_ratings)."""
    r = pl.col("rating")
    value = r.cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False) if df["rating"].dtype == pl.String else r.cast(pl.Float64, strict=False)
    is_implicit = value.is_in([float(v) for v in implicit]).fill_null(False)
    n = int(df.select(is_implicit.sum()).item())
    return df.with_columns(pl.when(is_implicit).then(None).otherwise(r).alias("rating")), n


# how much of a CSV file is looked at before it is parsed (dialect, encoding, binary content)
_SNIFF_BYTES = 64 * 1024
_CANDIDATE_DELIMITERS = (";", "\t", "|", ",")


def _is_utf8(encoding: str) -> bool:
    import codecs

    return codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")


def _csv_header(table: str, path: Path, src: TableSource, separator: str) -> list[str]:
    """The header's column names, after checks on the first bytes that name the real cause of an
    unreadable file: empty, compressed or binary, UTF-16 read as something else, a header that is
    not in the configured encoding, or another delimiter than the configured one."""
    import codecs
    import csv

    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    enc_key = f"dataset.{table}.encoding"
    if not head:
        raise InputSchemaError(f"{table}: {path}: the file is empty (not even a header line)")
    is_utf16 = codecs.lookup(src.encoding).name.startswith("utf-16")
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") and not is_utf16:
        raise InputSchemaError(
            f"{table}: {path} is UTF-16 text (it starts with a UTF-16 byte-order mark), not {src.encoding}; "
            f"set {enc_key}: utf-16"
        )
    for magic, what, todo in (
        (b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip)"),
        (b"PK\x03\x04", "a zip archive", "unzip it and point the path at the CSV inside"),
        (b"PAR1", "a parquet file", f"set dataset.{table}.format: parquet"),
    ):
        if head.startswith(magic):
            raise InputSchemaError(f"{table}: {path} is {what}, not CSV text; {todo}")
    nul = head.count(b"\x00")
    if not is_utf16 and nul > len(head) // 4:
        odd = head[1::2].count(b"\x00") + head[0::2].count(b"\x00")
        if max(head[1::2].count(b"\x00"), head[0::2].count(b"\x00")) > 0.9 * odd and odd > len(head) // 3:
            raise InputSchemaError(
                f"{table}: {path} looks like UTF-16 text without a byte-order mark (every other byte is NUL); "
                f"set {enc_key}: utf-16-le (or utf-16-be)"
            )
        raise InputSchemaError(f"{table}: {path} holds binary data ({nul:,} NUL bytes in its first {len(head):,}), not CSV text")
    if not is_utf16:
        controls = sum(head.count(bytes([b])) for b in range(32) if b not in (9, 10, 13))
        if controls > len(head) // 10:
            raise InputSchemaError(
                f"{table}: {path} holds binary data ({controls:,} control bytes in its first {len(head):,}), not CSV text; "
                "is it compressed, or another format?"
            )
    text = head.decode(src.encoding, errors="replace") if is_utf16 else None
    if text is None:
        line_end = head.find(b"\n")
        raw_header = head if line_end < 0 else head[:line_end]
        try:
            text = raw_header.decode(src.encoding)
        except UnicodeDecodeError as exc:
            raise InputSchemaError(
                f"{table}: the header of {path} holds bytes that are not {src.encoding} "
                f"({raw_header[max(exc.start - 8, 0):exc.end + 8]!r}): "
                + (f"the header holds bytes that are not UTF-8; set {enc_key} to the file's encoding "
                   "(e.g. latin-1 or cp1252), or save the file as UTF-8"
                   if _is_utf8(src.encoding) else f"check {enc_key}")
            ) from None
    first = text.lstrip("\ufeff").splitlines()[0] if text.strip() else ""
    if not first.strip():
        raise InputSchemaError(f"{table}: {path}: the file is empty (not even a header line)")
    reader = csv.reader([first], delimiter=separator, quotechar=src.quote or '"', quoting=csv.QUOTE_MINIMAL if src.quote else csv.QUOTE_NONE,
                        escapechar=src.escape)
    names = next(reader, [])
    if len(names) == 1:
        hint = _delimiter_hint(table, names[0], separator)
        if hint:
            raise InputSchemaError(f"{table}: the header of {path} parses as one column {names[0][:80]!r} with csv_delimiter {separator!r}{hint}")
    return names


def _delimiter_hint(table: str, column: str, separator: str) -> str:
    counts = {sep: column.count(sep) for sep in _CANDIDATE_DELIMITERS if sep != separator}
    best = max(counts, key=lambda k: counts[k]) if counts else None
    if best is None or counts[best] == 0:
        return ""
    return f"; the header looks {best!r}-separated: set dataset.{table}.csv_delimiter to {best!r}"


def _read_csv(table: str, path: Path, src: TableSource, separator: str, columns: list[str]) -> pa.Table:
    """Columnar, multi-threaded read (pyarrow's CSV reader, which transcodes any encoding while it
    streams the file). Every column is read as bytes: in a UTF-8 file a value with invalid bytes
    reaches the input gate, which quarantines that row with its reason, instead of failing the file."""
    import pyarrow.csv as pacsv

    utf8 = _is_utf8(src.encoding)
    read_opts = pacsv.ReadOptions(encoding="utf8" if utf8 else src.encoding, block_size=8 << 20)
    parse_opts = pacsv.ParseOptions(
        delimiter=separator,
        quote_char=src.quote or False,
        escape_char=src.escape or False,
        double_quote=True,
        newlines_in_values=src.quote is not None,
    )
    convert_opts = pacsv.ConvertOptions(
        column_types={c: pa.binary() for c in columns},
        include_columns=columns,
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    try:
        table_ = pacsv.read_csv(path, read_options=read_opts, parse_options=parse_opts, convert_options=convert_opts)
    except UnicodeDecodeError as exc:
        raise InputSchemaError(f"{table}: cannot read {path}: {_encoding_problem(table, path, src) or exc}") from None
    except (pa.ArrowException, OSError) as exc:
        why = _csv_problem(table, path, src, separator)
        # pyarrow's own advice names pyarrow options, not ours: keep its first line only
        raise InputSchemaError(f"{table}: cannot read {path}: {why or str(exc).strip().splitlines()[0]}") from None
    cols = []
    for name in table_.column_names:
        col = table_.column(name)
        cols.append(_decode_binary(col) if _is_binary(col.type) else col)
    return pa.Table.from_arrays(cols, names=table_.column_names)


def _encoding_problem(table: str, path: Path, src: TableSource) -> str | None:
    """The line holding bytes the configured encoding cannot decode (error path only: reads the file)."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                raw.decode(src.encoding)
            except UnicodeDecodeError as exc:
                return (f"line {n} holds bytes that are not valid {src.encoding} ({raw[max(exc.start - 8, 0):exc.end + 8]!r}); "
                        f"set dataset.{table}.encoding to the file's real encoding (e.g. latin-1, cp1252, utf-8)")
    return None


def _csv_problem(table: str, path: Path, src: TableSource, separator: str) -> str | None:
    """Say which line breaks a CSV the reader refused, and the likely cause (error path only: it
    reads the file with Python's csv module in the same dialect)."""
    import csv

    with open(path, encoding=src.encoding, errors="replace", newline="") as fh:
        rows = csv.reader(fh, delimiter=separator, quotechar=src.quote or '"',
                          quoting=csv.QUOTE_MINIMAL if src.quote else csv.QUOTE_NONE, escapechar=src.escape)
        try:
            header = next(rows, None)
            if header is None:
                return "the file is empty (not even a header line)"
            for n, row in enumerate(rows):
                if len(row) != len(header) and row:
                    line = rows.line_num
                    return (f"data line {n} (0-based, after the header) has {len(row)} fields but the header has "
                            f"{len(header)} (line {line} of the file): {_ragged_cause(table, row, header, separator, src)}")
        except csv.Error as exc:
            return f"line {rows.line_num} of the file: {exc}"
    return None


def _ragged_cause(table: str, row: list[str], header: list[str], separator: str, src: TableSource) -> str:
    text = separator.join(row)
    if "\ufffd" in text or sum(ch < " " and ch not in "\t\n\r" for ch in text) > 2:
        return (f"the line holds binary or undecodable bytes; is the file really {src.encoding} CSV text? "
                f"(set dataset.{table}.encoding, or fix the file)")
    if src.quote and src.escape is None and f"\\{src.quote}" in text:
        return (f"it holds backslash-escaped quotes (\\{src.quote}): set dataset.{table}.escape: '\\' (YAML) "
                "(or double the quotes inside quoted values)")
    if len(row) < len(header):
        return "a missing field, or a line break inside an unquoted value? quote that value or fix the line"
    return f"a {separator!r} inside an unquoted value? quote that value or fix the line"


def _header_hint(table: str, columns: list[str], fmt: str, src: TableSource) -> str:
    """Why a header lacks our columns, when the header itself says: bytes that are not UTF-8
    (a Latin-1 or UTF-16 export), or a single column holding another delimiter."""
    if any("\ufffd" in c or "\x00" in c for c in columns):
        return f"; the header holds bytes that are not UTF-8: set dataset.{table}.encoding, or save the file as UTF-8"
    if fmt == "csv" and len(columns) == 1:
        return _delimiter_hint(table, columns[0], src.csv_delimiter)
    return ""


def load_files(cfg: PipelineConfig) -> RawDataset:
    ds: DatasetConfig = cfg.dataset
    tables, sources = {}, {}
    notes: dict[str, int] = {}
    for table in TABLES:
        src: TableSource = getattr(ds, table)
        tables[table], counts = _read_source(table, src, cfg)  # raises when a required column is absent
        notes.update(counts)
        sources[table] = str(_source_path(table, src, cfg))
    return RawDataset(tables=tables, list_separator=ds.items.list_separator, sources=sources, notes=notes)


def load_raw(cfg: PipelineConfig) -> RawDataset:
    if cfg.dataset.kind != "ml100k":
        return load_files(cfg)
    raw = load_ml100k()
    inter = pl.from_arrow(raw.tables["interactions"])
    if cfg.split.mode == "by_row_order":
        inter = inter.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("timestamp"))
    if cfg.dataset.implicit_ratings:
        inter, raw.notes["implicit_ratings"] = _implicit_to_null(inter, cfg.dataset.implicit_ratings)
    raw.tables["interactions"] = inter.to_arrow()
    return raw
