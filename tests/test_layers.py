"""The layer contract (.importlinter, docs/architecture.md) holds for the tree and catches an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("core", "schemas", "prompts", "augmenters", "encoders", "ctr_models", "pipelines")
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")


def _copy_package(dst: Path) -> Path:
    """The recaug package's sources (no tests, bench or venvs) as dst/recaug, plus the contract."""
    pkg = dst / "recaug"
    pkg.mkdir(parents=True)
    shutil.copy(REPO / "__init__.py", pkg / "__init__.py")
    for layer in LAYERS:
        shutil.copytree(REPO / layer, pkg / layer, ignore=shutil.ignore_patterns("__pycache__", "*.j2"))
    shutil.copy(REPO / ".importlinter", dst / ".importlinter")
    return pkg


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / ".importlinter")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_the_layer_contract(tmp_path):
    _copy_package(tmp_path)
    proc = _lint(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "One-way layers KEPT" in proc.stdout


@pytest.mark.parametrize(
    "module, wrong_import, named",
    [
        ("core/config.py", "from recaug.schemas import tables as _upward  # noqa", "recaug.core.config -> recaug.schemas"),
        ("schemas/output_gate.py", "from recaug.pipelines import cli as _upward  # noqa", "recaug.schemas.output_gate -> recaug.pipelines.cli"),
        ("encoders/tables.py", "from recaug.augmenters import base as _sideways  # noqa", "recaug.encoders.tables -> recaug.augmenters.base"),
    ],
)
def test_an_upward_or_sideways_import_breaks_the_contract(tmp_path, module, wrong_import, named):
    pkg = _copy_package(tmp_path)
    path = pkg / module
    path.write_text(path.read_text() + f"\n{wrong_import}\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout
    assert named in proc.stdout, proc.stdout
