"""Input stage of every job: load -> input gate -> as-of visibility -> leakage-free splits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from recaug.core.config import PipelineConfig
from recaug.core.errors import writing_into
from recaug.core.storage import write_parquet_atomic
from recaug.pipelines.datasets import load_raw
from recaug.ctr_models.splits import SplitBoundaries, ctr_samples, split_interactions, split_sizes
from recaug.schemas.input_gate import InputGateResult, enforce_threshold, run_input_gate


@dataclass
class PreparedInputs:
    users: pa.Table
    items: pa.Table
    interactions: pa.Table  # clean and visible at as_of
    split: pa.Table  # interactions with their split
    samples: pa.Table  # CTR samples (no prompt rows)
    bounds: SplitBoundaries | None
    gate: InputGateResult
    not_yet_visible: int  # clean interactions after as_of, left for a later run
    data_cutoff: int  # newest interaction timestamp the job may use
    sources: dict[str, str]
    # "source": timestamps from the data; "row_order": split.mode by_row_order, timestamp = row number
    timestamps: str = "source"
    warnings: list[str] = field(default_factory=list)  # for the person running the job
    notes: dict[str, int] = field(default_factory=dict)  # loader counts, e.g. implicit_ratings

    def sizes(self) -> dict[str, int]:
        return split_sizes(self.split)

    def describe_time(self, ts: int, fmt) -> str:
        """A timestamp as summaries show it: a date, or what it is when the data has no dates."""
        if self.timestamps == "row_order":
            return f"row {ts:,} of the interactions file (split.mode by_row_order: the data has no timestamps)"
        return fmt(ts)


# timestamps all below this (30 days after the epoch) are not real times of a real catalogue
DERIVED_TIMESTAMP_SPAN_S = 30 * 86_400


def prepare_inputs(cfg: PipelineConfig, as_of: int | None = None, quarantine_path: Path | None = None) -> PreparedInputs:
    """Raises InputSchemaError (table unusable) or QuarantineThresholdExceeded (too many bad rows);
    the quarantine table is written first either way so that the reasons can be read."""
    raw = load_raw(cfg)
    interactions = cfg.dataset.interactions
    gate = run_input_gate(raw.tables, cfg.input_gate, as_of=None, list_separator=raw.list_separator,
                          timestamp_format=interactions.timestamp_format if interactions is not None else None)
    if quarantine_path is not None:
        with writing_into(cfg.workdir_path(), f"the quarantine table {quarantine_path}"):
            write_parquet_atomic(gate.quarantine, quarantine_path)  # its temporary file goes on any failure
    enforce_threshold(gate, cfg.input_gate, quarantine_path=quarantine_path)

    interactions = gate.tables["interactions"]
    not_yet_visible = 0
    if as_of is not None:
        # a backfill run sees the world as it was: later rows are not bad, just not visible yet
        visible = pl.from_arrow(interactions).filter(pl.col("timestamp") <= as_of)
        not_yet_visible = interactions.num_rows - visible.height
        interactions = visible.to_arrow().cast(interactions.schema)
    split, bounds = split_interactions(interactions, cfg.split)
    samples = ctr_samples(split, cfg.split)
    ts = interactions.column("timestamp")
    data_cutoff = int(pc.max(ts).as_py()) if interactions.num_rows else (as_of or int(time.time()))
    row_order = cfg.split.mode == "by_row_order"
    warnings = []
    if not row_order and interactions.num_rows and data_cutoff < DERIVED_TIMESTAMP_SPAN_S:
        warnings.append(
            f"every interaction timestamp is within {DERIVED_TIMESTAMP_SPAN_S // 86_400} days of 1970-01-01 "
            f"(newest: {data_cutoff:,} s): they look derived (row numbers?) rather than real times. A global time "
            "split of such values is meaningless; for data without timestamps set split.mode: by_row_order"
        )
    return PreparedInputs(
        users=gate.tables["users"],
        items=gate.tables["items"],
        interactions=interactions,
        split=split,
        samples=samples,
        bounds=bounds,
        gate=gate,
        not_yet_visible=not_yet_visible,
        data_cutoff=data_cutoff,
        sources=raw.sources,
        timestamps="row_order" if row_order else "source",
        warnings=warnings,
        notes=dict(raw.notes),
    )
