"""Wide & Deep (Cheng et al., DLRS 2016): a linear (wide) part plus a DNN (deep) part.

Knowledge vectors: dense inputs of both the wide and the deep part; there is no field-interaction
block to add them to as fields.
"""

from recaug.ctr_models.backbone import Backbone
from recaug.ctr_models.deepctr_import import WDL

DNN_HIDDEN_UNITS = (256, 128)


def build(linear_columns, dnn_columns, *, seed, knowledge_fields=()):
    if knowledge_fields:
        raise ValueError("WDL takes knowledge vectors as dense inputs only")
    return WDL(linear_columns, dnn_columns, dnn_hidden_units=DNN_HIDDEN_UNITS, seed=seed)


BACKBONE = Backbone(
    name="wdl",
    build=build,
    knowledge_fields=False,
    uses_history=False,
    uses_linear=True,
    vector_routes="dense (wide + deep)",
)
