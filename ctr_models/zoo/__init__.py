"""One small file per CTR backbone; each defines `BACKBONE` (a `recaug.ctr_models.backbone.Backbone`).

To add one: write `zoo/<name>.py` with a `build(linear_columns, dnn_columns, *, seed, knowledge_fields)`
and a `BACKBONE`, then list the module below.
"""

from __future__ import annotations

import importlib

from recaug.ctr_models.backbone import Backbone

MODEL_NAMES = ("deepfm", "dcn", "din", "autoint", "xdeepfm", "wdl")


def get_backbone(name: str) -> Backbone:
    key = name.lower()
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown CTR model {name!r}; expected one of {MODEL_NAMES}")
    return importlib.import_module(f"recaug.ctr_models.zoo.{key}").BACKBONE
