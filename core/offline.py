"""Nothing is fetched at run time: hub look-ups, analytics and version checks are switched off once,
here, for this process and for the worker processes it starts (Ray's runtime_env takes OFFLINE_ENV)."""

from __future__ import annotations

import os

from recaug.core.progress import progress_wanted

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GX_ANALYTICS_ENABLED": "False",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # spinning OpenMP workers starve each other on a shared 2-core box (10x slower decoding)
    "OMP_WAIT_POLICY": "PASSIVE",
}


def go_offline() -> None:
    """Set every variable of OFFLINE_ENV that the environment does not set already."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    # transformers' "Loading weights" bars (and the hub's) are for a terminal; in a log they are noise.
    # Read when transformers is first imported, which callers do after this.
    if not progress_wanted(None):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
