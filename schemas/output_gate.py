"""The output gate: great-expectations checks on embedding tables before anything is published.

GX has no expectations over vectors, so the gate derives scalar columns first and lets GX judge
those (DESIGN.md §2):

  per embedding row   dim, nan_or_inf (count of non-finite components), l2_norm (over the finite
                      components), (augmenter, entity_id) uniqueness and non-null ids
  per generated row   text_chars (length of the encoded text)
  per augmenter       coverage          = share of the expected entities that have a vector
                      parse_rate        = generated rows / (generated + dead-letter rows)
                      dead_letter_share = dead-lettered entities / expected entities
                      missing_metadata  = EMBEDDING_METADATA_KEYS absent from the table's schema

Thresholds come from `OutputGateConfig`. The result lists every expectation with its observed
value; `success` is False if any failed, which callers turn into "publish nothing, exit non-zero".
GX runs with an ephemeral context (nothing written to disk) and analytics off.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recaug.pipelines.config import OutputGateConfig
from recaug.pipelines.memory import release_memory
from recaug.schemas.tables import EMBEDDING_METADATA_KEYS


class OutputGateFailed(RuntimeError):
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
    from recaug.encoders.vectors import vectors_numpy

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


def _derive(inputs: Sequence[GateInput]):
    import pandas as pd

    row_frames, text_frames, summary_rows = [], [], []
    for inp in inputs:
        emb = inp.embeddings
        meta = _metadata(emb)
        dim, bad, norms = _vector_stats(emb)
        expected_dim = inp.expected_dim if inp.expected_dim is not None else int(meta.get("recaug.dim", dim))
        n = emb.num_rows
        row_frames.append(
            pd.DataFrame(
                {
                    "augmenter": np.full(n, inp.augmenter, dtype=object),
                    # Arrow-backed strings: a million ids as Python str objects cost ~80 MB more
                    "entity_id": emb.column("entity_id").cast(pa.string()).to_pandas(types_mapper=pd.ArrowDtype),
                    "dim": np.full(n, dim, dtype=np.int64),
                    "expected_dim": np.full(n, expected_dim, dtype=np.int64),
                    "nan_or_inf": bad,
                    "l2_norm": norms,
                }
            )
        )
        if inp.generated is not None:
            text_frames.append(
                pd.DataFrame(
                    {
                        "augmenter": np.full(inp.generated.num_rows, inp.augmenter, dtype=object),
                        "text_chars": pc.utf8_length(pc.fill_null(inp.generated.column("text"), "")).to_numpy().astype(np.int64),
                    }
                )
            )
        generated_rows = inp.generated.num_rows if inp.generated is not None else n
        dead_rows = inp.dead_letter.num_rows if inp.dead_letter is not None else 0
        dead_ids = _ids(inp.dead_letter.column("entity_id") if inp.dead_letter is not None else None)
        if inp.expected_entities is not None:
            expected = _ids(inp.expected_entities)
        else:
            attempted = inp.generated.column("entity_id") if inp.generated is not None else emb.column("entity_id")
            expected = _ids(pa.chunked_array([_ids(attempted), dead_ids], pa.string()))
        present = _ids(emb.column("entity_id"))
        summary_rows.append(
            {
                "augmenter": inp.augmenter,
                "rows": n,
                "expected_entities": len(expected),
                "coverage": _count_in(expected, present) / len(expected) if len(expected) else 1.0,
                "parse_rate": generated_rows / (generated_rows + dead_rows) if generated_rows + dead_rows else 1.0,
                "dead_letter_share": (_count_in(dead_ids, expected) / len(expected) if len(expected)
                                      else (1.0 if len(dead_ids) else 0.0)),
                "missing_metadata": sum(1 for k in EMBEDDING_METADATA_KEYS if not meta.get(k)),
                "missing_metadata_keys": ",".join(k for k in EMBEDDING_METADATA_KEYS if not meta.get(k)),
            }
        )
    rows = pd.concat(row_frames, ignore_index=True) if row_frames else None
    texts = pd.concat(text_frames, ignore_index=True) if text_frames else None
    summary = pd.DataFrame(summary_rows)
    return rows, texts, summary


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
    rows, texts, summary = _derive(inputs)
    release_memory()  # the blocks of vector statistics
    gx, ctx = _gx()
    E = gx.expectations
    source = ctx.data_sources.add_pandas("recaug_output")

    # (frame name, frame, [(our name, column, expectation, threshold text, observed text, failing mask)])
    plans = []
    if rows is not None:
        dup = rows.duplicated(["augmenter", "entity_id"], keep=False)
        plans.append(
            (
                "embedding_rows",
                rows,
                [
                    ("vector_dim", "dim", E.ExpectColumnPairValuesToBeEqual(column_A="dim", column_B="expected_dim"),
                     "== " + "/".join(map(str, sorted(rows["expected_dim"].unique()))) if len(rows) else "== d",
                     "/".join(map(str, sorted(rows["dim"].unique()))) if len(rows) else "-", rows["dim"] != rows["expected_dim"]),
                    ("no_nan_or_inf", "nan_or_inf", E.ExpectColumnValuesToBeBetween(column="nan_or_inf", min_value=0, max_value=0),
                     "0", f"max {int(rows['nan_or_inf'].max()) if len(rows) else 0}", rows["nan_or_inf"] != 0),
                    ("l2_norm_range", "l2_norm",
                     E.ExpectColumnValuesToBeBetween(column="l2_norm", min_value=cfg.min_norm, max_value=cfg.max_norm),
                     f"[{cfg.min_norm:g}, {cfg.max_norm:g}]",
                     f"[{_fmt(float(rows['l2_norm'].min()))}, {_fmt(float(rows['l2_norm'].max()))}]" if len(rows) else "-",
                     (rows["l2_norm"] < cfg.min_norm) | (rows["l2_norm"] > cfg.max_norm)),
                    ("entity_id_not_null", "entity_id", E.ExpectColumnValuesToNotBeNull(column="entity_id"),
                     "no nulls", f"{int(rows['entity_id'].isna().sum())} null", rows["entity_id"].isna()),
                    ("entity_id_unique", "augmenter+entity_id",
                     E.ExpectCompoundColumnsToBeUnique(column_list=["augmenter", "entity_id"]),
                     "unique", f"{int(dup.sum())} rows share an id", dup),
                ],
            )
        )
    if texts is not None:
        chars = texts["text_chars"]
        plans.append(
            (
                "generated_texts",
                texts,
                [
                    ("text_length", "text_chars",
                     E.ExpectColumnValuesToBeBetween(column="text_chars", min_value=cfg.min_text_chars, max_value=cfg.max_text_chars),
                     f"[{cfg.min_text_chars}, {cfg.max_text_chars}]",
                     f"[{int(chars.min())}, {int(chars.max())}]" if len(texts) else "-",
                     (chars < cfg.min_text_chars) | (chars > cfg.max_text_chars)),
                ],
            )
        )
    s = summary
    # per-augmenter floors (global unless output_gate.augmenters overrides them), judged row by row
    for key in ("min_coverage", "min_parse_rate", "max_dead_letter_share"):
        s[key] = [cfg.floor(a, key) for a in s["augmenter"]] if len(s) else []

    def floors(key: str, op: str) -> str:
        special = {a: cfg.floor(a, key) for a in s["augmenter"] if cfg.floor(a, key) != getattr(cfg, key)}
        extra = "".join(f"; {a}: {op} {v:g}" for a, v in sorted(special.items()))
        return f"{op} {getattr(cfg, key):g}{extra}"

    plans.append(
        (
            "augmenter_summary",
            s,
            [
                ("coverage", "coverage",
                 E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="coverage", column_B="min_coverage", or_equal=True),
                 floors("min_coverage", ">="), f"min {_fmt(float(s['coverage'].min()))}", s["coverage"] < s["min_coverage"]),
                ("parse_rate", "parse_rate",
                 E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="parse_rate", column_B="min_parse_rate", or_equal=True),
                 floors("min_parse_rate", ">="), f"min {_fmt(float(s['parse_rate'].min()))}", s["parse_rate"] < s["min_parse_rate"]),
                ("dead_letter_share", "dead_letter_share",
                 E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="max_dead_letter_share", column_B="dead_letter_share", or_equal=True),
                 floors("max_dead_letter_share", "<="), f"max {_fmt(float(s['dead_letter_share'].max()))}",
                 s["dead_letter_share"] > s["max_dead_letter_share"]),
                ("metadata_complete", "missing_metadata",
                 E.ExpectColumnValuesToBeBetween(column="missing_metadata", min_value=0, max_value=0),
                 "0 missing", ", ".join(sorted({k for v in s["missing_metadata_keys"] for k in v.split(",") if k})) or "0 missing",
                 s["missing_metadata"] > 0),
            ],
        )
    )

    checks: list[GateCheck] = []
    for frame_name, frame, specs in plans:
        asset = source.add_dataframe_asset(frame_name)
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"recaug_output_{frame_name}"))
        for _, _, expectation, *_ in specs:
            suite.add_expectation(expectation)
        validation = batch.validate(suite)
        by_key = {_result_key(res.expectation_config.type, res.expectation_config.kwargs): res for res in validation.results}
        for name, column, expectation, threshold, observed, mask in specs:
            res = by_key[_result_key(expectation.expectation_type, expectation.configuration.kwargs)]
            unexpected = int((res.result or {}).get("unexpected_count") or 0)
            if res.exception_info and res.exception_info.get("raised_exception"):
                raise RuntimeError(f"output gate check {name} could not run: {res.exception_info.get('exception_message')}")
            checks.append(
                GateCheck(
                    name=name,
                    expectation=res.expectation_config.type,
                    column=column,
                    success=bool(res.success),
                    unexpected_count=unexpected,
                    threshold=threshold,
                    observed=observed,
                    detail=_failing(frame, mask),
                )
            )
    metrics = {
        r["augmenter"]: {k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items() if k != "augmenter"}
        for r in summary.to_dict("records")
    }
    return OutputGateResult(success=all(c.success for c in checks), checks=checks, metrics=metrics)
