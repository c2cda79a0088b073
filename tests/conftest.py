"""Shared fixtures and the suite's layers. Everything runs offline: no hub, no analytics, no version checks.

Layers (markers, set here by where a test lives and what it uses; an explicit mark wins):
- `reliability`: tests/reliability/, failure injection, kills, concurrency, bad input, secrets;
- `integration`: the CLI end to end (INTEGRATION_MODULES) and anything on a Ray session;
- `unit`: everything else, one layer at a time (`pytest -m unit`).
Cost markers cut across them: `slow` (the real packaged LLM or encoder) and `vllm`.

Helpers for test modules (tests/ is on sys.path, see pyproject): `shop_data.Shop`, the small shop
dataset; `fake_encoder`, a hash encoder for tests that are not about encoding (the `fake_encoder`
fixture below; `fake_encoder.CLI` for a CLI subprocess).

Parallel runs (`make test`, pytest-xdist `--dist loadgroup`): tests that share a module-scoped
fixture run on one worker (the fixture is built once), and everything that starts Ray runs on one
worker (one Ray cluster at a time on 2 cores).
"""

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
TESTS = Path(__file__).resolve().parent

LAYERS = ("unit", "integration", "reliability")
# modules that drive the `recaug` CLI end to end (or a whole run across processes)
INTEGRATION_MODULES = {
    "test_cli_end_to_end.py",
    "test_cli_ml100k.py",
    "test_cli_runners.py",
    "test_resume_real.py",
    "test_runners.py",
}
# tests that start Ray: one cluster at a time, so they share one xdist worker
RAY_FIXTURES = {"ray_session"}
RAY_MODULES = {"test_cli_runners.py"}


def _layer(item: pytest.Item) -> str:
    path = Path(str(item.path)).resolve()
    if TESTS / "reliability" in path.parents:
        return "reliability"
    if path.name in INTEGRATION_MODULES or RAY_FIXTURES & set(item.fixturenames):
        return "integration"
    return "unit"


def _xdist_group(item: pytest.Item) -> str | None:
    path = Path(str(item.path))
    if path.name in RAY_MODULES or RAY_FIXTURES & set(item.fixturenames):
        return "ray"
    module = item.nodeid.split("::")[0]
    for defs in item._fixtureinfo.name2fixturedefs.values():
        fixture = defs[-1]
        # module- or class-scoped, or session-scoped but defined in the test module itself: worth building once
        if fixture.scope in ("module", "class") or (fixture.scope in ("session", "package") and fixture.baseid == module):
            return module
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    grouping = config.pluginmanager.hasplugin("xdist")  # not in .venv-vllm
    for item in items:
        if not any(item.get_closest_marker(name) for name in LAYERS):
            item.add_marker(_layer(item))
        if grouping and item.get_closest_marker("xdist_group") is None:
            group = _xdist_group(item)
            if group is not None:
                item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def write_config(tmp_path):
    """Write a pipeline config into tmp_path and return its path; workdir stays inside tmp_path."""

    def write(data: dict, name: str = "pipeline.yaml") -> Path:
        data = {"workdir": str(tmp_path / "work"), **data}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def fake_encoder(monkeypatch):
    """Runs in this test encode with the deterministic hash encoder (tests/fake_encoder.py), not the
    real MiniLM: for tests of the CLI, the gates, publishing ... that are not about encoding."""
    import fake_encoder

    fake_encoder.install(monkeypatch)
    return fake_encoder.HashEncoder
