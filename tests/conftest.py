"""Shared fixtures. Everything runs offline: no hub, no analytics, no version checks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def write_config(tmp_path):
    """Write a pipeline config into tmp_path and return its path; workdir stays inside tmp_path."""

    def write(data: dict, name: str = "pipeline.yaml") -> Path:
        data = {"workdir": str(tmp_path / "work"), **data}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write
