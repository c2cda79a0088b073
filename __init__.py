"""recaug: offline LLM feature augmentation for recommender systems.

The repository root is the package; each top-level folder is one sub-package:
``schemas`` (data contracts and gates), ``prompts`` (templates), ``augmenters`` (tasks),
``encoders`` (text -> vectors), ``pipelines`` (config, engines, runners, cache, snapshots, CLI)
and ``ctr_models`` (CTR backbones, adaptor, training).
"""

__version__ = "0.1.0"


def __getattr__(name):
    # `recaug.features.load(...)` is the modeler's entry point; imported lazily so that
    # `import recaug` stays cheap for the CLI.
    if name == "features":
        from recaug.pipelines import features

        return features
    raise AttributeError(name)
