"""Frequency tiers of a field (AutoSrh's feature blocks, section 4.2.1) as TorchRec tables.

A tiered field f with tier widths (d_f,0 .. d_f,L-1) has one table per (field, tier) in the
arm's one EmbeddingBagCollection, `emb_<f>__tier<t>`, holding only the rows (ids) of tier t:
the budget is sum over tables of rows x width. A per-field remap buffer sends every id to its
tier and its row in that tier's table (`TierMaps`, registered in the module, so the state_dict
and with it the DCP checkpoint carry it). A batch's KJT is split into one feature per
(field, tier), each row's id landing only in its tier's feature (`split_kjt`): sum pooling per
tier is then exact, a row's other tiers pooling nothing.

What the heads see: one pooled embedding per field, of the field's width d_f = the number of
control columns any of its tiers kept (the union). Each tier's pooled embedding is projected
to that width by zero-padding: its kept columns go to their place in the union, the columns it
did not keep read 0 (`assemble`). A column keeps its meaning (the control column it descends
from) across tiers, so the head's column-tied parameters (SSEDS eq. 13's projections, the first
DNN layer) are indexed by the union's columns and carried over by models/realloc.py as for a
field-level arm. Multi-valued (mean-pooled) fields pool SUM per tier and divide the field's sum
by its ids' count, which is the mean over all of a row's ids whatever their tiers.

>>> import torch
>>> local_rows(torch.tensor([1, 0, 1, 0, 0]), 2).tolist()
[0, 0, 1, 1, 2]
>>> tier_feature("user", 1), split_feature("user__tier1"), split_feature("user")
('user__tier1', ('user', 1), ('user', None))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

SEP = "__tier"


def tier_feature(field: str, tier: int) -> str:
    """The KJT feature (and table suffix) of one (field, tier)."""
    return f"{field}{SEP}{tier}"


def split_feature(name: str) -> tuple[str, int | None]:
    """(field, tier) of a tier feature; (name, None) for a plain field."""
    field, sep, tier = name.rpartition(SEP)
    return (field, int(tier)) if sep and tier.isdigit() else (name, None)


@dataclass(frozen=True)
class TierShape:
    """One tiered field as its embedding sees it: per tier, the positions of its columns in the
    field's pooled output (width = the field's dim) and the rows of its table."""

    positions: tuple[tuple[int, ...], ...]
    rows: tuple[int, ...]

    def widths(self) -> list[int]:
        return [len(p) for p in self.positions]

    def active(self) -> list[int]:
        """The tiers that have a table (some rows and some columns)."""
        return [t for t, (p, n) in enumerate(zip(self.positions, self.rows)) if p and n]

    def params(self) -> int:
        return sum(n * len(p) for p, n in zip(self.positions, self.rows))


def local_rows(tier_of: torch.Tensor, tiers: int) -> torch.Tensor:
    """Row of every id in its tier's table: its rank among the ids of its tier, in id order
    (one stable sort, no loop)."""
    n = tier_of.numel()
    order = torch.argsort(tier_of * n + torch.arange(n), stable=True)
    counts = torch.bincount(tier_of, minlength=tiers)
    starts = torch.cumsum(counts, 0) - counts
    out = torch.empty(n, dtype=torch.long)
    out[order] = torch.arange(n) - starts[tier_of[order]]
    return out


class TierMaps(nn.Module):
    """Per tiered field two [rows] int64 buffers: `<f>_tier` (the id's tier) and `<f>_row` (its
    row in that tier's table). Persistent buffers, so checkpoints carry the assignment."""

    def __init__(self, shapes: dict[str, TierShape]):
        super().__init__()
        self.shapes = dict(shapes)
        for f, s in shapes.items():
            default = torch.repeat_interleave(torch.arange(len(s.rows)), torch.tensor(s.rows))
            self.register_buffer(f"{f}_tier", default.clone())
            self.register_buffer(f"{f}_row", local_rows(default, len(s.rows)))

    def assign(self, field: str, tier_of) -> None:
        """Set the field's tiers (in place, so a wrapped or sharded model sees them): `tier_of`
        must give every tier the number of rows its table has."""
        t = torch.as_tensor(tier_of, dtype=torch.long).cpu()
        shape = self.shapes[field]
        if t.numel() != sum(shape.rows):
            raise ValueError(f"tiers of {field!r}: {t.numel()} ids for a field of {sum(shape.rows)} rows")
        counts = torch.bincount(t, minlength=len(shape.rows)).tolist()
        if t.min() < 0 or len(counts) > len(shape.rows) or counts != list(shape.rows):
            raise ValueError(f"tiers of {field!r}: {counts} ids per tier, the tables have {list(shape.rows)} rows")
        getattr(self, f"{field}_tier").copy_(t)
        getattr(self, f"{field}_row").copy_(local_rows(t, len(shape.rows)))

    def tier_of(self, field: str) -> torch.Tensor:
        return getattr(self, f"{field}_tier")

    def ids_of(self, field: str, tier: int) -> torch.Tensor:
        """The ids of one tier in the order of its table's rows."""
        return torch.nonzero(self.tier_of(field).cpu() == tier).flatten()


def split_kjt(kjt: KeyedJaggedTensor, fields: list[str], maps: TierMaps) -> KeyedJaggedTensor:
    """The KJT of the deep collection: every tiered field's ids moved to their tier's feature as
    rows of its table (index_select on the remap buffers), the other tiers of a row empty;
    plain fields unchanged. A tier with no table (no columns kept) receives nothing: its ids
    pool to zeros, as a pruned field does."""
    per_key = kjt.to_dict()
    b = kjt.stride()
    keys, values, lengths = [], [], []
    for f in fields:
        jt = per_key[f]
        v, lens = jt.values(), jt.lengths()
        if f not in maps.shapes:
            keys.append(f), values.append(v), lengths.append(lens)
            continue
        row_of = torch.repeat_interleave(torch.arange(b, device=v.device), lens.long())
        tier = maps.tier_of(f).index_select(0, v.long())
        local = getattr(maps, f"{f}_row").index_select(0, v.long())
        for t in maps.shapes[f].active():
            hit = tier == t
            keys.append(tier_feature(f, t))
            values.append(local[hit].to(v.dtype))
            lengths.append(torch.bincount(row_of[hit], minlength=b).to(lens.dtype))
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=b)


def assemble(pooled: dict[str, torch.Tensor], field: str, dim: int, shape: TierShape, kjt=None) -> torch.Tensor:
    """[B, dim]: the field's tiers' pooled embeddings, each zero-padded to the field's width at
    its columns' positions and summed (a single-valued row has one tier, so this is its id's
    embedding). With `kjt` (a multi-valued field): divided by the row's ids count (the mean)."""
    first = pooled[tier_feature(field, shape.active()[0])] if shape.active() else None
    if first is None:
        raise ValueError(f"tiered field {field!r} has no table")
    out = first.new_zeros(first.size(0), dim)
    for t in shape.active():
        pos = torch.tensor(shape.positions[t], device=first.device)
        out = out.index_add(1, pos, pooled[tier_feature(field, t)])
    if kjt is not None:
        out = out / kjt[field].lengths().clamp_min(1).to(out.dtype).unsqueeze(1)
    return out


def field_tables(weights: dict[str, torch.Tensor], embedding) -> dict[str, torch.Tensor]:
    """Serving weights with every tiered field's tier tables (`emb_<f>__tier<t>`) replaced by
    one field table `emb_<f>` [rows, d_f]: an id's row is its tier row zero-padded at its
    columns' positions (`assemble`'s padding), so a plain per-field lookup computes exactly what
    the tiered arm does. It costs rows x d_f in serving: the tiers save memory in training only."""
    out = dict(weights)
    for f, shape in embedding.tier_shapes.items():
        table = torch.zeros(sum(shape.rows), embedding.dims[f])
        for t in shape.active():
            ids = embedding.tier_maps.ids_of(f, t)
            pos = torch.tensor(shape.positions[t], dtype=torch.long)
            table[ids.unsqueeze(1), pos.unsqueeze(0)] = out.pop(f"emb_{tier_feature(f, t)}").to(table.dtype).cpu()
        out[f"emb_{f}"] = table
    return out
