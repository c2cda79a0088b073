"""The one way recaug imports deepctr-torch: without its version check.

`import deepctr_torch` runs `deepctr_torch.utils.check_version`, which starts a non-daemon thread
that asks pypi.python.org for the latest release. On an offline machine that is a hanging DNS
lookup or a failed connection at every import, and a thread that can keep the interpreter alive.

We load the real `deepctr_torch.utils` module ourselves (its code runs unchanged: it only defines
`check_version`), replace `check_version` with a no-op, and register it in `sys.modules` *before*
the package is imported. The package's `from .utils import check_version` then finds our module
and calls the no-op. Nothing global (threading, sockets) is patched, so nothing else in the
process is affected, and the rest of deepctr-torch is the installed code as is.

Every recaug module imports deepctr through this file:

    from recaug.ctr_models.deepctr_import import deepctr_torch
    from recaug.ctr_models.deepctr_import import DeepFM, SparseFeat, ...
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

_PACKAGE = "deepctr_torch"
_UTILS = "deepctr_torch.utils"


class DeepCTRImportError(ImportError):
    pass


def _skip_version_check(version: str) -> None:  # noqa: ARG001 - same signature as the original
    """No-op replacement for deepctr_torch.utils.check_version (no thread, no network)."""
    return None


def _preload_quiet_utils() -> None:
    spec = importlib.util.find_spec(_PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DeepCTRImportError("deepctr-torch is not installed; install it with `pip install deepctr-torch==0.3.0`")
    # not find_spec("deepctr_torch.utils"): for a dotted name it imports the parent package first
    utils_path = Path(list(spec.submodule_search_locations)[0]) / "utils.py"
    utils_spec = importlib.util.spec_from_file_location(_UTILS, utils_path)
    if not utils_path.is_file() or utils_spec is None or utils_spec.loader is None:
        raise DeepCTRImportError(f"{utils_path} not found; reinstall deepctr-torch==0.3.0")
    utils = importlib.util.module_from_spec(utils_spec)
    utils_spec.loader.exec_module(utils)  # defines check_version; starts nothing
    if not hasattr(utils, "check_version"):
        raise DeepCTRImportError(f"{_UTILS} has no check_version: unsupported deepctr-torch version (need 0.3.0)")
    utils.check_version = _skip_version_check
    sys.modules[_UTILS] = utils


def _import_deepctr() -> ModuleType:
    if _PACKAGE in sys.modules:
        already = sys.modules[_PACKAGE]
        utils = sys.modules.get(_UTILS)
        if utils is None or getattr(utils, "check_version", None) is not _skip_version_check:
            # imported elsewhere first: its version-check thread (if any) has already started
            warnings.warn(
                "deepctr_torch was imported before recaug.ctr_models.deepctr_import; its network version "
                "check may have run. Import deepctr only through recaug.ctr_models.deepctr_import.",
                RuntimeWarning,
                stacklevel=3,
            )
        return already
    _preload_quiet_utils()
    try:
        import deepctr_torch as module
    except Exception:
        # leave no half-initialised package behind for the next attempt
        for name in [n for n in sys.modules if n == _PACKAGE or n.startswith(_PACKAGE + ".")]:
            del sys.modules[name]
        raise
    # a submodule found in sys.modules is not bound on its parent by the import system
    module.utils = sys.modules[_UTILS]
    return module


deepctr_torch = _import_deepctr()

from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat  # noqa: E402
from deepctr_torch.models import DCN, DIN, WDL, AutoInt, DeepFM, xDeepFM  # noqa: E402
from deepctr_torch.models.basemodel import BaseModel  # noqa: E402

__all__ = [
    "deepctr_torch",
    "BaseModel",
    "SparseFeat",
    "VarLenSparseFeat",
    "DenseFeat",
    "DeepFM",
    "DCN",
    "DIN",
    "AutoInt",
    "xDeepFM",
    "WDL",
]
