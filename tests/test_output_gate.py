"""The output gate with real great-expectations: passes clean outputs, names each failure kind,
and a failed gate keeps publish_snapshot from writing anything."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest

from recaug.schemas.vectors import fixed_size_vectors
from recaug.core.config import OutputGateConfig
from recaug.pipelines.snapshots import list_snapshots, publish_snapshot
from recaug.schemas.output_gate import GateInput, OutputGateFailed, run_output_gate
from recaug.schemas.tables import DEAD_LETTER, GENERATED_TEXTS, embedding_schema

DIM = 16
CFG = OutputGateConfig()  # coverage >= 0.95, parse rate >= 0.8, dead-letter share <= 0.2, norm in [0.5, 1.5]


def generated(ids: list[str], texts: list[str] | None = None, augmenter: str = "kar_user") -> pa.Table:
    n = len(ids)
    texts = texts or [f"profile text of {i}" for i in ids]
    now = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    cols = {
        "entity_id": ids, "entity_kind": ["user"] * n, "augmenter": [augmenter] * n, "template_hash": ["t"] * n,
        "parser_version": ["p"] * n, "model": ["m"] * n, "cache_key": ids, "prompt": ["p"] * n, "raw_text": texts,
        "text": texts, "parsed_json": ["{}"] * n, "input_tokens": [1] * n, "output_tokens": [1] * n,
        "finish_reason": ["stop"] * n, "latency_s": [0.1] * n, "attempts": [1] * n, "created_at": [now] * n,
    }
    return pa.table(cols, schema=GENERATED_TEXTS)


def dead_letter(ids: list[str]) -> pa.Table:
    n = len(ids)
    now = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    cols = {
        "entity_id": ids, "entity_kind": ["user"] * n, "augmenter": ["kar_user"] * n, "template_hash": ["t"] * n,
        "model": ["m"] * n, "cache_key": ids, "prompt": ["p"] * n, "raw_text": ["{oops"] * n,
        "reason": ["invalid json"] * n, "finish_reason": ["stop"] * n, "attempts": [2] * n, "created_at": [now] * n,
    }
    return pa.table(cols, schema=DEAD_LETTER)


def embeddings(ids: list[str], vectors: np.ndarray | None = None, dim: int = DIM, meta: dict | None = None) -> pa.Table:
    if vectors is None:
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((len(ids), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    metadata = {"recaug.encoder": "enc", "recaug.pooling": "mean", "recaug.augmenter": "kar_user", "recaug.snapshot": "unpublished",
                "recaug.entity_kind": "user"}
    if meta is not None:
        metadata = meta
    schema = embedding_schema(vectors.shape[1], metadata)
    return pa.Table.from_arrays([pa.array(ids), fixed_size_vectors(vectors), pa.array(["h"] * len(ids))], schema=schema)


IDS = [f"u{i}" for i in range(40)]


def clean_input(**overrides) -> GateInput:
    base = dict(augmenter="kar_user", embeddings=embeddings(IDS), generated=generated(IDS), dead_letter=dead_letter([]),
                expected_entities=IDS, expected_dim=DIM)
    base.update(overrides)
    return GateInput(**base)


def test_clean_outputs_pass_every_check():
    result = run_output_gate([clean_input()], CFG)
    assert result.success, result.summary()
    names = {c.name for c in result.checks}
    assert {"vector_dim", "no_nan_or_inf", "l2_norm_range", "entity_id_unique", "text_length", "coverage",
            "parse_rate", "dead_letter_share", "metadata_complete"} <= names
    assert all(c.expectation.startswith("expect_") for c in result.checks)
    assert "PASSED" in result.summary()
    assert result.metrics["kar_user"]["coverage"] == 1.0
    json.dumps(result.as_dict())  # goes into the manifest as is


def _nan_vectors():
    v = embeddings(IDS)
    arr = np.array(v.column("vector").to_pylist(), dtype=np.float32)
    arr[7, 3] = np.nan
    arr[9, 0] = np.inf
    return embeddings(IDS, arr)


def test_vector_statistics_by_block_equal_the_whole_table(monkeypatch):
    """The gate computes per-row statistics a block of rows at a time (bounded memory); blocks that cut
    across Arrow chunks, a null row and non-finite values give what the whole array gives."""
    from recaug.schemas import output_gate

    rng = np.random.default_rng(3)
    arr = rng.standard_normal((23, DIM)).astype(np.float32)
    arr[4, 1], arr[11, 0], arr[11, 5], arr[20, 2] = np.nan, np.inf, -np.inf, np.nan
    whole = embeddings([f"u{i}" for i in range(23)], arr)
    vectors = pa.chunked_array([fixed_size_vectors(arr[:9]), fixed_size_vectors(arr[9:])])
    vectors = pa.chunked_array([vectors.chunk(0), pa.array([None] + vectors.chunk(1).to_pylist()[1:], vectors.type)])
    table = whole.set_column(1, whole.schema.field("vector"), vectors)
    expected_arr = arr.copy()
    expected_arr[9] = np.nan  # the null row counts as non-finite in every component
    finite = np.isfinite(expected_arr)
    expected_bad = (~finite).sum(axis=1)
    expected_norms = np.sqrt((np.where(finite, expected_arr, 0.0).astype(np.float64) ** 2).sum(axis=1))

    monkeypatch.setattr(output_gate, "_STATS_BLOCK", 5)
    dim, bad, norms = output_gate._vector_stats(table)
    assert dim == DIM
    np.testing.assert_array_equal(bad, expected_bad)
    assert bad[9] == DIM and bad[11] == 2 and bad[4] == 1
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-12)


FAILURES = {
    # kind -> (gate input, the check that must fail, its unexpected count)
    "planted NaN/Inf": (lambda: clean_input(embeddings=_nan_vectors()), "no_nan_or_inf", 2),
    "wrong dimension": (lambda: clean_input(embeddings=embeddings(IDS, dim=DIM - 1)), "vector_dim", 40),
    "missing entities": (lambda: clean_input(embeddings=embeddings(IDS[:30]), generated=generated(IDS[:30])), "coverage", 1),
    "duplicate ids": (lambda: clean_input(embeddings=embeddings(IDS[:39] + ["u0"])), "entity_id_unique", 2),
    "low parse rate": (lambda: clean_input(embeddings=embeddings(IDS[:28]), generated=generated(IDS[:28]),
                                           dead_letter=dead_letter(IDS[28:])), "parse_rate", 1),
    "norm out of range": (lambda: clean_input(embeddings=embeddings(IDS, np.full((40, DIM), 0.01, np.float32))), "l2_norm_range", 40),
    "empty text": (lambda: clean_input(generated=generated(IDS, [""] + ["ok"] * 39)), "text_length", 1),
    "metadata missing": (lambda: clean_input(embeddings=embeddings(IDS, meta={"recaug.augmenter": "kar_user"})), "metadata_complete", 1),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_each_failure_kind_is_named_and_blocks_publication(tmp_path, kind):
    make, check_name, unexpected = FAILURES[kind]
    root = tmp_path / "snaps"
    good = run_output_gate([clean_input()], CFG)
    before = publish_snapshot(root, {"embeddings/kar_user": clean_input().embeddings}, {"data_cutoff": 1}, gate=good)

    gate_input = make()
    result = run_output_gate([gate_input], CFG)
    assert not result.success
    failed = result.check(check_name)
    assert not failed.success and failed.unexpected_count == unexpected
    summary = result.summary()
    assert "FAILED" in summary and check_name in summary and "kar_user" in summary
    assert f"FAIL {check_name}" in summary

    with pytest.raises(OutputGateFailed, match=check_name):
        publish_snapshot(root, {"embeddings/kar_user": gate_input.embeddings}, {"data_cutoff": 2}, gate=result)
    assert [s.snapshot_id for s in list_snapshots(root)] == [before.snapshot_id]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-")) == []


def test_low_parse_rate_also_shows_as_dead_letter_share():
    result = run_output_gate(
        [clean_input(embeddings=embeddings(IDS[:28]), generated=generated(IDS[:28]), dead_letter=dead_letter(IDS[28:]))], CFG
    )
    m = result.metrics["kar_user"]
    assert m["parse_rate"] == pytest.approx(28 / 40) and m["dead_letter_share"] == pytest.approx(12 / 40)
    assert not result.check("dead_letter_share").success
    assert not result.check("coverage").success  # the dead-lettered entities have no vector either


def test_failures_are_attributed_to_the_right_augmenter():
    other_ids = [f"i{i}" for i in range(10)]
    item = GateInput("kar_item", embeddings(other_ids, meta={"recaug.encoder": "enc", "recaug.pooling": "mean",
                                                            "recaug.augmenter": "kar_item", "recaug.snapshot": "s"}),
                     generated(other_ids, augmenter="kar_item"), None, other_ids + ["i10"], DIM)
    result = run_output_gate([clean_input(), item], CFG)
    cov = result.check("coverage")
    assert not cov.success and "kar_item" in cov.detail and "kar_user" not in cov.detail
    assert result.metrics["kar_item"]["coverage"] == pytest.approx(10 / 11)
    # the same entity id under two augmenters is not a duplicate
    assert result.check("entity_id_unique").success


def test_thresholds_come_from_the_config():
    lenient = OutputGateConfig(min_coverage=0.5)
    partial = clean_input(embeddings=embeddings(IDS[:30]), generated=generated(IDS[:30]))
    assert run_output_gate([partial], lenient).success
    assert not run_output_gate([partial], CFG).success


def test_a_per_augmenter_floor_applies_to_that_augmenter_only():
    low = lambda name: clean_input(augmenter=name, embeddings=embeddings(IDS[:28]), generated=generated(IDS[:28], augmenter=name),
                                   dead_letter=dead_letter(IDS[28:]))  # parse rate 0.7, coverage 0.7, dead 0.3
    cfg = OutputGateConfig(augmenters={"hard_json": {"min_parse_rate": 0.5, "min_coverage": 0.5, "max_dead_letter_share": 0.5}})
    assert run_output_gate([low("hard_json")], cfg).success
    both = run_output_gate([low("hard_json"), low("kar_user")], cfg)
    parse = both.check("parse_rate")
    assert not parse.success and parse.unexpected_count == 1
    assert "kar_user" in parse.detail and "hard_json" not in parse.detail
    assert parse.threshold == ">= 0.8; hard_json: >= 0.5"
    assert both.metrics["hard_json"]["min_parse_rate"] == 0.5 and both.metrics["kar_user"]["min_parse_rate"] == 0.8


def test_a_gate_override_must_name_a_configured_augmenter():
    from recaug.core.config import PipelineConfig

    with pytest.raises(ValueError, match="output_gate.augmenters names kar_usr"):
        PipelineConfig(name="x", augmenters=[{"name": "kar_user_preference"}],
                       output_gate={"augmenters": {"kar_usr": {"min_parse_rate": 0.1}}})


@pytest.mark.parametrize("kind", ["planted NaN/Inf", "wrong dimension", "norm out of range", "empty text", "duplicate ids"])
def test_row_checks_validated_in_blocks_report_what_one_frame_reports(monkeypatch, kind):
    """GX sees the row-level frames a block at a time (bounded memory); counts, verdicts and the
    failing augmenters add up to what a single frame gives. Blocks of 8 split the planted NaN (row 7)
    from the Inf (row 9)."""
    from recaug.schemas import output_gate

    make = FAILURES[kind][0]
    whole = run_output_gate([make(), clean_input(augmenter="kar_item", embeddings=embeddings(IDS[:13]),
                                                 generated=generated(IDS[:13], augmenter="kar_item"), expected_entities=IDS[:13])], CFG)
    monkeypatch.setattr(output_gate, "_GX_BLOCK", 8)
    blocks = run_output_gate([make(), clean_input(augmenter="kar_item", embeddings=embeddings(IDS[:13]),
                                                  generated=generated(IDS[:13], augmenter="kar_item"), expected_entities=IDS[:13])], CFG)
    seen = [(c.name, c.expectation, c.success, c.unexpected_count, c.observed, c.detail) for c in blocks.checks]
    assert seen == [(c.name, c.expectation, c.success, c.unexpected_count, c.observed, c.detail) for c in whole.checks]
    failed = blocks.check(FAILURES[kind][1])
    assert not failed.success and failed.unexpected_count == FAILURES[kind][2] and "kar_user" in failed.detail
