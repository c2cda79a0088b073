"""AutoInt (Song et al., CIKM 2019): multi-head self-attention over field embeddings + DNN + linear.

Knowledge vectors: dense inputs of the linear part and the DNN, and one extra attention field each
(projected to embedding_dim), so every id field can attend to them and they to it.
"""

from recaug.ctr_models.backbone import Backbone, KnowledgeFieldsMixin
from recaug.ctr_models.deepctr_import import AutoInt

ATT_LAYER_NUM = 2
ATT_HEAD_NUM = 2
DNN_HIDDEN_UNITS = (256, 128)


class AutoIntWithKnowledgeFields(KnowledgeFieldsMixin, AutoInt):
    pass


def build(linear_columns, dnn_columns, *, seed, knowledge_fields=()):
    return AutoIntWithKnowledgeFields(
        linear_columns,
        dnn_columns,
        att_layer_num=ATT_LAYER_NUM,
        att_head_num=ATT_HEAD_NUM,
        dnn_hidden_units=DNN_HIDDEN_UNITS,
        seed=seed,
        knowledge_fields=knowledge_fields,
    )


BACKBONE = Backbone(
    name="autoint",
    build=build,
    knowledge_fields=True,
    uses_history=False,
    uses_linear=True,
    vector_routes="dense (linear + DNN) and self-attention fields",
    vector_routes_fields_only="dense (linear) and self-attention fields (attention + DNN)",
)
