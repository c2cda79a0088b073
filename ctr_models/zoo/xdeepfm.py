"""xDeepFM (Lian et al., KDD 2018): linear part + CIN (vector-wise field interactions) + DNN.

Knowledge vectors: dense inputs of the linear part and the DNN, and one extra CIN field each
(projected to embedding_dim).
"""

from recaug.ctr_models.backbone import Backbone, KnowledgeFieldsMixin
from recaug.ctr_models.deepctr_import import xDeepFM

CIN_LAYER_SIZE = (64, 64)
DNN_HIDDEN_UNITS = (256, 128)


class xDeepFMWithKnowledgeFields(KnowledgeFieldsMixin, xDeepFM):
    pass


def build(linear_columns, dnn_columns, *, seed, knowledge_fields=()):
    return xDeepFMWithKnowledgeFields(
        linear_columns,
        dnn_columns,
        dnn_hidden_units=DNN_HIDDEN_UNITS,
        cin_layer_size=CIN_LAYER_SIZE,
        seed=seed,
        knowledge_fields=knowledge_fields,
    )


BACKBONE = Backbone(
    name="xdeepfm",
    build=build,
    knowledge_fields=True,
    uses_history=False,
    uses_linear=True,
    vector_routes="dense (linear + DNN) and CIN fields",
    vector_routes_fields_only="dense (linear) and CIN fields (CIN + DNN)",
)
