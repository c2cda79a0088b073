"""Knowledge adaptors: LLM vectors (d-dim, semantic space) -> small dense inputs for a CTR model.

* `hybrid` — KAR's hybrid-expert adaptor (Xi et al. 2023). For T vectors (e.g. the user preference
  vector and the item knowledge vector): `n_shared` experts shared by all vectors plus `n_dedicated`
  experts per vector, each expert an MLP d -> hidden -> 32 (ReLU after each layer, as in KAR's code).
  Vector t's output is a softmax-gated mix of the shared experts and its own dedicated experts,
  the gate computed from vector t alone: out_t = sum_k softmax(W_t x_t)_k * expert_k(x_t).
  Shared experts see every vector, so all vectors must have the same width d. `hidden` is KAR's 128
  by default (`ctr.adaptor_hidden_dim`); 32 trains faster but reached a lower AUC once trained to
  convergence (docs/ctr-models.md).
* `mlp` — one MLP d -> hidden -> 32 per vector (no experts, no gate).
* `raw` — the vectors themselves (d-dim each).
* `none` — no vectors at all; the backbone alone (the baseline).

An adaptor maps a list of [B, d_t] tensors to a list of [B, out_t] tensors (`output_dims`), and is
trained jointly with the backbone (it is a submodule of `KnowledgeCTRModel`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ADAPTOR_KINDS = ("hybrid", "mlp", "raw", "none")
HIDDEN_DIM = 128
OUTPUT_DIM = 32


def expert_mlp(in_dim: int, hidden: int = HIDDEN_DIM, out: int = OUTPUT_DIM, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out), nn.ReLU(), nn.Dropout(dropout)
    )


class KnowledgeAdaptor(nn.Module):
    kind: str = ""

    def __init__(self, input_dims: Sequence[int]):
        super().__init__()
        self.input_dims = tuple(int(d) for d in input_dims)

    @property
    def output_dims(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _check(self, vectors: Sequence[torch.Tensor]) -> None:
        if len(vectors) != len(self.input_dims):
            raise ValueError(f"{self.kind} adaptor was built for {len(self.input_dims)} vector(s), got {len(vectors)}")


class HybridExpertAdaptor(KnowledgeAdaptor):
    kind = "hybrid"

    def __init__(
        self,
        input_dims: Sequence[int],
        n_shared: int = 2,
        n_dedicated: int = 2,
        hidden: int = HIDDEN_DIM,
        out: int = OUTPUT_DIM,
        dropout: float = 0.0,
    ):
        super().__init__(input_dims)
        if not self.input_dims:
            raise ValueError("the hybrid adaptor needs at least one vector table (use adaptor 'none' without vectors)")
        if len(set(self.input_dims)) != 1:
            raise ValueError(
                f"the hybrid adaptor's shared experts need vectors of one width, got {self.input_dims}; "
                "encode every table with one encoder (or one PCA size), or use adaptor 'mlp'"
            )
        if n_shared < 1 or n_dedicated < 1:
            raise ValueError(f"the hybrid adaptor needs >= 1 shared and >= 1 dedicated expert, got {n_shared}, {n_dedicated}")
        d = self.input_dims[0]
        self.n_shared, self.n_dedicated, self.out = n_shared, n_dedicated, out
        self.shared = nn.ModuleList([expert_mlp(d, hidden, out, dropout) for _ in range(n_shared)])
        self.dedicated = nn.ModuleList(
            [nn.ModuleList([expert_mlp(d, hidden, out, dropout) for _ in range(n_dedicated)]) for _ in self.input_dims]
        )
        self.gates = nn.ModuleList([nn.Linear(d, n_shared + n_dedicated) for _ in self.input_dims])

    @property
    def output_dims(self) -> tuple[int, ...]:
        return tuple(self.out for _ in self.input_dims)

    def forward(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Vector t may have its own row count (e.g. the distinct users and the distinct items of a
        batch). Per vector, the first layers of its shared and dedicated experts and its gate run as one
        matrix product, the second layers as one batched product: the same function as one expert
        module at a time, in a few large operations instead of many small ones."""
        self._check(vectors)
        outputs = []
        for t, x in enumerate(vectors):
            experts = [*self.shared, *self.dedicated[t]]
            k, h = len(experts), experts[0][0].out_features
            w1 = torch.cat([e[0].weight for e in experts] + [self.gates[t].weight])  # [k*h + k, d]
            b1 = torch.cat([e[0].bias for e in experts] + [self.gates[t].bias])
            # split, not slicing: its backward is one concatenation, not a zero-filled tensor per slice
            first, logits = torch.addmm(b1, x, w1.t()).split([k * h, k], dim=1)
            hidden = self._dropout(torch.relu(first).reshape(-1, k, h).transpose(0, 1), experts[0][2].p)  # [k, N, h]
            w2 = torch.stack([e[3].weight.t() for e in experts])  # [k, h, out]
            b2 = torch.stack([e[3].bias for e in experts]).unsqueeze(1)  # [k, 1, out]
            out = self._dropout(torch.relu(torch.baddbmm(b2, hidden, w2)), experts[0][5].p)  # [k, N, out]
            gate = torch.softmax(logits, dim=-1).t().unsqueeze(-1)  # [k, N, 1]
            # an elementwise weighted sum: einsum("nk,kno->no") ran as N one-row matrix products
            outputs.append((out * gate).sum(0))
        return outputs

    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return F.dropout(x, p, True) if self.training and p > 0 else x


class MLPAdaptor(KnowledgeAdaptor):
    kind = "mlp"

    def __init__(self, input_dims: Sequence[int], hidden: int = HIDDEN_DIM, out: int = OUTPUT_DIM, dropout: float = 0.0):
        super().__init__(input_dims)
        self.out = out
        self.projections = nn.ModuleList([expert_mlp(d, hidden, out, dropout) for d in self.input_dims])

    @property
    def output_dims(self) -> tuple[int, ...]:
        return tuple(self.out for _ in self.input_dims)

    def forward(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._check(vectors)
        return [proj(x) for proj, x in zip(self.projections, vectors)]


class RawAdaptor(KnowledgeAdaptor):
    kind = "raw"

    @property
    def output_dims(self) -> tuple[int, ...]:
        return self.input_dims

    def forward(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._check(vectors)
        return list(vectors)


class NoAdaptor(KnowledgeAdaptor):
    """The baseline: vectors, if any were passed, are not used."""

    kind = "none"

    def __init__(self, input_dims: Sequence[int] = ()):
        super().__init__(())

    @property
    def output_dims(self) -> tuple[int, ...]:
        return ()

    def forward(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return []


def build_adaptor(
    kind: str,
    input_dims: Sequence[int],
    n_shared: int = 2,
    n_dedicated: int = 2,
    dropout: float = 0.0,
    hidden: int = HIDDEN_DIM,
) -> KnowledgeAdaptor:
    if kind not in ADAPTOR_KINDS:
        raise ValueError(f"unknown adaptor {kind!r}; expected one of {ADAPTOR_KINDS}")
    if kind != "none" and not input_dims:
        raise ValueError(f"adaptor {kind!r} needs at least one vector table; pass vectors or use adaptor 'none'")
    if kind == "hybrid":
        return HybridExpertAdaptor(input_dims, n_shared=n_shared, n_dedicated=n_dedicated, hidden=hidden, dropout=dropout)
    if kind == "mlp":
        return MLPAdaptor(input_dims, hidden=hidden, dropout=dropout)
    if kind == "raw":
        return RawAdaptor(input_dims)
    return NoAdaptor()
