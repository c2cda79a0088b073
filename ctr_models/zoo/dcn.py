"""DCN (Wang et al., ADKDD 2017): cross network + DNN on the concatenated embeddings and dense inputs.

Knowledge vectors: dense inputs (the cross net and the DNN both read them, as does the linear part),
and one extra field each (projected to embedding_dim) in the embedding block the cross net crosses.
"""

from recaug.ctr_models.backbone import Backbone, KnowledgeFieldsMixin
from recaug.ctr_models.deepctr_import import DCN

CROSS_NUM = 2
DNN_HIDDEN_UNITS = (256, 128)


class DCNWithKnowledgeFields(KnowledgeFieldsMixin, DCN):
    pass


def build(linear_columns, dnn_columns, *, seed, knowledge_fields=()):
    return DCNWithKnowledgeFields(
        linear_columns,
        dnn_columns,
        cross_num=CROSS_NUM,
        cross_parameterization="vector",
        dnn_hidden_units=DNN_HIDDEN_UNITS,
        seed=seed,
        knowledge_fields=knowledge_fields,
    )


BACKBONE = Backbone(
    name="dcn",
    build=build,
    knowledge_fields=True,
    uses_history=False,
    uses_linear=True,
    vector_routes="dense (linear + cross + DNN) and cross-net fields",
    vector_routes_fields_only="dense (linear) and cross-net fields (cross + DNN)",
)
