"""Importing deepctr-torch through recaug's shim starts no thread and opens no connection."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter (deepctr must not be imported yet): every way out to the network
# fails loudly and is recorded, and every thread start is recorded.
PROBE = r"""
import json, socket, sys, threading
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:80])
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse
started = []
_start = threading.Thread.start
def recording_start(self, *a, **k):
    started.append(self.name)
    return _start(self, *a, **k)
threading.Thread.start = recording_start
if sys.argv[1] == "shim":
    from recaug.ctr_models.deepctr_import import deepctr_torch, DeepFM, DIN
    noop = deepctr_torch.utils.check_version("0.0.1")  # even a direct call stays offline
else:
    import deepctr_torch
for thread in threading.enumerate():
    if thread is not threading.main_thread():
        thread.join(10)
print(json.dumps({"threads": started, "attempts": attempts, "version": deepctr_torch.__version__}))
"""


def _probe(mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_shim_import_starts_no_thread_and_makes_no_connection():
    result = _probe("shim")
    assert result["version"] == "0.3.0"
    assert result["threads"] == []
    assert result["attempts"] == []


def test_probe_detects_the_plain_import_version_check():
    # the control: without the shim, deepctr-torch's import does start its checker thread, which
    # tries the network (and is refused by the probe) — so the probe above would have seen it
    result = _probe("plain")
    assert len(result["threads"]) >= 1
    assert result["attempts"], "the plain import's version check should have tried to resolve pypi"


def test_recaug_modules_import_deepctr_only_through_the_shim():
    pattern = re.compile(r"^\s*(import deepctr_torch|from deepctr_torch)", re.MULTILINE)
    offenders = []
    # every package folder of the repository (tests may probe the plain import on purpose)
    folders = [d for d in REPO.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "tests"]
    files = [REPO / "__init__.py"] + [p for d in folders if (d / "__init__.py").exists() for p in d.rglob("*.py")]
    assert any(p.name == "train.py" for p in files)
    for path in sorted(files):
        if path.name == "deepctr_import.py":
            continue
        if pattern.search(path.read_text(encoding="utf-8")):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
