"""DIN (Zhou et al., KDD 2018): attention of the candidate item over the user's history, then a DNN.

History: `hist_item_id` (shares the item_id embedding), newest `history_len` items — the prompt
context followed by earlier positive train samples. Knowledge vectors: dense DNN inputs only;
DIN has no field-interaction block to add them to (its attention is item-to-history).
"""

from recaug.ctr_models.backbone import Backbone
from recaug.ctr_models.deepctr_import import DIN

DNN_HIDDEN_UNITS = (256, 128)
ATT_HIDDEN_UNITS = (64, 16)


def build(linear_columns, dnn_columns, *, seed, knowledge_fields=()):
    if knowledge_fields:
        raise ValueError("DIN takes knowledge vectors as dense inputs only")
    return DIN(
        dnn_columns,
        history_feature_list=["item_id"],
        dnn_hidden_units=DNN_HIDDEN_UNITS,
        att_hidden_size=ATT_HIDDEN_UNITS,
        seed=seed,
    )


BACKBONE = Backbone(
    name="din",
    build=build,
    knowledge_fields=False,
    uses_history=True,
    uses_linear=False,
    vector_routes="dense (DNN)",
)
