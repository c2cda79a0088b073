"""The output gate: great-expectations checks on embedding tables before anything is published.

GX has no expectations over vectors, so the gate derives scalar columns first and lets GX judge
those (docs/architecture.md, "Data flow"):

  per embedding row   dim, nan_or_inf (count of non-finite components), l2_norm (over the finite
                      components), (augmenter, entity_id) uniqueness and non-null ids
  per generated row   text_chars (length of the encoded text)
  per augmenter       coverage          = share of the expected entities that have a vector
                      parse_rate        = generated rows / (generated + dead-letter rows)
                      dead_letter_share = dead-lettered entities / expected entities
                      text_rejected_share = entities whose answer a text check rejected (prompt
                                        echo, contradiction with the record, identical answers;
                                        see `TextChecks` below) / expected entities
                      missing_metadata  = EMBEDDING_METADATA_KEYS absent from the table's schema

Row-level frames go to GX a block of rows at a time (`_GX_BLOCK`), so the gate's memory does not grow
with the catalogue beyond these derived columns; uniqueness, which needs every row at once, is judged
on integer codes of the ids.

Thresholds come from `OutputGateConfig`. The result lists every expectation with its observed value;
`success` is False if any failed, which callers turn into "publish nothing, exit non-zero". GX runs
with an ephemeral context (nothing written to disk) and analytics off.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recaug.core.config import OutputGateConfig
from recaug.core.memory import release_memory
from recaug.core.errors import NothingPublished
from recaug.core.sentences import LOOP_REPEATS, repeated_run, split_sentences
from recaug.schemas.tables import EMBEDDING_METADATA_KEYS


class OutputGateFailed(NothingPublished, RuntimeError):
    def __init__(self, result: "OutputGateResult"):
        super().__init__(result.summary())
        self.result = result


@dataclass
class GateInput:
    """One augmenter's outputs. `expected_entities` = ids that should have a vector; when None,
    the entities the augmenter attempted (generated + dead-letter ids) are expected."""

    augmenter: str
    embeddings: pa.Table
    generated: pa.Table | None = None
    dead_letter: pa.Table | None = None
    expected_entities: Sequence[str] | pa.Array | pa.ChunkedArray | None = None
    expected_dim: int | None = None  # default: the table's recaug.dim metadata


@dataclass
class GateCheck:
    name: str  # ours, stable: what the summary and tests refer to
    expectation: str  # the GX expectation type
    column: str
    success: bool
    unexpected_count: int
    threshold: str
    observed: str
    detail: str = ""  # which augmenters failed


@dataclass
class OutputGateResult:
    success: bool
    checks: list[GateCheck]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # augmenter -> derived table-level values

    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.success]

    def check(self, name: str) -> GateCheck:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no gate check {name!r}; checks are {[c.name for c in self.checks]}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for the snapshot manifest and the run report."""
        return {"success": self.success, "checks": [asdict(c) for c in self.checks], "metrics": self.metrics}

    def raise_for_failure(self) -> None:
        if not self.success:
            raise OutputGateFailed(self)

    def summary(self) -> str:
        head = "output gate PASSED" if self.success else f"output gate FAILED: {len(self.failed())} of {len(self.checks)} checks"
        lines = [head]
        width = max(len(c.name) for c in self.checks) if self.checks else 10
        for c in self.checks:
            mark = "ok  " if c.success else "FAIL"
            line = f"  {mark} {c.name:<{width}}  {c.column:<19} expected {c.threshold:<14} observed {c.observed}"
            if not c.success:
                line += f"  ({c.unexpected_count} unexpected{'; ' + c.detail if c.detail else ''})"
            lines.append(line)
        if not self.success:
            lines.append("nothing is published while a check fails; fix the cause or adjust output_gate in the config")
        return "\n".join(lines)


# --- derived scalar columns -------------------------------------------------------------------------


def _metadata(table: pa.Table) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}


# rows per block of the vector statistics: a copy of every vector in float64 (and its square) cost
# 16 bytes per component of the whole table at once, ~6 KB per row for 384-d vectors
_STATS_BLOCK = 65_536


def _vector_stats(table: pa.Table) -> tuple[int, np.ndarray, np.ndarray]:
    """(dim, non-finite count per row, L2 norm over the finite components per row), a block of rows
    at a time so the working copies stay a block's size."""
    from recaug.schemas.vectors import vectors_numpy

    field_type = table.schema.field("vector").type
    if not pa.types.is_fixed_size_list(field_type):
        raise TypeError(f"embedding column 'vector' must be fixed_size_list<float32>[d], got {field_type}")
    n = table.num_rows
    bad = np.zeros(n, dtype=np.int64)
    norms = np.zeros(n, dtype=np.float64)
    column = table.column("vector")
    for start in range(0, n, _STATS_BLOCK):
        vectors = vectors_numpy(column.slice(start, _STATS_BLOCK))  # null rows come back as NaN rows: non-finite
        finite = np.isfinite(vectors)
        stop = start + len(vectors)
        bad[start:stop] = (~finite).sum(axis=1)
        clean = np.where(finite, vectors, 0.0).astype(np.float64)
        norms[start:stop] = np.sqrt(np.einsum("ij,ij->i", clean, clean))
    return field_type.list_size, bad, norms


def _ids(values: Any) -> pa.Array:
    """Distinct ids as an Arrow string array: set arithmetic on a million ids as Python sets of str
    cost ~400 MB; Arrow's is_in does it in the columns."""
    if values is None:
        return pa.array([], pa.string())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(list(values))
    return pc.unique(values.cast(pa.string()))


def _count_in(values: pa.Array, value_set: pa.Array) -> int:
    if len(values) == 0 or len(value_set) == 0:
        return 0
    return int(pc.sum(pc.is_in(values, value_set=value_set)).as_py() or 0)


# rows per frame handed to GX: row-level checks are validated block by block (GX copies the columns it
# checks, so one frame of a million rows cost ~450 MB on top of the tables)
_GX_BLOCK = 250_000


@dataclass
class _Rows:
    """One value per embedding row (or generated row), all augmenters end to end; `code` indexes
    `names` (the augmenter of the row)."""

    names: list[str]
    code: np.ndarray  # int16
    columns: dict[str, Any]  # name -> numpy array, or an Arrow array for string columns

    def __len__(self) -> int:
        return len(self.code)

    def frames(self, block: int):
        """pandas frames of at most `block` rows, indexed by row number in the whole."""
        import pandas as pd

        categories = pd.CategoricalDtype(self.names)
        for start in range(0, len(self), block):
            stop = min(start + block, len(self))
            cols = {"augmenter": pd.Categorical.from_codes(self.code[start:stop], dtype=categories)}
            for name, values in self.columns.items():
                if isinstance(values, (pa.Array, pa.ChunkedArray)):
                    # Arrow-backed strings: a million ids as Python str objects cost ~80 MB more
                    cols[name] = values.slice(start, stop - start).to_pandas(types_mapper=pd.ArrowDtype)
                    cols[name].index = pd.RangeIndex(start, stop)
                else:
                    cols[name] = values[start:stop]
            yield pd.DataFrame(cols, index=pd.RangeIndex(start, stop))

    def failing(self, mask: np.ndarray) -> str:
        """Which augmenters hold the rows in `mask`, most first."""
        if not mask.any():
            return ""
        counts = np.bincount(self.code[mask], minlength=len(self.names))
        order = sorted((i for i in range(len(self.names)) if counts[i]), key=lambda i: (-counts[i], self.names[i]))
        return "in " + ", ".join(f"{self.names[i]} ({counts[i]})" for i in order)


def _rows(names: list[str], parts: list[dict[str, Any]]) -> _Rows:
    if not parts:
        return _Rows(names, np.zeros(0, np.int16), {})
    code = np.concatenate([np.full(len(next(iter(p.values()))), i, np.int16) for i, p in enumerate(parts)])
    columns = {}
    for name in parts[0]:
        values = [p[name] for p in parts]
        if isinstance(values[0], (pa.Array, pa.ChunkedArray)):
            chunks = [c for v in values for c in (v.chunks if isinstance(v, pa.ChunkedArray) else [v])]
            columns[name] = pa.chunked_array(chunks, values[0].type)
        else:
            columns[name] = np.concatenate(values)
    return _Rows(names, code, columns)


def _id_codes(ids: pa.ChunkedArray) -> np.ndarray:
    """A small integer per distinct id (null is one value too), so GX judges uniqueness on integers
    instead of a frame of a million strings."""
    encoded = pc.dictionary_encode(ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids, null_encoding="encode")
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _derive(inputs: Sequence[GateInput]):
    """(embedding rows, id rows, generated-text rows, per-augmenter summary frame)."""
    import pandas as pd

    row_parts, id_parts, text_parts, text_names, summary_rows = [], [], [], [], []
    for inp in inputs:
        emb = inp.embeddings
        meta = _metadata(emb)
        dim, bad, norms = _vector_stats(emb)
        expected_dim = inp.expected_dim if inp.expected_dim is not None else int(meta.get("recaug.dim", dim))
        n = emb.num_rows
        ids = emb.column("entity_id").cast(pa.string())
        row_parts.append({
            "entity_id": ids,
            "dim": np.full(n, dim, dtype=np.int64),
            "expected_dim": np.full(n, expected_dim, dtype=np.int64),
            "nan_or_inf": bad,
            "l2_norm": norms,
        })
        id_parts.append({"entity_id": _id_codes(ids)})
        if inp.generated is not None:
            text_names.append(inp.augmenter)
            text_parts.append({
                # lengths first, then 0 for a null text (filling the texts would copy every text)
                "text_chars": pc.fill_null(pc.utf8_length(inp.generated.column("text")), 0).to_numpy(zero_copy_only=False).astype(np.int64),
            })
        generated_rows = inp.generated.num_rows if inp.generated is not None else n
        dead_rows = inp.dead_letter.num_rows if inp.dead_letter is not None else 0
        dead_ids = _ids(inp.dead_letter.column("entity_id") if inp.dead_letter is not None else None)
        if inp.expected_entities is not None:
            expected = _ids(inp.expected_entities)
        else:
            attempted = inp.generated.column("entity_id") if inp.generated is not None else emb.column("entity_id")
            expected = _ids(pa.chunked_array([_ids(attempted), dead_ids], pa.string()))
        present = _ids(emb.column("entity_id"))
        text_rejected = 0
        if inp.dead_letter is not None and inp.dead_letter.num_rows:
            by_text = pc.starts_with(inp.dead_letter.column("reason"), TEXT_REASON_PREFIX)
            text_rejected = _count_in(_ids(inp.dead_letter.column("entity_id").filter(by_text)), expected)
        summary_rows.append(
            {
                "augmenter": inp.augmenter,
                "rows": n,
                "expected_entities": len(expected),
                "coverage": _count_in(expected, present) / len(expected) if len(expected) else 1.0,
                "parse_rate": generated_rows / (generated_rows + dead_rows) if generated_rows + dead_rows else 1.0,
                "dead_letter_share": (_count_in(dead_ids, expected) / len(expected) if len(expected)
                                      else (1.0 if len(dead_ids) else 0.0)),
                "text_rejected_share": text_rejected / len(expected) if len(expected) else 0.0,
                "missing_metadata": sum(1 for k in EMBEDDING_METADATA_KEYS if not meta.get(k)),
                "missing_metadata_keys": ",".join(k for k in EMBEDDING_METADATA_KEYS if not meta.get(k)),
            }
        )
    names = [inp.augmenter for inp in inputs]
    rows = _rows(names, row_parts)
    id_rows = _rows(names, id_parts)
    texts = _rows(text_names, text_parts) if text_parts else None
    return rows, id_rows, texts, pd.DataFrame(summary_rows)


# --- the gate ----------------------------------------------------------------------------------------


def _gx():
    # analytics off before great_expectations is imported: the pipeline runs offline
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return gx, ctx


def _fmt(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _failing(frame, mask) -> str:
    if not mask.any():
        return ""
    counts = frame.loc[mask, "augmenter"].value_counts()
    return "in " + ", ".join(f"{a} ({c})" for a, c in counts.items())


def _duplicated(id_rows: _Rows) -> np.ndarray:
    """True on every row whose (augmenter, entity_id) another row shares (pandas keep=False)."""
    if not len(id_rows):
        return np.zeros(0, bool)
    key = id_rows.code.astype(np.int64) << 40 | id_rows.columns["entity_id"]
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    return counts[inverse] > 1


def _result_key(kind: str, kwargs: dict[str, Any]) -> tuple:
    """Which expectation a result belongs to: its type and the column(s) it looked at."""
    cols = kwargs.get("column") or kwargs.get("column_list") or (kwargs.get("column_A"), kwargs.get("column_B"))
    return kind, tuple(cols) if isinstance(cols, (list, tuple)) else cols


def run_output_gate(inputs: Iterable[GateInput] | GateInput, cfg: OutputGateConfig) -> OutputGateResult:
    """Validate every augmenter's embedding table (and its generated / dead-letter tables)."""
    inputs = [inputs] if isinstance(inputs, GateInput) else list(inputs)
    if not inputs:
        raise ValueError("the output gate needs at least one augmenter's tables")
    names = [i.augmenter for i in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"augmenter listed twice in the gate inputs: {sorted({n for n in names if names.count(n) > 1})}")
    rows, id_rows, texts, summary = _derive(inputs)
    release_memory()  # the blocks of vector statistics
    gx, ctx = _gx()
    E = gx.expectations
    source = ctx.data_sources.add_pandas("recaug_output")

    # (frame name, frames (row blocks), [(our name, column, expectation, threshold text, observed text, failing detail)])
    plans = []
    r = rows.columns
    some = len(rows) > 0
    dim_mask = r["dim"] != r["expected_dim"]
    bad_mask = r["nan_or_inf"] != 0
    norm_mask = (r["l2_norm"] < cfg.min_norm) | (r["l2_norm"] > cfg.max_norm)
    null_mask = r["entity_id"].is_null().to_numpy(zero_copy_only=False)
    dup = _duplicated(id_rows)
    plans.append(
        (
            "embedding_rows",
            rows.frames(_GX_BLOCK),
            [
                ("vector_dim", "dim", E.ExpectColumnPairValuesToBeEqual(column_A="dim", column_B="expected_dim"),
                 "== " + "/".join(map(str, np.unique(r["expected_dim"]))) if some else "== d",
                 "/".join(map(str, np.unique(r["dim"]))) if some else "-", rows.failing(dim_mask)),
                ("no_nan_or_inf", "nan_or_inf", E.ExpectColumnValuesToBeBetween(column="nan_or_inf", min_value=0, max_value=0),
                 "0", f"max {int(r['nan_or_inf'].max()) if some else 0}", rows.failing(bad_mask)),
                ("l2_norm_range", "l2_norm",
                 E.ExpectColumnValuesToBeBetween(column="l2_norm", min_value=cfg.min_norm, max_value=cfg.max_norm),
                 f"[{cfg.min_norm:g}, {cfg.max_norm:g}]",
                 f"[{_fmt(float(r['l2_norm'].min()))}, {_fmt(float(r['l2_norm'].max()))}]" if some else "-",
                 rows.failing(norm_mask)),
                ("entity_id_not_null", "entity_id", E.ExpectColumnValuesToNotBeNull(column="entity_id"),
                 "no nulls", f"{int(null_mask.sum())} null", rows.failing(null_mask)),
            ],
        )
    )
    plans.append(
        (
            # uniqueness needs every row at once: ids as integers, not strings, keep that frame small
            "embedding_ids",
            id_rows.frames(max(len(id_rows), 1)),
            [
                ("entity_id_unique", "augmenter+entity_id",
                 E.ExpectCompoundColumnsToBeUnique(column_list=["augmenter", "entity_id"]),
                 "unique", f"{int(dup.sum())} rows share an id", id_rows.failing(dup)),
            ],
        )
    )
    if texts is not None:
        chars = texts.columns["text_chars"]
        plans.append(
            (
                "generated_texts",
                texts.frames(_GX_BLOCK),
                [
                    ("text_length", "text_chars",
                     E.ExpectColumnValuesToBeBetween(column="text_chars", min_value=cfg.min_text_chars, max_value=cfg.max_text_chars),
                     f"[{cfg.min_text_chars}, {cfg.max_text_chars}]",
                     f"[{int(chars.min())}, {int(chars.max())}]" if len(texts) else "-",
                     texts.failing((chars < cfg.min_text_chars) | (chars > cfg.max_text_chars))),
                ],
            )
        )
    s = summary
    # per-augmenter floors (global unless output_gate.augmenters overrides them), judged row by row
    for key in ("min_coverage", "min_parse_rate", "max_dead_letter_share", "max_text_rejected_share"):
        s[key] = [cfg.floor(a, key) for a in s["augmenter"]] if len(s) else []

    def floors(key: str, op: str) -> str:
        special = {a: cfg.floor(a, key) for a in s["augmenter"] if cfg.floor(a, key) != getattr(cfg, key)}
        extra = "".join(f"; {a}: {op} {v:g}" for a, v in sorted(special.items()))
        return f"{op} {getattr(cfg, key):g}{extra}"

    plans.append(
        (
            "augmenter_summary",
            [s],
            [
                ("coverage", "coverage",
                 E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="coverage", column_B="min_coverage", or_equal=True),
                 floors("min_coverage", ">="), f"min {_fmt(float(s['coverage'].min()))}",
                 _failing(s, s["coverage"] < s["min_coverage"])),
                ("parse_rate", "parse_rate",
                 E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="parse_rate", column_B="min_parse_rate", or_equal=True),
                 floors("min_parse_rate", ">="), f"min {_fmt(float(s['parse_rate'].min()))}",
                 _failing(s, s["parse_rate"] < s["min_parse_rate"])),
                ("dead_letter_share", "dead_letter_share",
                 E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="max_dead_letter_share", column_B="dead_letter_share", or_equal=True),
                 floors("max_dead_letter_share", "<="), f"max {_fmt(float(s['dead_letter_share'].max()))}",
                 _failing(s, s["dead_letter_share"] > s["max_dead_letter_share"])),
                ("text_checks", "text_rejected_share",
                 E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="max_text_rejected_share", column_B="text_rejected_share", or_equal=True),
                 floors("max_text_rejected_share", "<="), f"max {_fmt(float(s['text_rejected_share'].max()))}",
                 _failing(s, s["text_rejected_share"] > s["max_text_rejected_share"])),
                ("metadata_complete", "missing_metadata",
                 E.ExpectColumnValuesToBeBetween(column="missing_metadata", min_value=0, max_value=0),
                 "0 missing", ", ".join(sorted({k for v in s["missing_metadata_keys"] for k in v.split(",") if k})) or "0 missing",
                 _failing(s, s["missing_metadata"] > 0)),
            ],
        )
    )

    checks: list[GateCheck] = []
    for frame_name, frames, specs in plans:
        outcome = _validate_blocks(gx, ctx, source, frame_name, frames, specs)
        for (name, column, _, threshold, observed, detail), (kind, success, unexpected) in zip(specs, outcome):
            checks.append(GateCheck(name=name, expectation=kind, column=column, success=success,
                                    unexpected_count=unexpected, threshold=threshold, observed=observed, detail=detail))
    metrics = {
        r["augmenter"]: {k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items() if k != "augmenter"}
        for r in summary.to_dict("records")
    }
    return OutputGateResult(success=all(c.success for c in checks), checks=checks, metrics=metrics)


def _validate_blocks(gx, ctx, source, frame_name: str, frames, specs) -> list[tuple[str, bool, int]]:
    """Run one suite over every block frame; per expectation (type, passed in every block, unexpected
    rows summed over the blocks), in the order of `specs`."""
    asset = source.add_dataframe_asset(frame_name)
    definition = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"recaug_output_{frame_name}"))
    for _, _, expectation, *_ in specs:
        suite.add_expectation(expectation)
    totals = [[expectation.expectation_type, True, 0] for _, _, expectation, *_ in specs]
    for frame in frames:
        validation = definition.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
        by_key = {_result_key(res.expectation_config.type, res.expectation_config.kwargs): res for res in validation.results}
        for total, (name, _, expectation, *_) in zip(totals, specs):
            res = by_key[_result_key(expectation.expectation_type, expectation.configuration.kwargs)]
            if res.exception_info and res.exception_info.get("raised_exception"):
                raise RuntimeError(f"output gate check {name} could not run: {res.exception_info.get('exception_message')}")
            total[0] = res.expectation_config.type
            total[1] = total[1] and bool(res.success)
            total[2] += int((res.result or {}).get("unexpected_count") or 0)
        del frame, validation, by_key
        release_memory()
    return [tuple(t) for t in totals]


# --- text checks: what a vector cannot show ---------------------------------------------------------
#
# A parse rate of 100% said nothing about answers such as "Introduce this item: ..." (the prompt
# repeated), one text given for many different entities, or "released in 1987" for a 1995 film. These
# checks run on each free-text answer as it is parsed (echo, contradiction) and on an augmenter's
# whole output (identical answers); a rejected answer becomes a dead letter whose reason starts with
# TEXT_REASON_PREFIX, and `max_text_rejected_share` stops publication when too many were rejected.

TEXT_REASON_PREFIX = "text check: "


@functools.lru_cache(maxsize=1)
def text_checks_fingerprint() -> str:
    """A hash of the per-answer checks' code (this module and core/sentences.py, constants included):
    a later run takes over a dead letter only if it was judged by the same code (PreviousOutputs in
    pipelines/augment.py). Any edit of either file re-checks every dead letter once, which is cheap."""
    from recaug.core import sentences

    h = hashlib.sha256()
    for module in (sys.modules[__name__], sentences):
        try:
            h.update(inspect.getsource(module).encode("utf-8"))
        except (OSError, TypeError):  # no source shipped: never the same twice, so nothing is taken over
            h.update(os.urandom(16))
    return h.hexdigest()[:16]


_ECHO_PREFIX_CHARS = 40  # how much of an answer's first line is compared with the prompt
_ECHO_MIN_CHARS = 10  # a shorter first line is left alone (a short title may legitimately repeat)
_YEAR_WORDS = (r"(?:released|published|premiered|came out|debuted|appeared|first (?:shown|aired|published|released))"
               r"(?:\s+\w+){0,3}?\s+in\s+(\d{4})\b")
_YEAR_PATTERN = re.compile(_YEAR_WORDS, re.IGNORECASE)


@dataclass(frozen=True)
class TextChecks:
    max_identical_answers: int = 3

    @classmethod
    def from_config(cls, cfg: OutputGateConfig) -> "TextChecks":
        return cls(max_identical_answers=cfg.max_identical_answers)


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


# words an answer may wrap a title in and still say nothing else ("The movie, titled "Heat"")
_TITLE_WRAPPING = frozenset(
    "a an the this that is it its titled called named entitled title movie movies film films book books "
    "article articles news story item items".split())
_WORD = re.compile(r"[^\W_]+")


def prompt_echo(answer: str, messages: Sequence[dict[str, str]], title: str | None = None) -> str | None:
    """The reason when an answer begins by repeating the prompt (its first line, up to 40 characters,
    occurs in a user message: "Describe the movie below..." or "Title: Heat"), says nothing but the
    item's title ("That Darn Cat!", "The movie Shall We Dance?"), or only asks questions (the
    prompt's own closing one, reworded), else None. A first line that is only the item's title (a
    heading, "**Heat**") is not an echo: the next line is judged."""
    words = _WORD.findall(answer.lower())
    if title and words and set(words) <= set(_WORD.findall(title.lower())) | _TITLE_WRAPPING:
        return f"{TEXT_REASON_PREFIX}prompt echo: the answer says nothing but the title"
    sentences, rest = split_sentences(answer)
    if sentences and not rest and all(s.rstrip("\"')]\u201d\u2019").endswith("?") for s in sentences):
        return f"{TEXT_REASON_PREFIX}prompt echo: the answer only asks a question ({_normalised(sentences[0])[:30]!r}...)"
    lines = [line for line in answer.strip().splitlines() if line.strip()]
    heading = _normalised(title or "")
    while heading and lines and _normalised(lines[0]).strip("#*_\"' :") == heading:
        lines = lines[1:]
    start = _normalised(lines[0] if lines else "")[:_ECHO_PREFIX_CHARS]
    if len(start) < _ECHO_MIN_CHARS:
        return None
    for m in messages:
        if m.get("role") == "user" and start in _normalised(m.get("content", "")):
            return f"{TEXT_REASON_PREFIX}prompt echo: the answer begins by repeating the prompt ({start[:30]!r}...)"
    return None


def looping(answer: str) -> str | None:
    """The reason when an answer says the same phrase over and over ("Horror, Horror, Horror, Horror"):
    a small model's loop, not knowledge (core/sentences.py `repeated_run`)."""
    phrase = repeated_run(answer)
    if phrase is None:
        return None
    return f"{TEXT_REASON_PREFIX}loops: says {phrase[:30]!r} {LOOP_REPEATS} or more times in a row"


_YEAR_IN_PARENTHESES = re.compile(r"\s*\((\d{4})\)")


def _years_after_title(answer: str, title: str) -> list[int]:
    """The years of "<title> (1987)" in `answer` (what re.findall(escape(title) + r"\s*\((\d{4})\)")
    finds): a pattern per title missed re's cache on every item and took ~0.2 ms per answer to compile."""
    years, at = [], answer.find(title) if title else -1
    while at != -1:
        m = _YEAR_IN_PARENTHESES.match(answer, at + len(title))
        if m:
            years.append(int(m.group(1)))
        at = answer.find(title, m.end() if m else at + 1)
    return years


@functools.lru_cache(maxsize=64)
def _genre_claim_pattern(vocabulary: tuple[str, ...], noun: str) -> re.Pattern:
    # one per catalogue (its genre vocabulary and noun), not one per answer
    nouns = "|".join(re.escape(n) for n in sorted({noun, noun.rstrip("s"), "film", "movie", "book", "novel", "article"}))
    names = "|".join(re.escape(v) for v in sorted(vocabulary, key=len, reverse=True))
    return re.compile(rf"\b(?:is|was) an? ({names})(?:\s+|-)(?:{nouns})\b", re.IGNORECASE)


def contradiction(answer: str, context: dict[str, Any], vocabulary: Sequence[str], noun: str) -> str | None:
    """The reason when an item answer states a year or a genre the catalogue record contradicts:
    "released in 1987" (or "Title (1987)") for a record of 1995 (one year of slack for release dates),
    or "is a Western film" for a record whose genres do not include Western. None when it does not."""
    title = context.get("title")
    year = context.get("year")
    if year:
        stated = [int(y) for y in _YEAR_PATTERN.findall(answer)]
        if title:
            stated += _years_after_title(answer, str(title))
        wrong = [y for y in stated if abs(y - int(year)) > 1]
        if wrong:
            return f"{TEXT_REASON_PREFIX}contradicts the catalogue: states the year {wrong[0]}, the record says {int(year)}"
    genres = [g for g in (context.get("genres") or []) if g]
    if genres and vocabulary:
        known = {g.lower() for g in genres}
        for hit in _genre_claim_pattern(tuple(vocabulary), noun).findall(answer):
            if hit.lower() not in known:
                return (f"{TEXT_REASON_PREFIX}contradicts the catalogue: calls it {hit!r}, the record's genres are "
                        f"{', '.join(genres)}")
    return None


def identical_answer_rows(generated: pa.Table, limit: int) -> pa.Array:
    """A boolean mask over `generated`: rows whose answer (white space and case aside) was given for
    more than `limit` different prompts. Identical prompts (one cache key) count once."""
    import polars as pl

    if generated.num_rows == 0:
        return pa.array([], pa.bool_())
    # every white-space run becomes one space, as r"\s+" would, but a lone space is not a match:
    # replacing each single space by itself was 3/4 of this check's time
    norm = pl.col("raw_text").str.to_lowercase().str.replace_all(r"[\s--[ ]]\s*|\s\s+", " ").str.strip_chars()
    frame = pl.from_arrow(generated.select(["cache_key", "raw_text"]))
    return frame.select(pl.col("cache_key").n_unique().over(norm) > limit).to_series().to_arrow()
