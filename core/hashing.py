"""Content hashes of files and values: what cache keys, snapshot manifests and model ids are made of."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (never the whole file in memory)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def json_sha256(value: Any) -> str:
    """Hex sha256 of a canonical JSON (sorted keys, no spaces, UTF-8): equal values, equal hashes."""
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
