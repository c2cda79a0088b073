"""DeepFM (Guo et al., IJCAI 2017): linear part + FM + DNN over shared field embeddings.

Knowledge vectors: dense inputs of the linear part, and one extra FM field each (the adaptor output
projected to embedding_dim), so they interact pairwise with every id field; the DNN sees them through
those fields, as it sees every field. Feeding the 32-d outputs to the DNN as well (the layout before
`ctr.vector_dnn_copy` existed) widened its first layer from 146 to 210 inputs and cost 6-10% of a training
step with the adaptor in two bench runs, at the same AUC (docs/ctr-models.md). The
`raw` adaptor keeps the copy: without it the DNN would see a d-dim vector only in embedding_dim.
"""

from recaug.ctr_models.backbone import Backbone, KnowledgeFieldsMixin
from recaug.ctr_models.deepctr_import import DeepFM

DNN_HIDDEN_UNITS = (256, 128)


class DeepFMWithKnowledgeFields(KnowledgeFieldsMixin, DeepFM):
    pass


def build(linear_columns, dnn_columns, *, seed, knowledge_fields=()):
    return DeepFMWithKnowledgeFields(
        linear_columns, dnn_columns, dnn_hidden_units=DNN_HIDDEN_UNITS, seed=seed, knowledge_fields=knowledge_fields
    )


BACKBONE = Backbone(
    name="deepfm",
    build=build,
    knowledge_fields=True,
    uses_history=False,
    uses_linear=True,
    vector_routes="dense (linear + DNN) and FM fields",
    vector_dnn_copy=False,
    vector_routes_fields_only="dense (linear) and FM fields (FM + DNN)",
)
