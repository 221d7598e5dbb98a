"""Re-allocation: carry a trained slim arm into a new shape without starting over.

Every embedding column of every arm is named by the control column it descends from
(`ArmSpec.column_ids`). The new slim arm is built for the new allocation; then every tensor
tied to columns is gathered column by column:
  - a column the slim arm already had keeps its trained values and optimizer state;
  - a newly granted column starts from the control arm's column (the "winning ticket") with
    the control's optimizer state.
Tensors tied to columns: the embedding tables and their fused optimizer state, and the head
parameters the head declares column-tied (`column_tied`, models/heads.py: the per-field
projections of SSEDS eq. 13, whose control value is the identity, so a granted column starts as
the unit vector of its control coordinate; the first DNN layer's input columns; DCN-V2's cross
layers on both axes), each with its Adam moments gathered the same way. Everything else
(hidden layers, biases) continues from the old slim arm, Adam state included. With the
interaction width fixed to the control's, a slim arm cut from the control this way computes
exactly the masked control model (tests/test_realloc.py).

Under sharding the new arm is a new DMP model with its own plan (the planner may move tables
whose widths changed); every table and its optimizer state are gathered whole over the ranks
(`gather_full`, one all-reduce per tensor) and the new plan's shards take their blocks, so a
kept column carries its values and state across ranks (tests/test_distributed.py). The cost is
one whole table in CPU memory at a time on every rank.

Frequency tiers (models/tiers.py): a tiered field's tables hold the rows of their tier only, so
columns are carried per id: every row of a new (field, tier) table is the id it stands for,
its kept columns from the table that id lived in in the old arm (its old tier's, or the field's
one table), the others from the control's field table. An id that moves tier keeps what the two
tiers' columns share; row-wise optimizer state follows the id the same way.
"""

from __future__ import annotations

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.ctr import ctr_model
from dimstream.models.distributed import copy_blocks, gather_full, state_layout
from dimstream.models.tiers import split_feature, tier_feature
from dimstream.models.vocab import vocabs_of

Column = tuple[str, int]


def _columns(spec: ArmSpec, fields: list[str]) -> list[Column]:
    return [(f, j) for f in fields for j in spec.column_ids.get(f, [])[: spec.dims.get(f, 0)]]


def _full(t) -> torch.Tensor:
    """The whole table (or optimizer state) of a sharded tensor, on every rank, whichever rank
    holds which shard (collective); a plain tensor as it is."""
    return gather_full(t)


def _assign(target, value: torch.Tensor) -> None:
    """Copy the whole tensor `value` into `target`: a sharded tensor takes its local blocks
    (the new plan decides which rank holds what), a plain one all of it."""
    if isinstance(target, ShardedTensor):
        copy_blocks(target, value)
    else:
        target.copy_(value)


def _gather(
    new_cols: list[Column],
    old_cols: list[Column],
    ctrl_cols: list[Column],
    old: torch.Tensor | None,
    ctrl: torch.Tensor,
    axes: tuple[int, ...],
) -> torch.Tensor:
    """Gather along `axes` (all indexed by the same column list): from `old` where every index
    of the element is an old column, else from `ctrl`."""
    old_pos = {c: i for i, c in enumerate(old_cols)}
    ctrl_pos = {c: i for i, c in enumerate(ctrl_cols)}
    in_old = torch.tensor([c in old_pos for c in new_cols], dtype=torch.bool)
    oi = torch.tensor([old_pos.get(c, 0) for c in new_cols], dtype=torch.long)
    ci = torch.tensor([ctrl_pos[c] for c in new_cols], dtype=torch.long)
    out_c, out_o, mask = ctrl, old, None
    for ax in axes:
        out_c = out_c.index_select(ax, ci)
        if old is not None and len(old_cols):
            out_o = out_o.index_select(ax, oi)
        shape = [1] * ctrl.dim()
        shape[ax] = len(new_cols)
        m = in_old.view(shape)
        mask = m if mask is None else mask & m
    if old is None or not len(old_cols):
        return out_c.clone()
    return torch.where(mask, out_o, out_c)


def reallocate(old: Arm, control: Arm, spec: ArmSpec, build) -> Arm:
    """A new arm of shape `spec`, carried over from `old` (same name) and `control`.

    build(spec) -> Arm constructs a fresh arm (the daemon's own builder)."""
    new = build(spec)
    with torch.no_grad():
        _carry_tables(new, old, control, spec)
        _carry_head(new, old, control)
        _carry_vocab(new, old, control)
    return new


def _carry_vocab(new: Arm, old: Arm, control: Arm) -> None:
    """Managed fields keep their id -> row mapping (and counts), so every row keeps its id: from
    the old arm, or the control's for a field the old arm had pruned (every arm admits the same
    ids from the same batches, so their mappings agree)."""
    olds, ctls = vocabs_of(old), vocabs_of(control)
    for f, v in vocabs_of(new).items():
        v.load_state_dict((olds[f] if f in olds else ctls[f]).state_dict())


def _carry_tables(new: Arm, old: Arm, control: Arm, spec: ArmSpec) -> None:
    """Tables and fused optimizer state, gathered whole over the ranks and written into the new
    plan's shards: whether a kept column lived on this rank before does not matter."""
    sd_new, sd_old, sd_ctl = new.model.state_dict(), old.model.state_dict(), control.model.state_dict()
    st = [_OptState(a) for a in (new, old, control)]
    st_new, st_old, st_ctl = st
    for key, target in sd_new.items():
        if not isinstance(target, ShardedTensor):
            continue
        table = key.rsplit(".", 2)[-2]  # emb_<field>, emb_<field>__tier<t> or wide_<field>
        kind, field = table.split("_", 1)
        if kind == "emb" and (split_feature(field)[1] is not None or field in old.spec.tiers):
            _carry_by_id(key, target, (new, old, control), (sd_old, sd_ctl), st)
            continue
        in_old = key in sd_old
        if kind == "wide":  # first order: one scalar per row, not per column
            src, src_state = (sd_old, st_old) if in_old else (sd_ctl, st_ctl)
            _assign(target, _full(src[key]))
            for name in st_new.names(key):
                st_new.assign(key, name, src_state.full(key, name))
            continue
        fcols = [(field, j) for j in spec.column_ids[field][: spec.dims[field]]]
        ocols = [(field, j) for j in old.spec.column_ids.get(field, [])[: old.spec.dims.get(field, 0)]]
        ccols = [(field, j) for j in range(control.spec.dims[field])]
        old_w = _full(sd_old[key]) if in_old else None
        _assign(target, _gather(fcols, ocols, ccols, old_w, _full(sd_ctl[key]), (1,)))
        for name in st_new.names(key):
            o = st_old.full(key, name) if in_old else None
            c = st_ctl.full(key, name)
            if c.dim() == 2:  # per-element state (Adagrad): gathered like the weights
                st_new.assign(key, name, _gather(fcols, ocols, ccols, o, c, (1,)))
            else:  # row-wise state: the row's, from whichever arm holds the field
                st_new.assign(key, name, o if o is not None else c)


def _layout(arm: Arm, field: str) -> list[tuple[str, torch.Tensor | None, list[int]]]:
    """(table, ids in its row order or None for all rows, control columns) of every deep table
    of the field in `arm`: one for a plain field, one per tier with a table for a tiered one."""
    spec = arm.spec
    if spec.dims.get(field, 0) <= 0:
        return []
    if field not in spec.tiers:
        return [(f"emb_{field}", None, list(spec.column_ids[field][: spec.dims[field]]))]
    emb = ctr_model(arm).embedding
    return [
        (f"emb_{tier_feature(field, t)}", emb.tier_maps.ids_of(field, t), list(spec.tiers[field][t]))
        for t in emb.tier_shapes[field].active()
    ]


def _by_id(ids: torch.Tensor, cols: list[int], ctl: torch.Tensor, sources: list) -> torch.Tensor:
    """Rows `ids` (columns `cols`, for a 2-D tensor) of a new table: from the source table each
    id lives in where that table has the column, else from the control's (every id and column).
    sources: (ids of the table's rows or None, its control columns, its whole tensor)."""
    n = ctl.size(0)
    out = ctl.index_select(0, ids)
    if ctl.dim() == 2:
        out = out.index_select(1, torch.tensor(cols, dtype=torch.long))
    for src_ids, src_cols, src in sources:
        inv = torch.full((n,), -1, dtype=torch.long)
        inv[src_ids if src_ids is not None else torch.arange(n)] = torch.arange(src.size(0))
        loc = inv.index_select(0, ids)
        hit = torch.nonzero(loc >= 0).flatten()
        if not hit.numel():
            continue
        if ctl.dim() == 1:
            out[hit] = src.index_select(0, loc[hit])
            continue
        pos = {c: i for i, c in enumerate(src_cols)}
        common = [(i, pos[c]) for i, c in enumerate(cols) if c in pos]
        if common:
            pn, po = (torch.tensor(x, dtype=torch.long) for x in zip(*common))
            out[hit.unsqueeze(1), pn.unsqueeze(0)] = src.index_select(0, loc[hit]).index_select(1, po)
    return out


def _carry_by_id(key: str, target, arms: tuple, sds: tuple, states: tuple) -> None:
    """One deep table of a field tiered in the new or the old arm, carried id by id (module
    docstring), with its fused optimizer state (named `<table>.<state>` per table)."""
    (new, old, control), (sd_old, sd_ctl), (st_new, st_old, st_ctl) = arms, sds, states
    prefix, table = key.rsplit(".", 2)[:2]
    field, tier = split_feature(table.split("_", 1)[1])
    if field in control.spec.tiers:
        raise ValueError(f"the control's field {field!r} is tiered: columns are carried from a field-level control")
    ids, cols = next((i, c) for t, i, c in _layout(new, field) if t == table)
    ids = ids if ids is not None else torch.arange(new.rows[field])
    ctl_key = f"{prefix}.emb_{field}.weight"
    olds = [(t, i, c, f"{prefix}.{t}.weight") for t, i, c in _layout(old, field)]
    _assign(target, _by_id(ids, cols, _full(sd_ctl[ctl_key]), [(i, c, _full(sd_old[k])) for _, i, c, k in olds]))
    for name in st_new.names(key):
        suffix = name.split(".", 1)[1]
        c = st_ctl.full(ctl_key, f"emb_{field}.{suffix}")
        src = [(i, cs, st_old.full(k, f"{t}.{suffix}")) for t, i, cs, k in olds if f"{t}.{suffix}" in st_old.names(k)]
        if c.dim() == 0:  # a per-table scalar (a step count): the old table's, else the control's
            st_new.assign(key, name, src[0][2] if src else c)
            continue
        st_new.assign(key, name, _by_id(ids, cols, c, src))


class _OptState:
    """An arm's fused optimizer state as every rank sees it: a rank holds the state of its own
    tables only, so the names and shapes come from all ranks (`state_layout`)."""

    def __init__(self, arm: Arm):
        self.state = arm.model.fused_optimizer.state_dict()["state"]
        self.layout = state_layout(self.state)

    def names(self, key: str) -> list[str]:
        return list(self.layout.get(key, {}))

    def full(self, key: str, name: str) -> torch.Tensor:
        return gather_full(self.state.get(key, {}).get(name), self.layout[key][name])

    def assign(self, key: str, name: str, value: torch.Tensor) -> None:
        live = self.state.get(key, {}).get(name)
        if live is not None:
            _assign(live, value)


def _adam_state(arm: Arm, p: torch.Tensor | None) -> dict | None:
    return arm.dense_optimizer.state.get(p) if p is not None else None


def _carry_tied(p_new, gather, old_w, ctl_w, p_old, p_ctl, new: Arm, old: Arm, control: Arm) -> None:
    """Copy a column-tied parameter gathered column by column (`gather(old_w, ctl_w)`), and its
    Adam moments the same way: kept columns keep theirs, granted ones take the control's (zeros
    where the control has none, e.g. its identity projection). Resetting the moments instead
    made Adam's first steps ~lr * sign(g) on every kept column of the layer."""
    p_new.copy_(gather(old_w, ctl_w))
    so = _adam_state(old, p_old)
    if not so or "exp_avg" not in so:
        return  # the old arm has not trained this parameter yet: Adam starts afresh
    sc = _adam_state(control, p_ctl) or {}
    state = {"step": so["step"].clone() if torch.is_tensor(so["step"]) else so["step"]}
    for name in ("exp_avg", "exp_avg_sq"):
        state[name] = gather(so[name], sc.get(name, torch.zeros_like(ctl_w))).clone()
    new.dense_optimizer.state[p_new] = state


def _carry_head(new: Arm, old: Arm, control: Arm) -> None:
    """The head: every parameter it declares column-tied (models/heads.py) gathered column by
    column, every other one (hidden layers, biases) continued from the old arm, Adam state too."""
    m_new, m_old, m_ctl = ctr_model(new), ctr_model(old), ctr_model(control)
    old_tied = {t.key: t for t in m_old.column_tied()}
    ctl_tied = {t.key: t for t in m_ctl.column_tied()}
    tied = set()
    for t in m_new.column_tied():
        if t.param is None:
            continue  # implicit (an identity projection): nothing to carry into
        tied.add(t.param)
        fields = [t.field] if t.field is not None else None
        cols = [_columns(a.spec, fields or ctr_model(a).feature_names) for a in (new, old, control)]
        o, c = old_tied.get(t.key), ctl_tied[t.key]
        _carry_tied(
            t.param,
            lambda ow, cw, cols=cols, axes=t.axes: _gather(*cols, ow, cw, axes),
            o.value if o else None,
            c.value,
            o.param if o else None,
            c.param,
            new,
            old,
            control,
        )
    _carry_untied(m_new, m_old, tied, new, old)


def _carry_untied(m_new, m_old, tied: set, new: Arm, old: Arm) -> None:
    """Values and Adam state of the head parameters no column indexes, from the old arm."""
    old_params = dict(m_old.head.named_parameters())
    for name, p in m_new.head.named_parameters():
        if p in tied:
            continue
        q = old_params.get(name)
        if q is None or q.shape != p.shape:
            raise ValueError(f"head parameter {name} changes with the widths but is not declared column-tied")
        p.copy_(q)
        if q in old.dense_optimizer.state:
            new.dense_optimizer.state[p] = {
                k: (v.clone() if torch.is_tensor(v) else v) for k, v in old.dense_optimizer.state[q].items()
            }
