"""CTR backbones (deepctr-torch), the knowledge adaptor, training and evaluation.

    from recaug.ctr_models import train_ctr
    result = train_ctr(samples, users, items, split, vectors, cfg.ctr, "deepfm", seed=0,
                       checkpoint_dir=workdir / "ctr", lineage={"snapshot_id": sid, "config_hash": h})

See docs/ctr-models.md. Names are loaded on first use so that `import recaug.ctr_models` does not
pull in torch and deepctr.
"""

_EXPORTS = {
    "train_ctr": "recaug.ctr_models.train",
    "train_on_data": "recaug.ctr_models.train",
    "TrainResult": "recaug.ctr_models.train",
    "load_checkpoint": "recaug.ctr_models.train",
    "load_model": "recaug.ctr_models.train",
    "predict": "recaug.ctr_models.train",
    "WarmStartError": "recaug.ctr_models.train",
    "build_ctr_data": "recaug.ctr_models.data",
    "CTRData": "recaug.ctr_models.data",
    "CTRDataError": "recaug.ctr_models.data",
    "FeatureSpec": "recaug.ctr_models.data",
    "build_model": "recaug.ctr_models.network",
    "build_adaptor": "recaug.ctr_models.adaptor",
    "ADAPTOR_KINDS": "recaug.ctr_models.adaptor",
    "MODEL_NAMES": "recaug.ctr_models.zoo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'recaug.ctr_models' has no attribute {name!r}")
