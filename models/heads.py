"""Interaction heads over mixed-dimension field embeddings.

Every head takes the pooled field embeddings e_i ([B, d_i], d_i may differ) and the
first-order sum, and returns logits [B]. The embeddings come as a list, or as their
concatenation [B, sum d_i] (the embedding collection's own output: the hot path then neither
splits nor re-concatenates them, forward or backward). FM-style (vector-wise) interactions first map each
field to one width k with a per-field projection (SSEDS eq. 13); DNN parts and DCN-V2 take the
concatenation [B, sum d_i].

Every head declares which of its parameters are tied to the embedding columns
(`column_tied(fields)`): re-allocation (models/realloc.py) gathers those column by column and
carries every other parameter over unchanged, so a new head type needs no change there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ColumnTied:
    """One head parameter whose `axes` are indexed by embedding columns.

    key:   names the same parameter in every arm's head (a projection by its field, since its
           position in the ParameterList moves when fields come and go);
    value: what the parameter holds now; for a projection the model leaves implicit (d_i == k)
           the identity it stands for, so a field's columns can be gathered from it;
    param: the parameter itself, or None where it is implicit (nothing to carry into);
    field: None for the concatenation of every field's columns (model order), else the one
           field whose columns index `axes`.
    """

    key: str
    value: torch.Tensor
    param: nn.Parameter | None
    axes: tuple[int, ...]
    field: str | None = None


def as_concat(embs) -> torch.Tensor:
    """[B, sum d_i]: the concatenation itself, or the list concatenated."""
    return embs if isinstance(embs, torch.Tensor) else torch.cat(embs, dim=1)


def as_fields(embs, dims: list[int]) -> list[torch.Tensor]:
    """[B, d_i] per field: the list itself, or views of the concatenation."""
    return list(embs.split(dims, dim=1)) if isinstance(embs, torch.Tensor) else list(embs)


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [xavier(nn.Linear(a, b)), nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # no activation after the output layer


def xavier(layer: nn.Linear) -> nn.Linear:
    """Glorot & Bengio (2010) eq. 16's variance, normal, and a zero bias: with near-zero tables
    PyTorch's default (Kaiming-uniform, a=sqrt(5)) learnt a worse model (benchmarks/recipe.py)."""
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class FieldProjections(nn.Module):
    """ē_i = M_i e_i with M_i in R^{k x d_i} (SSEDS eq. 13); identity where d_i == k.

    Stored as one parameter per projected field; `column_ids` lets re-allocation start a
    projection as the selection of the control columns a slim field kept."""

    def __init__(self, dims: list[int], k: int):
        super().__init__()
        self.k, self.dims = k, list(dims)
        self.weights = nn.ParameterList()
        self.index = []  # per field: position in self.weights, or -1 for identity
        for d in dims:
            if d == k:
                self.index.append(-1)
            else:
                w = torch.zeros(k, d)
                w[torch.arange(min(d, k)), torch.arange(min(d, k))] = 1.0
                self.index.append(len(self.weights))
                self.weights.append(nn.Parameter(w))
        # fields grouped by width: one bmm per width instead of one matmul per field
        by_width: dict[int, list[int]] = {}
        for pos, (d, i) in enumerate(zip(self.dims, self.index)):
            if i >= 0:
                by_width.setdefault(d, []).append(pos)
        self.groups = list(by_width.values())

    def forward(self, embs) -> torch.Tensor:
        if not self.groups:  # every field already has width k: nothing to project
            if isinstance(embs, torch.Tensor):
                return embs.reshape(len(embs), len(self.dims), self.k)  # [B, F, k], a view
            return torch.stack(embs, dim=1)  # [B, F, k]
        fields = as_fields(embs, self.dims)
        out = list(fields)
        for group in self.groups:
            x = torch.stack([fields[p] for p in group])  # [G, B, d]
            m = torch.stack([self.weights[self.index[p]] for p in group])  # [G, k, d]
            for p, y in zip(group, torch.bmm(x, m.transpose(1, 2)).unbind(0)):  # [G, B, k]
                out[p] = y
        return torch.stack(out, dim=1)  # [B, F, k]

    def column_tied(self, fields: list[str]) -> list[ColumnTied]:
        """M_i (k x d_i) per field, its columns (axis 1) indexed by field i's columns."""
        out = []
        for f, d, i in zip(fields, self.dims, self.index):
            w = self.weights[i] if i >= 0 else None
            value = w.detach() if w is not None else torch.eye(self.k, d)
            out.append(ColumnTied(f"proj[{f}]", value, w, (1,), f))
        return out


def dnn_input(dnn: nn.Sequential) -> list[ColumnTied]:
    """The first layer of a DNN over the concatenation: its input columns (axis 1)."""
    w = dnn[0].weight
    return [ColumnTied("dnn.0.weight", w.detach(), w, (1,))]


def fm_interaction(v: torch.Tensor) -> torch.Tensor:
    """Second-order FM term 1/2 sum_k [(sum_i v_ik)^2 - sum_i v_ik^2] for v [B, F, k]
    (Rendle 2010, eq. 6's linear-time form).

    >>> v = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # one row, two fields: <v_1, v_2> = 11
    >>> round(fm_interaction(v).item(), 4)
    11.0
    """
    return _FMInteraction.apply(v)


class _FMInteraction(torch.autograd.Function):
    """The FM term with its gradient written out, d/dv_ik = sum_j v_jk - v_ik: autograd's own
    graph (v * v, its two-sided backward, the sums' expansions) makes four more passes over the
    [B, F, k] tensor, memory-bound and about 5% of a one-thread DeepFM step (issue 15)."""

    @staticmethod
    def forward(ctx, v):
        s = v.sum(dim=1)  # [B, k]
        ctx.save_for_backward(v, s)
        # sum_i,k v_ik^2 as a squared norm: one pass, no [B, F, k] temporary
        return 0.5 * ((s * s).sum(dim=1) - torch.linalg.vector_norm(v.flatten(1), dim=1).square())

    @staticmethod
    def backward(ctx, grad):
        v, s = ctx.saved_tensors
        # grad * s - grad * v in one fused pass (addcmul), not a broadcast subtract then a multiply
        return torch.addcmul((grad[:, None] * s).unsqueeze(1), v, grad[:, None, None], value=-1)


def deepfm_inputs(e: torch.Tensor, num_fields: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepFM's two uses of the concatenation e [B, F * k] at uniform width k: the DNN's input
    (bf16 under autocast, else e itself) and the FM term [B] over e viewed as [B, F, k].

    >>> e = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # one row, two fields of width 2: <v_1, v_2> = 11
    >>> x, fm = deepfm_inputs(e, 2, 2)
    >>> x.dtype, round(fm.item(), 4)
    (torch.float32, 11.0)
    """
    cast = torch.is_autocast_enabled(e.device.type)
    with torch.autocast(e.device.type, enabled=False):
        return _DeepFMInputs.apply(e, num_fields, k, cast)


class _DeepFMInputs(torch.autograd.Function):
    """One node for both uses of e, so that e's gradient takes two passes over [B, F * k]: the FM
    gradient, then the DNN's added into it in place (read as bf16 under autocast). Autograd's
    own graph makes three under autocast (the cast's fp32 copy of the DNN's gradient, the FM
    gradient, their sum into a new tensor) and allocates a third tensor in fp32; these passes
    are memory-bound (issue 15, benchmarks/training.py `levers`)."""

    @staticmethod
    def forward(ctx, e, num_fields, k, cast):
        v = e.view(len(e), num_fields, k)
        s = v.sum(dim=1)  # [B, k]
        ctx.save_for_backward(v, s)
        fm = 0.5 * ((s * s).sum(dim=1) - torch.linalg.vector_norm(e, dim=1).square())  # Rendle eq. 6
        return (e.to(torch.bfloat16) if cast else e.view_as(e)), fm

    @staticmethod
    def backward(ctx, grad_x, grad_fm):
        v, s = ctx.saved_tensors
        # d fm / d v_ik = sum_j v_jk - v_ik, as in _FMInteraction.backward
        out = torch.addcmul((grad_fm[:, None] * s).unsqueeze(1), v, grad_fm[:, None, None], value=-1)
        out = out.view(len(v), -1)
        if grad_x is not None:
            out.add_(grad_x)
        return out, None, None, None


class FMHead(nn.Module):
    def __init__(self, dims: list[int], k: int, mlp_sizes=()):
        super().__init__()
        self.proj = FieldProjections(dims, k)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, embs, wide):
        return self.bias + wide + fm_interaction(self.proj(embs))

    def column_tied(self, fields: list[str]) -> list[ColumnTied]:
        return self.proj.column_tied(fields)


class DeepFMHead(nn.Module):
    """DeepFM: FM over projected embeddings + a DNN over the concatenation + first order."""

    def __init__(self, dims: list[int], k: int, mlp_sizes=(256, 128)):
        super().__init__()
        self.proj = FieldProjections(dims, k)
        self.dnn = mlp([sum(dims), *mlp_sizes, 1])
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, embs, wide):
        if isinstance(embs, torch.Tensor) and not self.proj.groups:  # the hot path: no projection
            x, fm = deepfm_inputs(embs, len(self.proj.dims), self.proj.k)
            return self.bias + wide + fm + self.dnn(x).squeeze(-1)
        return self.plain_forward(embs, wide)

    def plain_forward(self, embs, wide):
        """Any layout (per-field list, projected widths): the two uses of the concatenation as
        autograd builds them."""
        deep = self.dnn(as_concat(embs)).squeeze(-1)
        return self.bias + wide + fm_interaction(self.proj(embs)) + deep

    def column_tied(self, fields: list[str]) -> list[ColumnTied]:
        return self.proj.column_tied(fields) + dnn_input(self.dnn)


class WideDeepHead(nn.Module):
    """Wide & Deep: first-order (wide) logit + a DNN over the concatenation."""

    def __init__(self, dims: list[int], k: int, mlp_sizes=(256, 128)):
        super().__init__()
        self.dnn = mlp([sum(dims), *mlp_sizes, 1])
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, embs, wide):
        return self.bias + wide + self.dnn(as_concat(embs)).squeeze(-1)

    def column_tied(self, fields: list[str]) -> list[ColumnTied]:
        return dnn_input(self.dnn)


class CrossLayer(nn.Module):
    """DCN-V2 cross layer: x_{l+1} = x_0 * (W x_l + b) + x_l (full-rank W)."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.linear.weight, std=width**-0.5 * 0.1)

    def forward(self, x0, x):
        return x0 * self.linear(x) + x


class DCNv2Head(nn.Module):
    """DCN-V2 (stacked): cross layers over the concatenation, then a DNN."""

    def __init__(self, dims: list[int], k: int, mlp_sizes=(256, 128), layers: int = 2):
        super().__init__()
        width = sum(dims)
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(layers))
        self.dnn = mlp([width, *mlp_sizes, 1])

    def forward(self, embs, wide):
        x0 = x = as_concat(embs)
        for layer in self.cross:
            x = layer(x0, x)
        return self.dnn(x).squeeze(-1)

    def column_tied(self, fields: list[str]) -> list[ColumnTied]:
        """Every cross layer on both axes (W is [width, width], b is [width]), then the DNN input."""
        out = []
        for n, layer in enumerate(self.cross):
            w, b = layer.linear.weight, layer.linear.bias
            out += [
                ColumnTied(f"cross.{n}.linear.weight", w.detach(), w, (0, 1)),
                ColumnTied(f"cross.{n}.linear.bias", b.detach(), b, (0,)),
            ]
        return out + dnn_input(self.dnn)


HEADS = {"fm": FMHead, "deepfm": DeepFMHead, "wdl": WideDeepHead, "dcnv2": DCNv2Head}
USES_WIDE = {"fm": True, "deepfm": True, "wdl": True, "dcnv2": False}
