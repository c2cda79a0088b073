"""recaug: offline LLM feature augmentation for recommender systems.

The repository root is the package; each top-level folder is one layer, imports going down only
(docs/architecture.md): ``core`` (the ground), ``schemas`` (data contracts and gates), ``prompts``
(templates), ``augmenters`` (tasks), ``encoders`` (text -> vectors), ``ctr_models`` (splits, CTR
backbones, adaptor, training) and ``pipelines`` (orchestration: engines, runners, cache, snapshots,
scheduler, CLI).
"""

__version__ = "0.1.0"


def __getattr__(name):
    # `recaug.features.load(...)` is the modeler's entry point; imported lazily so that
    # `import recaug` stays cheap for the CLI.
    if name == "features":
        from recaug.pipelines import features

        return features
    raise AttributeError(name)
