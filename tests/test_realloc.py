"""Re-allocation: the winning ticket is exact, kept columns keep values and optimizer state."""

import pytest
import torch

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.models.heads import HEADS
from dimstream.models.realloc import reallocate
from dimstream.stream.decode import Decoder
from tests.helpers import tiny_batch, tiny_schema

DIMS = {"user": 8, "item": 8, "tags": 8, "price": 8}


def _arms(model):
    schema = tiny_schema()
    # fp32: these tests check identities of the computation (slim = masked control), which bf16
    # holds only to its rounding: the slim arm's projections round apart (README, precision)
    cfg = ModelConfig(model, mlp=(16,), interaction_dim=8, batch_size=32, precision="fp32")
    build = lambda spec: Arm(spec, schema.num_embeddings, {"tags"}, cfg)  # noqa: E731
    control = build(ArmSpec("control", dict(DIMS)))
    batch = Decoder(schema).decode(tiny_batch(256, 3)).batch
    for s in range(0, 256, 32):
        control.train_step(batch.slice(s, s + 32))
    return control, build, batch


@pytest.mark.parametrize("model", ["deepfm", "fm", "wdl", "dcnv2"])
def test_slim_cut_from_the_control_is_the_masked_control(model):
    control, build, batch = _arms(model)
    kept = {"user": [1, 2, 5, 7], "item": [0, 1, 2, 3, 4, 5, 6, 7], "tags": [], "price": [3, 4, 6, 0]}
    spec = ArmSpec("slim", {f: len(c) for f, c in kept.items()}, {f: sorted(c) for f, c in kept.items()})
    slim = reallocate(control, control, spec, build)
    mask = {f: torch.zeros(d) for f, d in DIMS.items()}
    for f, cols in kept.items():
        mask[f][cols] = 1.0
    kjt = batch.slice(0, 64)
    with torch.no_grad():
        want = control.model(kjt.to_kjt(control.feature_names), mask)
        if model != "dcnv2":  # a pruned field also loses its first-order weight
            wide = control.model.module.embedding.wide(kjt.to_kjt(control.feature_names)).to_dict()
            want = want - wide["tags"].sum(1)
        got = slim.model(kjt.to_kjt(slim.feature_names))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert slim.feature_names == ["user", "item", "price"]


def test_kept_columns_keep_values_and_state_granted_columns_come_from_control():
    control, build, batch = _arms("deepfm")
    spec1 = ArmSpec(
        "slim",
        {"user": 4, "item": 4, "tags": 4, "price": 4},
        {"user": [0, 1, 2, 3], "item": [4, 5, 6, 7], "tags": [0, 1, 2, 3], "price": [0, 1, 2, 3]},
    )
    slim = reallocate(control, control, spec1, build)
    for s in range(0, 256, 32):  # the slim arm trains on its own
        slim.train_step(batch.slice(s, s + 32))
    spec2 = ArmSpec(
        "slim",
        {"user": 8, "item": 4, "tags": 4, "price": 4},
        {"user": [0, 1, 2, 3, 4, 5, 6, 7], "item": [4, 5, 6, 7], "tags": [0, 1, 2, 3], "price": [0, 1, 2, 3]},
    )
    slim2 = reallocate(slim, control, spec2, build)

    def table(arm, f):
        return arm.model.state_dict()[f"embedding.deep.embedding_bags.emb_{f}.weight"].local_shards()[0].tensor

    def state(arm, f):
        st = arm.model.fused_optimizer.state_dict()["state"][f"embedding.deep.embedding_bags.emb_{f}.weight"]
        return next(iter(st.values())).local_shards()[0].tensor

    torch.testing.assert_close(table(slim2, "user")[:, :4], table(slim, "user"))
    torch.testing.assert_close(table(slim2, "user")[:, 4:], table(control, "user")[:, 4:])
    torch.testing.assert_close(state(slim2, "user")[:, :4], state(slim, "user"))
    torch.testing.assert_close(state(slim2, "user")[:, 4:], state(control, "user")[:, 4:])
    torch.testing.assert_close(table(slim2, "item"), table(slim, "item"))
    assert not torch.equal(table(slim, "user"), table(control, "user")[:, :4])  # slim really trained


@pytest.mark.parametrize("model", ["deepfm", "dcnv2"])
def test_head_adam_moments_follow_their_columns(model):
    """Kept columns keep the first layer's (DeepFM) or cross layers' (DCN-V2) Adam moments and
    their projection's; granted columns take the control's; nothing restarts at zero."""
    control, build, batch = _arms(model)
    spec1 = ArmSpec(
        "slim",
        {"user": 4, "item": 8, "tags": 4, "price": 4},
        {"user": [0, 1, 2, 3], "item": list(range(8)), "tags": [0, 1, 2, 3], "price": [4, 5, 6, 7]},
    )
    slim = reallocate(control, control, spec1, build)
    for s in range(0, 256, 32):
        slim.train_step(batch.slice(s, s + 32))
    spec2 = ArmSpec(
        "slim",
        {"user": 8, "item": 8, "tags": 4, "price": 4},
        {"user": list(range(8)), "item": list(range(8)), "tags": [0, 1, 2, 3], "price": [4, 5, 6, 7]},
    )
    slim2 = reallocate(slim, control, spec2, build)
    head1, head2, headc = (a.model.module.head for a in (slim, slim2, control))
    st = lambda arm, p: arm.dense_optimizer.state[p]["exp_avg_sq"]  # noqa: E731
    # columns in model order: user 0..3 / 0..7 first, so user's old columns 0-3 sit at 0-3 in both
    if model == "deepfm":
        w1, w2, wc = head1.dnn[0].weight, head2.dnn[0].weight, headc.dnn[0].weight
        torch.testing.assert_close(st(slim2, w2)[:, :4], st(slim, w1)[:, :4])  # kept: user 0-3
        torch.testing.assert_close(st(slim2, w2)[:, 4:8], st(control, wc)[:, 4:8])  # granted: user 4-7
        torch.testing.assert_close(st(slim2, w2)[:, 8:], st(slim, w1)[:, 4:])  # item, tags, price
        i1, i2 = head1.proj.index[0], head2.proj.index[0]
        if i2 >= 0 and i1 >= 0:
            torch.testing.assert_close(st(slim2, head2.proj.weights[i2])[:, :4], st(slim, head1.proj.weights[i1]))
    else:
        w1, w2 = head1.cross[0].linear.weight, head2.cross[0].linear.weight
        torch.testing.assert_close(st(slim2, w2)[8:, 8:], st(slim, w1)[4:, 4:])
    assert all(float(v["exp_avg_sq"].abs().sum()) > 0 for v in slim2.dense_optimizer.state.values())


@pytest.mark.parametrize("model", sorted(HEADS))
def test_every_width_dependent_head_parameter_is_declared_column_tied(model):
    """Two heads of one type over different widths: a parameter not declared column-tied has the
    same name and shape in both; a declared one spans, along its declared axes, exactly the
    columns it names (one field's, or the concatenation's) and elsewhere matches its twin."""
    fields = ["a", "b", "c", "d"]
    heads = [HEADS[model](widths, 8, (16, 4)) for widths in ([4, 12, 8, 16], [8, 4, 20, 12])]
    params = [dict(h.named_parameters()) for h in heads]
    tied = [{t.key: t for t in h.column_tied(fields)} for h in heads]
    assert tied[0].keys() == tied[1].keys() and tied[0]
    for _h, ps, ts, widths in zip(heads, params, tied, ([4, 12, 8, 16], [8, 4, 20, 12])):
        declared = {id(t.param) for t in ts.values() if t.param is not None}
        assert declared <= {id(p) for p in ps.values()}
        for t in ts.values():
            cols = widths[fields.index(t.field)] if t.field is not None else sum(widths)
            assert all(t.value.shape[ax] == cols for ax in t.axes), t.key
            if t.param is None:  # an implicit projection: the identity it stands for
                torch.testing.assert_close(t.value, torch.eye(8, cols))
            else:
                assert torch.equal(t.value, t.param.detach())
        untied = {n: p.shape for n, p in ps.items() if id(p) not in declared}
        assert untied == {
            n: p.shape for n, p in params[0].items() if id(p) not in {id(t.param) for t in tied[0].values()}
        }
    for key, t0 in tied[0].items():
        t1 = tied[1][key]
        assert t0.axes == t1.axes and t0.field == t1.field
        assert [n for ax, n in enumerate(t0.value.shape) if ax not in t0.axes] == [
            n for ax, n in enumerate(t1.value.shape) if ax not in t1.axes
        ]
    # the widths really change some shapes: the declarations are not vacuous
    assert any(t.value.shape != tied[1][k].value.shape for k, t in tied[0].items())


def test_a_width_dependent_parameter_left_undeclared_is_refused():
    """realloc.py trusts the declarations: a head that forgets one fails loudly, not silently."""
    control, build, _ = _arms("deepfm")
    spec = ArmSpec("slim", {"user": 4, "item": 8, "tags": 8, "price": 8})

    def forgetful(spec):
        arm = build(spec)
        head = arm.model.module.head
        head.column_tied = lambda fields: head.proj.column_tied(fields)  # the DNN input left out
        return arm

    with pytest.raises(ValueError, match="dnn.0.weight changes with the widths"):
        reallocate(control, control, spec, forgetful)
