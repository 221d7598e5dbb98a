"""Re-allocation: carry a trained slim arm into a new shape without starting over.

Every embedding column of every arm is named by the control column it descends from
(`ArmSpec.column_ids`). The new slim arm is built for the new allocation; then every tensor
tied to columns is gathered column by column:
  - a column the slim arm already had keeps its trained values and optimizer state;
  - a newly granted column starts from the control arm's column (the "winning ticket") with
    the control's optimizer state.
Tensors tied to columns: the embedding tables and their fused optimizer state, the per-field
projections (SSEDS eq. 13; the control's projection is the identity, so a granted column starts
as the unit vector of its control coordinate), the first DNN layer's input columns and DCN-V2's
cross layers (both axes), each with its Adam moments gathered the same way. Everything else
(hidden layers, biases) continues from the old slim arm, Adam state included. With the interaction width fixed to the control's, a slim arm cut
from the control this way computes exactly the masked control model.
"""
from __future__ import annotations

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from dimstream.models.arm import Arm, ArmSpec

Column = tuple[str, int]


def _columns(spec: ArmSpec, fields: list[str]) -> list[Column]:
    return [(f, j) for f in fields for j in spec.column_ids[f][: spec.dims[f]]]


def _local(t):
    return t.local_shards()[0].tensor if isinstance(t, ShardedTensor) else t


def _gather(new_cols: list[Column], old_cols: list[Column], ctrl_cols: list[Column],
            old: torch.Tensor | None, ctrl: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
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


def _projection(head, position: int, k: int, d: int) -> torch.Tensor:
    """Field `position`'s projection M_i (k x d_i); the identity where the model has none."""
    i = head.proj.index[position]
    return torch.eye(k, d) if i < 0 else head.proj.weights[i].detach()


def reallocate(old: Arm, control: Arm, spec: ArmSpec, build) -> Arm:
    """A new arm of shape `spec`, carried over from `old` (same name) and `control`.

    build(spec) -> Arm constructs a fresh arm (the daemon's own builder)."""
    from dimstream.search.masks import ctr_model  # the CTRModel inside a DMP

    new = build(spec)
    m_new, m_old, m_ctl = ctr_model(new), ctr_model(old), ctr_model(control)
    cols_new = _columns(spec, m_new.feature_names)
    cols_old = _columns(old.spec, m_old.feature_names)
    cols_ctl = _columns(control.spec, m_ctl.feature_names)
    with torch.no_grad():
        _carry_tables(new, old, control, spec)
        _carry_head(m_new, m_old, m_ctl, cols_new, cols_old, cols_ctl, new, old, control)
    return new


def _carry_tables(new: Arm, old: Arm, control: Arm, spec: ArmSpec) -> None:
    sd_new, sd_old, sd_ctl = new.model.state_dict(), old.model.state_dict(), control.model.state_dict()
    st_new = new.model.fused_optimizer.state_dict()["state"]
    st_old = old.model.fused_optimizer.state_dict()["state"]
    st_ctl = control.model.fused_optimizer.state_dict()["state"]
    for key, target in sd_new.items():
        if not isinstance(target, ShardedTensor):
            continue
        table = key.rsplit(".", 2)[-2]           # emb_<field> or wide_<field>
        kind, field = table.split("_", 1)
        in_old = key in sd_old
        if kind == "wide":                      # first order: one scalar per row, not per column
            src, src_state = (sd_old, st_old) if in_old else (sd_ctl, st_ctl)
            _local(target).copy_(_local(src[key]))
            for name, val in st_new[key].items():
                _local(val).copy_(_local(src_state[key][name]))
            continue
        fcols = [(field, j) for j in spec.column_ids[field][: spec.dims[field]]]
        ocols = [(field, j) for j in old.spec.column_ids.get(field, [])[: old.spec.dims.get(field, 0)]]
        ccols = [(field, j) for j in range(control.spec.dims[field])]
        old_w = _local(sd_old[key]) if in_old else None
        _local(target).copy_(_gather(fcols, ocols, ccols, old_w, _local(sd_ctl[key]), (1,)))
        for name, val in st_new[key].items():
            v = _local(val)
            o = _local(st_old[key][name]) if in_old else None
            c = _local(st_ctl[key][name])
            if v.dim() == 2:   # per-element state (Adagrad): gathered like the weights
                v.copy_(_gather(fcols, ocols, ccols, o, c, (1,)))
            else:              # row-wise state: the row's, from whichever arm holds the field
                v.copy_(o if o is not None else c)


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


def _carry_head(m_new, m_old, m_ctl, cols_new, cols_old, cols_ctl, new: Arm, old: Arm, control: Arm) -> None:
    h_new, h_old, h_ctl = m_new.head, m_old.head, m_ctl.head
    if hasattr(h_new, "proj"):
        k = h_new.proj.k
        for pos, f in enumerate(m_new.feature_names):
            i = h_new.proj.index[pos]
            if i < 0:
                continue
            fc = [c for c in cols_new if c[0] == f]
            oc = [c for c in cols_old if c[0] == f]
            cc = [c for c in cols_ctl if c[0] == f]
            po = m_old.feature_names.index(f) if oc else None
            j_old = h_old.proj.index[po] if po is not None else -1
            p_old = h_old.proj.weights[j_old] if j_old >= 0 else None
            j_ctl = h_ctl.proj.index[m_ctl.feature_names.index(f)]
            p_ctl = h_ctl.proj.weights[j_ctl] if j_ctl >= 0 else None
            old_m = _projection(h_old, po, k, len(oc)) if oc else None
            ctl_m = _projection(h_ctl, m_ctl.feature_names.index(f), k, len(cc))
            _carry_tied(h_new.proj.weights[i], lambda o, c, fc=fc, oc=oc, cc=cc: _gather(fc, oc, cc, o, c, (1,)),
                        old_m, ctl_m, p_old, p_ctl, new, old, control)
    if hasattr(h_new, "cross"):
        for l_new, l_old, l_ctl in zip(h_new.cross, h_old.cross, h_ctl.cross):
            for a, b, c, axes in ((l_new.linear.weight, l_old.linear.weight, l_ctl.linear.weight, (0, 1)),
                                  (l_new.linear.bias, l_old.linear.bias, l_ctl.linear.bias, (0,))):
                _carry_tied(a, lambda o, c_, axes=axes: _gather(cols_new, cols_old, cols_ctl, o, c_, axes),
                            b, c, b, c, new, old, control)
    if hasattr(h_new, "dnn"):
        first_new, first_old, first_ctl = h_new.dnn[0], h_old.dnn[0], h_ctl.dnn[0]
        _carry_tied(first_new.weight, lambda o, c: _gather(cols_new, cols_old, cols_ctl, o, c, (1,)),
                    first_old.weight, first_ctl.weight, first_old.weight, first_ctl.weight, new, old, control)
        for a, b in zip(list(h_new.dnn)[1:], list(h_old.dnn)[1:]):
            for pa_, pb in zip(a.parameters(), b.parameters()):
                pa_.copy_(pb)
        first_new.bias.copy_(first_old.bias)
    if hasattr(h_new, "bias"):
        h_new.bias.copy_(h_old.bias)
    # Adam state of the parameters whose shape did not change (hidden layers, biases): carried
    old_params = dict(m_old.head.named_parameters())
    for name, p in m_new.head.named_parameters():
        if name.startswith(("proj.", "cross.")) or name == "dnn.0.weight":
            continue
        q = old_params.get(name)
        if q is not None and q.shape == p.shape and q in old.dense_optimizer.state:
            new.dense_optimizer.state[p] = {k: (v.clone() if torch.is_tensor(v) else v)
                                            for k, v in old.dense_optimizer.state[q].items()}

