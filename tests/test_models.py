"""Models on real TorchRec under DistributedModelParallel: gradients, masks, every head learns."""

import numpy as np
import pytest
import torch
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.models.ctr import CTRModel
from dimstream.models.distributed import shard
from dimstream.models.embedding import AllocationError
from dimstream.stream.decode import Decoder
from dimstream.stream.synthetic import SyntheticSource
from tests.helpers import tiny_batch, tiny_schema


def _decoded(n=64, seed=0):
    return Decoder(tiny_schema()).decode(tiny_batch(n, seed)).batch


@pytest.mark.parametrize("model", ["deepfm", "fm", "wdl", "dcnv2"])
def test_fused_sharded_update_equals_reference_gradient(model):
    """One exact-SGD step through DMP's fused kernels moves every table, including the width-4
    first-order tables and tables of different widths, by -lr x the gradient that plain
    autograd computes on an unsharded copy of the same model."""
    schema, lr = tiny_schema(), 0.5
    dims = {"user": 8, "item": 4, "tags": 12, "price": 4}
    cfg = ModelConfig(model, mlp=(16,), sparse_optimizer="sgd", sparse_lr=lr, interaction_dim=8)
    torch.manual_seed(0)
    ref = CTRModel(dims, schema.num_embeddings, {"tags"}, cfg, device=torch.device("cpu"))
    torch.manual_seed(0)
    live = CTRModel(dims, schema.num_embeddings, {"tags"}, cfg)
    apply_optimizer_in_backward(torch.optim.SGD, live.embedding.parameters(), {"lr": lr})
    dmp = shard(live)
    # same starting point: copy the reference's weights into the sharded model
    state = dmp.state_dict()
    for k, v in ref.state_dict().items():
        target = state[k]
        if hasattr(target, "local_shards"):
            target.local_shards()[0].tensor.copy_(v)
        else:
            target.copy_(v)
    before = {k: v.clone() for k, v in ref.state_dict().items() if ".embedding." in f".{k}"}
    batch = _decoded()
    kjt, y = batch.to_kjt(list(dims)), batch.labels_tensor()
    torch.nn.functional.binary_cross_entropy_with_logits(ref(kjt), y).backward()
    torch.nn.functional.binary_cross_entropy_with_logits(dmp(kjt), y).backward()
    after = dmp.state_dict()
    grads = dict(ref.named_parameters())
    assert len(before) == (8 if model != "dcnv2" else 4)
    for k, w0 in before.items():
        moved = after[k].local_shards()[0].tensor - w0
        expected = -lr * grads[k].grad
        assert expected.abs().sum() > 0, k
        torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-6, msg=k)


def test_mask_of_ones_changes_nothing_and_zero_mask_removes_columns():
    schema = tiny_schema()
    dims = {"user": 8, "item": 8, "tags": 8, "price": 8}
    m = CTRModel(dims, schema.num_embeddings, {"tags"}, ModelConfig("deepfm", mlp=(16,)), device=torch.device("cpu"))
    kjt = _decoded().to_kjt(list(dims))
    ones = {f: torch.ones(d) for f, d in dims.items()}
    torch.testing.assert_close(m(kjt, ones), m(kjt))
    half = {f: torch.tensor([1.0] * 4 + [0.0] * 4) for f in dims}
    assert not torch.allclose(m(kjt, half), m(kjt))


def test_widths_must_be_multiples_of_four_and_zero_removes_a_field():
    schema = tiny_schema()
    with pytest.raises(AllocationError, match="multiples of 4"):
        CTRModel({"user": 3, "item": 4, "tags": 4, "price": 4}, schema.num_embeddings, set(), ModelConfig())
    m = CTRModel(
        {"user": 8, "item": 0, "tags": 4, "price": 4},
        schema.num_embeddings,
        {"tags"},
        ModelConfig("fm"),
        device=torch.device("cpu"),
    )
    assert m.feature_names == ["user", "tags", "price"]
    assert m.embedding_params == 50 * 8 + 20 * 4 + 16 * 4
    out = m(_decoded().to_kjt(m.feature_names))
    assert out.shape == (64,) and torch.isfinite(out).all()


@pytest.mark.parametrize("model", ["deepfm", "wdl", "fm", "dcnv2"])
def test_every_head_learns_on_the_synthetic_stream(model):
    """Progressive log-loss falls over windows (first window vs the mean of the last two)."""
    src = SyntheticSource(seed=3, rows_per_window=8000)
    dec = Decoder(src.schema)
    multi = {f.name for f in src.schema.fields if f.kind == "multi"}
    arm = Arm(
        ArmSpec("control", {f: 8 for f in src.schema.feature_names}),
        src.schema.num_embeddings,
        multi,
        ModelConfig(model, mlp=(64, 32), batch_size=256),
    )
    losses = []
    for w in range(5):
        batch = dec.decode(src.window_table(w)).batch
        p = np.clip(arm.predict(batch), 1e-7, 1 - 1e-7)
        y = batch.labels
        losses.append(float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()))
        for s in range(0, len(batch), 256):
            arm.train_step(batch.slice(s, min(s + 256, len(batch))))
    assert np.mean(losses[-2:]) < losses[0] - 0.05, losses
    base = float(-(y.mean() * np.log(y.mean()) + (1 - y.mean()) * np.log(1 - y.mean())))
    assert np.mean(losses[-2:]) < base, (losses, base)  # better than predicting the mean CTR


def _tbes(arm) -> list:
    """The FBGEMM table-batched kernels under an arm's sharded collections."""
    from dimstream.models.ctr import ctr_model

    emb = ctr_model(arm).embedding
    return [m._emb_module for c in (emb.deep, emb.wide) for lookup in c._lookups for m in lookup._emb_modules]


def test_lookups_skip_fbgemm_s_bounds_check_and_the_arm_refuses_ids_outside_a_table():
    """FBGEMM's per-index bounds check is off (models/distributed.py BOUNDS_CHECK): the arm's
    own check is then what keeps an id outside its table from reaching the kernel."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

    schema = tiny_schema()
    arm = Arm(ArmSpec("control", {f: 8 for f in schema.feature_names}), schema.num_embeddings, {"tags"}, ModelConfig())
    tbes = _tbes(arm)
    assert len(tbes) >= 2 and {t.bounds_check_mode_int for t in tbes} == {BoundsCheckMode.NONE.value}
    batch = _decoded(8)
    assert np.isfinite(arm.train_step(batch)).all()
    batch.values["user"] = batch.values["user"].copy()
    batch.values["user"][3] = schema.num_embeddings["user"]  # one past the table's last row
    with pytest.raises(ValueError, match="field 'user': ids outside its 50 rows"):
        arm.train_step(batch)


def test_rowwise_adagrad_keeps_one_state_value_per_row():
    schema = tiny_schema()
    cfg = ModelConfig(sparse_optimizer="rowwise_adagrad", sparse_lr=0.1)
    arm = Arm(ArmSpec("control", {f: 8 for f in schema.feature_names}), schema.num_embeddings, {"tags"}, cfg)
    before = {k: v.local_shards()[0].tensor.clone() for k, v in arm.model.state_dict().items() if "emb_user" in k}
    arm.train_step(_decoded())
    (key,) = before
    moved = arm.model.state_dict()[key].local_shards()[0].tensor - before[key]
    assert moved.abs().sum() > 0
    state = arm.model.fused_optimizer.state_dict()["state"]  # one Adagrad sum per row, not per element
    assert state["embedding.deep.embedding_bags.emb_user.weight"]["emb_user.momentum1"].shape == (50,)


def test_the_fm_term_and_its_written_out_gradient_match_autograd_of_the_formula():
    from dimstream.models.heads import fm_interaction

    v = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fm_interaction, (v,))
    s = v.sum(dim=1)
    naive = 0.5 * (s * s - (v * v).sum(dim=1)).sum(dim=1)
    assert torch.allclose(fm_interaction(v), naive)
    g = torch.randn(5, dtype=torch.float64)
    (want,) = torch.autograd.grad((naive * g).sum(), v)
    (got,) = torch.autograd.grad((fm_interaction(v) * g).sum(), v)
    assert torch.allclose(got, want)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepfm_fused_inputs_give_the_gradients_of_the_plain_graph(precision):
    """DeepFM's hot path (one autograd node for the DNN input and the FM term) against the
    plain graph: the concatenation to the DNN, fm_interaction over its [B, F, k] view."""
    from dimstream.models.heads import DeepFMHead, as_concat, fm_interaction

    torch.manual_seed(0)
    head = DeepFMHead([4, 4, 4], 4, (8,))
    e = torch.randn(6, 12, requires_grad=True)
    wide = torch.randn(6)
    grads = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if fused:
                out = head(e, wide)
            else:
                deep = head.dnn(as_concat(e)).squeeze(-1)
                out = head.bias + wide + fm_interaction(e.view(6, 3, 4)) + deep
        g = torch.linspace(-1, 1, 6)
        grads.append((out.float(), *torch.autograd.grad((out.float() * g).sum(), [e, head.dnn[0].weight])))
    for fused, plain in zip(*grads):
        assert torch.allclose(fused, plain, atol=1e-6), (fused - plain).abs().max()
