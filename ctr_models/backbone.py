"""What a backbone file in `zoo/` provides, and the mixin that adds knowledge *fields* to a deepctr model.

Every backbone receives the adaptor outputs as DenseFeat inputs (of its linear part and, unless
`ctr.vector_dnn_copy` says otherwise, of its DNN). Models whose core is a field interaction (FM, CIN, multi-head self-attention, cross network) can also
take each adaptor output as one more *field*: the output is projected to `embedding_dim` and
stands in the embedding list where a placeholder SparseFeat was declared. Declaring the
placeholder as a SparseFeat makes deepctr size everything by itself (field counts of CIN and
AutoInt, input widths of the DNN and the cross net); the mixin only swaps the placeholder's
looked-up embedding for the projection, inside `input_from_feature_columns`, which is where
DeepFM, xDeepFM, AutoInt and DCN collect their field embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from recaug.ctr_models.deepctr_import import BaseModel, SparseFeat


@dataclass(frozen=True)
class KnowledgeField:
    field_name: str  # the placeholder SparseFeat (vocabulary size 1) in the DNN feature columns
    dense_name: str  # the DenseFeat carrying the adaptor output it is computed from
    dense_dim: int


@dataclass(frozen=True)
class Backbone:
    name: str
    # build(linear_columns, dnn_columns, seed=..., knowledge_fields=...) -> a deepctr BaseModel
    build: Callable[..., BaseModel]
    knowledge_fields: bool  # the adaptor outputs also enter the field interaction
    uses_history: bool  # needs the hist_item_id sequence (DIN)
    uses_linear: bool  # has a wide/linear part that reads linear_feature_columns
    vector_routes: str  # where the adaptor outputs go, for docs and reports
    # with knowledge fields: whether each learnt adaptor output (hybrid, mlp) also enters the DNN as a
    # dense input besides its field, which the DNN reads in embedding_dim. The default of
    # `ctr.vector_dnn_copy`; `vector_routes_fields_only` says where the outputs go without the copy
    vector_dnn_copy: bool = True
    vector_routes_fields_only: str = ""


class KnowledgeFieldsMixin:
    """Put before a deepctr model class: `class X(KnowledgeFieldsMixin, DeepFM)`.

    Extra constructor argument: `knowledge_fields` (a sequence of KnowledgeField). With none it
    behaves exactly like the wrapped model.
    """

    def __init__(self, *args, knowledge_fields: Sequence[KnowledgeField] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.knowledge_fields = tuple(knowledge_fields)
        dims = {fc.name: fc.embedding_dim for fc in self.dnn_feature_columns if isinstance(fc, SparseFeat)}
        for f in self.knowledge_fields:
            if f.field_name not in dims:
                raise ValueError(f"knowledge field {f.field_name!r} has no placeholder SparseFeat in the DNN feature columns")
            if f.dense_name not in self.feature_index:
                raise ValueError(f"knowledge field {f.field_name!r}: dense feature {f.dense_name!r} is not an input")
        self.knowledge_projections = nn.ModuleDict(
            {f.field_name: nn.Linear(f.dense_dim, dims[f.field_name]) for f in self.knowledge_fields}
        )
        # The placeholders' embeddings stay in the state dict (checkpoints keep their keys) but are
        # never looked up, so their L2 term would only shrink weights nothing reads: leaving it out
        # saves ~8 operations per placeholder and step and changes no output and no other gradient.
        unused = {id(self.embedding_dict[f.field_name].weight) for f in self.knowledge_fields}
        self.regularization_weight = [
            ([w for w in weights if id(w[1] if isinstance(w, tuple) else w) not in unused], l1, l2)
            for weights, l1, l2 in self.regularization_weight
        ]
        self._fields_cache: tuple | None = None

    def _field_plan(self, feature_columns) -> tuple[list, list[tuple[int, KnowledgeField]]]:
        """(the columns deepctr looks up, [(position in the sparse embedding list, field)]), per
        column list (one list object per model; cached by identity)."""
        if self._fields_cache is not None and self._fields_cache[0] is feature_columns:
            return self._fields_cache[1], self._fields_cache[2]
        by_name = {f.field_name: f for f in self.knowledge_fields}
        sparse = [c for c in feature_columns if isinstance(c, SparseFeat)]
        # sparse_embeddings lists the SparseFeat columns first, in order, then the pooled VarLen ones
        slots = [(i, by_name[c.name]) for i, c in enumerate(sparse) if c.name in by_name]
        looked_up = [c for c in feature_columns if not (isinstance(c, SparseFeat) and c.name in by_name)]
        self._fields_cache = (feature_columns, looked_up, slots)
        return looked_up, slots

    def input_from_feature_columns(self, X, feature_columns, embedding_dict, support_dense=True):
        if not self.knowledge_fields:
            return super().input_from_feature_columns(X, feature_columns, embedding_dict, support_dense)
        # the placeholders are not looked up: their slots take the projected adaptor outputs
        looked_up, slots = self._field_plan(feature_columns)
        sparse_embeddings, dense_values = super().input_from_feature_columns(
            X, looked_up, embedding_dict, support_dense
        )
        for position, f in slots:
            start, end = self.feature_index[f.dense_name]
            field = self.knowledge_projections[f.field_name](X[:, start:end]).unsqueeze(1)  # [B, 1, E]
            sparse_embeddings.insert(position, field)
        return sparse_embeddings, dense_values
