"""The trainable model: knowledge adaptor + deepctr backbone, and the input tensor between them.

deepctr models take one float tensor X whose columns are laid out by `model.feature_index`
(name -> column range). `KnowledgeCTRModel.forward(ids, vectors, missing)` runs the adaptor on
the batch's vectors and assembles X from three sources:
  * the int64 id matrix of `CTRData` (sparse ids, genre list, history and its length),
  * the adaptor outputs (one DenseFeat per vector, named after the vector table) and one
    missing-indicator DenseFeat per vector (`<vector>__missing`, 1 = the entity had no vector),
  * zeros for the knowledge-field placeholders (`<vector>__field`), whose embeddings the
    backbone replaces with projected adaptor outputs (see backbone.KnowledgeFieldsMixin).
Gradients flow from the backbone through X into the adaptor, so both train jointly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recaug.ctr_models.adaptor import KnowledgeAdaptor, build_adaptor
from recaug.ctr_models.backbone import Backbone, KnowledgeField
from recaug.ctr_models.data import SPARSE_FIELDS, FeatureSpec
from recaug.ctr_models.deepctr_import import BaseModel, DenseFeat, SparseFeat, VarLenSparseFeat
from recaug.ctr_models.zoo import get_backbone
from recaug.core.config import CTRConfig


def feature_columns(
    spec: FeatureSpec, adaptor_dims: Sequence[int], embedding_dim: int, backbone: Backbone, *, vector_dnn_copy: bool
) -> tuple[list, list, list[KnowledgeField]]:
    """(linear_columns, dnn_columns, knowledge_fields) for one backbone. `vector_dnn_copy` False: a
    backbone with knowledge fields gets the adaptor outputs as dense inputs of its linear part only
    (its DNN sees them through their fields; the missing flags still enter the DNN)."""
    V = spec.vocabularies
    sparse = [SparseFeat(name, V[name].size, embedding_dim) for name in SPARSE_FIELDS]
    genres = VarLenSparseFeat(SparseFeat("genres", V["genres"].size, embedding_dim), maxlen=spec.genre_maxlen, combiner="mean")
    dense, fields, placeholders = [], [], []
    fields_only = backbone.knowledge_fields and not vector_dnn_copy
    if fields_only and not backbone.uses_linear:
        raise ValueError(f"{backbone.name} has no linear part: its DNN is the only dense route, so it needs vector_dnn_copy")
    dnn_dense = []
    for vec, dim in zip(spec.vectors, adaptor_dims):
        dense.append(DenseFeat(vec.slug, dim))
        dense.append(DenseFeat(f"{vec.slug}__missing", 1))
        dnn_dense.extend(dense[-1:] if fields_only else dense[-2:])
        if backbone.knowledge_fields:
            placeholders.append(SparseFeat(f"{vec.slug}__field", 1, embedding_dim))
            fields.append(KnowledgeField(f"{vec.slug}__field", vec.slug, dim))
    history = []
    if backbone.uses_history:
        history.append(
            VarLenSparseFeat(
                SparseFeat("hist_item_id", V["item_id"].size, embedding_dim, embedding_name="item_id"),
                maxlen=spec.history_len,
                length_name="hist_len",
            )
        )
    # placeholders are SparseFeats after the real ones, so the real fields keep their positions
    dnn = sparse + placeholders + [genres] + history + dnn_dense
    linear = (sparse + [genres] + dense) if backbone.uses_linear else []
    return linear, dnn, fields


def resolve_vector_dnn_copy(backbone: Backbone, setting: bool | None, adaptor: str) -> bool:
    """Whether the backbone's DNN takes the adaptor outputs as dense inputs (`ctr.vector_dnn_copy`;
    None = the backbone's choice for a learnt adaptor, the copy for `raw`, whose d-dim vectors would
    otherwise reach the DNN only in embedding_dim). Always for a backbone without knowledge fields (its
    DNN is their route) and without vectors (both layouts are the same model)."""
    if not backbone.knowledge_fields or adaptor == "none":
        return True
    if setting is not None:
        return bool(setting)
    return True if adaptor == "raw" else backbone.vector_dnn_copy


def distinct_with_inverse(values: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.unique(values, return_inverse=True)` for int64 vocabulary indices in [0, size) (a table's
    rows): sorted distinct values and each value's position among them. For a vocabulary up to a few
    times the number of values, a presence map over the vocabulary does it without a sort (~0.1 ms
    against ~0.65 ms for a window's 16,384 ids of a 1,682-row table)."""
    if size > 4 * values.numel():
        return torch.unique(values, return_inverse=True)
    seen = torch.zeros(size, dtype=torch.bool, device=values.device)
    seen[values] = True
    distinct = seen.nonzero().squeeze(1)
    slot = torch.empty(size, dtype=torch.long, device=values.device)
    slot[distinct] = torch.arange(distinct.numel(), device=values.device)
    return distinct, slot[values]


class AdaptorWindow:
    """The adaptor's outputs for the distinct entities of several consecutive batches, computed in one
    forward pass. Each batch reads its rows from detached leaves, so the backbone's backward pass
    stops there and only sums gradients into them; `backward()` then sends those sums through the
    adaptor once. Within a window the adaptor's weights do not change, so its outputs are exactly
    the current adaptor's: what changes is that it steps once per window (on the window's summed
    gradient) while the backbone steps every batch. The window's own batches (the same tensors)
    find their rows by the positions `torch.unique` gave when the window was opened; any other id
    matrix is searched, and must lie inside the window."""

    def __init__(self, distinct: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                 batches: Sequence[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]] = ()):
        self.distinct = list(distinct)  # sorted vocabulary indices, one tensor per vector table
        self._outputs = list(outputs)
        self.leaves = [o.detach().requires_grad_(True) for o in self._outputs]
        self._batches = list(batches)  # (id matrix, its rows' positions per table, its missing flags)

    def positions(self, ids: torch.Tensor, columns: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(each table's row positions of the batch's entities, the batch's missing flags if the
        window looked them up: only for its own batches)."""
        for batch, pos, missing in self._batches:
            if batch is ids:
                return pos, missing
        return [self._search(k, ids[:, col]) for k, col in enumerate(columns)], None

    def _search(self, k: int, entity: torch.Tensor) -> torch.Tensor:
        distinct = self.distinct[k]
        pos = torch.searchsorted(distinct, entity.contiguous()).clamp_(max=max(distinct.numel() - 1, 0))
        if distinct.numel() == 0 or not torch.equal(distinct.index_select(0, pos), entity):
            raise ValueError("a batch has users or items outside its adaptor window: open the window over that batch")
        return pos

    def rows(self, k: int, pos: torch.Tensor) -> torch.Tensor:
        # an embedding lookup, not index_select: in a training step the index_select backward
        # (index_add, a scatter on the CPU) took ~530 us per batch and table, the embedding's ~110 us
        return F.embedding(pos, self.leaves[k])

    def backward(self) -> None:
        pairs = [(o, leaf.grad) for o, leaf in zip(self._outputs, self.leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


class RoutedInputs(torch.Tensor):
    """X with its knowledge columns routed: `X[:, a:b]` over exactly the columns of one adaptor output
    returns that output itself, so its gradient goes straight to the adaptor. X itself needs no
    gradient then; through plain slices of X, each of the ~10 column reads per step made autograd
    allocate and zero a gradient of X's full size and sum them (about 10% of a DeepFM step with the
    adaptor). Every other index is an ordinary read of X. deepctr and the knowledge-field mixin read
    every input as `X[:, start:end]` by `feature_index`; a test checks each backbone's gradient
    reaches the adaptor through the routes."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results are plain tensors

    @staticmethod
    def __new__(cls, data: torch.Tensor, routes: dict[tuple[int, int], torch.Tensor]):
        x = torch.Tensor._make_subclass(cls, data, False)
        x.routes = routes
        return x

    def __getitem__(self, index):
        if (isinstance(index, tuple) and len(index) == 2 and isinstance(index[0], slice) and index[0] == slice(None)
                and isinstance(index[1], slice) and index[1].step is None):
            start, stop = index[1].start, index[1].stop
            routed = self.routes.get((start, stop))
            if routed is not None:
                return routed
            start, stop = 0 if start is None else start, self.shape[1] if stop is None else stop
            if any(start < b and a < stop for a, b in self.routes):  # would read values without their gradient
                raise RuntimeError(f"X[:, {start}:{stop}] overlaps an adaptor output's columns without being them")
        return super().__getitem__(index)


class KnowledgeCTRModel(nn.Module):
    def __init__(self, backbone: BaseModel, adaptor: KnowledgeAdaptor, spec: FeatureSpec, backbone_def: Backbone):
        super().__init__()
        self.backbone = backbone
        self.adaptor = adaptor
        self.model_name = backbone_def.name
        # the layout as built (checkpoints record it as ctr.vector_dnn_copy): do the adaptor outputs
        # enter the DNN as dense inputs? Trivially yes without vectors
        dnn_dense = {c.name for c in backbone.dnn_feature_columns if isinstance(c, DenseFeat)}
        slugs_used = [v.slug for v in spec.vectors] if adaptor.output_dims else []
        self.vector_dnn_copy = all(s in dnn_dense for s in slugs_used)
        if not self.vector_dnn_copy and any(s in dnn_dense for s in slugs_used):
            raise RuntimeError("some adaptor outputs enter the DNN and some do not; feature_columns builds one layout")
        routes = backbone_def.vector_routes
        if not self.vector_dnn_copy:
            routes = backbone_def.vector_routes_fields_only or f"{routes}, no dense copy in the DNN"
        self.vector_routes = routes if adaptor.output_dims else "none"
        # which source fills each column range of X, in column order
        id_cols = spec.id_columns()
        slugs = {v.slug: k for k, v in enumerate(spec.vectors)}
        plan: list[tuple[str, int, int]] = []
        at = 0
        for name, (start, end) in sorted(backbone.feature_index.items(), key=lambda kv: kv[1][0]):
            if start != at:
                raise RuntimeError(f"deepctr feature_index has a gap before {name!r}")
            at = end
            if name in id_cols:
                lo, hi = id_cols[name]
                if hi - lo != end - start:
                    raise RuntimeError(f"feature {name!r}: {end - start} input columns but the id matrix has {hi - lo}")
                plan.append(("ids", lo, hi))
            elif name in slugs:
                plan.append(("adaptor", slugs[name], end - start))
            elif name.endswith("__missing") and name[: -len("__missing")] in slugs:
                k = slugs[name[: -len("__missing")]]
                plan.append(("missing", k, k + 1))
            elif name.endswith("__field") and name[: -len("__field")] in slugs:
                plan.append(("zeros", 0, end - start))
            else:
                raise RuntimeError(f"no input source for deepctr feature {name!r}")
        self._plan = plan
        self.input_width = at
        # the id-matrix column of each vector's entity (its user or item vocabulary index)
        self._entity_columns = [id_cols[f"{v.kind}_id"][0] for v in spec.vectors]
        self._attached: object | None = None
        self.route_inputs = True  # RoutedInputs; False builds X as one tensor with gradient (tests compare)

    def attach_vectors(self, vectors: Sequence) -> None:
        """Keep the vector tables (`data.EntityVectors`, one row per vocabulary index) inside the model
        as buffers, so a batch's vectors are looked up by index here instead of being gathered and
        passed in per sample. Buffers are not persistent: checkpoints stay the learnt weights only.
        Attaching the same tables again is free."""
        if self._attached is vectors:
            return
        if len(vectors) != len(self._entity_columns):
            raise ValueError(f"the model was built for {len(self._entity_columns)} vector table(s), got {len(vectors)}")
        for k, ev in enumerate(vectors):
            self.register_buffer(f"vector_table_{k}", ev.matrix, persistent=False)
            self.register_buffer(f"vector_missing_{k}", ev.missing, persistent=False)
        self._attached = vectors

    def _require_tables(self) -> None:
        if self._attached is None:
            raise RuntimeError("no vectors given and no vector tables attached: call attach_vectors(data.vectors)")

    def _missing_flags(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, vectors] float: 1 where the sample's user/item has no vector, from the attached tables."""
        return torch.stack([getattr(self, f"vector_missing_{k}").index_select(0, ids[:, col])
                            for k, col in enumerate(self._entity_columns)], dim=1)

    def adaptor_window(self, batches: Sequence[torch.Tensor]) -> AdaptorWindow:
        """Run the adaptor once over the distinct users/items of `batches` (id matrices) from the
        attached tables; pass the result to `forward(..., window=)` for each of those batches."""
        self._require_tables()
        sizes = [ids.shape[0] for ids in batches]
        distinct, positions, flags = [], [], []
        for k, col in enumerate(self._entity_columns):
            entities = torch.cat([ids[:, col] for ids in batches])
            rows = getattr(self, f"vector_table_{k}").shape[0]
            uniq, inverse = distinct_with_inverse(entities, rows)
            distinct.append(uniq)
            positions.append(inverse.split(sizes))
            flags.append(getattr(self, f"vector_missing_{k}").index_select(0, entities))
        # the window's missing flags in one lookup, so a batch step looks up none
        missing = torch.stack(flags, dim=1).split(sizes)
        tables = [getattr(self, f"vector_table_{k}").index_select(0, u) for k, u in enumerate(distinct)]
        per_batch = [(ids, [pos[j] for pos in positions], missing[j]) for j, ids in enumerate(batches)]
        return AdaptorWindow(distinct, self.adaptor(tables), per_batch)

    def _window_inputs(self, ids: torch.Tensor, window: AdaptorWindow) -> tuple[list[torch.Tensor], torch.Tensor]:
        positions, missing = window.positions(ids, self._entity_columns)
        if missing is None:
            missing = self._missing_flags(ids)
        return [window.rows(k, pos) for k, pos in enumerate(positions)], missing

    def _indexed_inputs(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Adaptor outputs and missing flags of a batch from the attached tables. The adaptor is a
        function of the entity's vector alone, so it runs once per distinct user/item of the batch
        and its outputs are spread back to the samples (same values, fewer rows to compute)."""
        self._require_tables()
        distinct, back = [], []
        for k, col in enumerate(self._entity_columns):
            table = getattr(self, f"vector_table_{k}")
            uniq, inverse = distinct_with_inverse(ids[:, col], table.shape[0])
            distinct.append(table.index_select(0, uniq))
            back.append(inverse)
        outputs = [o.index_select(0, i) for o, i in zip(self.adaptor(distinct), back)]
        return outputs, self._missing_flags(ids)

    @property
    def uses_vectors(self) -> bool:
        return bool(self.adaptor.output_dims)

    def adaptor_outputs(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.adaptor(vectors) if self.uses_vectors else []

    def assemble_inputs(
        self,
        ids: torch.Tensor,
        vectors: Sequence[torch.Tensor] | None = None,
        missing: torch.Tensor | None = None,
        window: AdaptorWindow | None = None,
    ) -> torch.Tensor:
        """The X tensor the deepctr backbone expects (float32 [B, input_width]). Without `vectors`,
        they come from `window` if given, else from the attached tables (`attach_vectors`)."""
        if window is not None and self.uses_vectors:
            outputs, missing = self._window_inputs(ids, window)
        elif vectors is None and self.uses_vectors:
            outputs, missing = self._indexed_inputs(ids)
        else:
            outputs = self.adaptor_outputs(vectors or [])
        ids_f = ids.float()  # exact for indices < 2**24
        pieces, routes, at = [], {}, 0
        for source, a, b in self._plan:
            if source == "ids":
                piece = ids_f[:, a:b]
            elif source == "adaptor":
                piece = outputs[a]
                if piece.requires_grad and self.route_inputs:  # read by its columns, with its gradient
                    routes[(at, at + piece.shape[1])] = piece
                    piece = piece.detach()
            elif source == "missing":
                piece = missing[:, a:b]
            else:
                piece = ids_f.new_zeros((ids.shape[0], b))
            pieces.append(piece)
            at += piece.shape[1]
        x = torch.cat(pieces, dim=1)
        return RoutedInputs(x, routes) if routes else x

    def forward(
        self,
        ids: torch.Tensor,
        vectors: Sequence[torch.Tensor] | None = None,
        missing: torch.Tensor | None = None,
        window: AdaptorWindow | None = None,
    ) -> torch.Tensor:
        """Click probabilities, float32 [B]."""
        return self.backbone(self.assemble_inputs(ids, vectors, missing, window)).squeeze(-1)

    def regularization_loss(self) -> torch.Tensor:
        # deepctr's own L2 terms (embeddings, linear, DNN as configured per model) plus DIN's aux loss
        return self.backbone.get_regularization_loss() + self.backbone.aux_loss


def build_model(model_name: str, spec: FeatureSpec, cfg: CTRConfig, seed: int) -> KnowledgeCTRModel:
    backbone_def = get_backbone(model_name)
    dims = [v.dim for v in spec.vectors] if cfg.adaptor != "none" else []
    if max(v.size for v in spec.vocabularies.values()) >= 2**24:
        raise ValueError("a vocabulary has >= 2**24 values; deepctr's float input cannot index it exactly")
    torch.manual_seed(seed)
    adaptor = build_adaptor(
        cfg.adaptor,
        dims,
        n_shared=cfg.adaptor_shared_experts,
        n_dedicated=cfg.adaptor_dedicated_experts,
        hidden=cfg.adaptor_hidden_dim,
    )
    copy = resolve_vector_dnn_copy(backbone_def, cfg.vector_dnn_copy, cfg.adaptor)
    linear, dnn, fields = feature_columns(spec, adaptor.output_dims, cfg.embedding_dim, backbone_def, vector_dnn_copy=copy)
    backbone = backbone_def.build(linear, dnn, seed=seed, knowledge_fields=fields)
    return KnowledgeCTRModel(backbone, adaptor, spec, backbone_def)
