"""bf16 autocast of the dense part (ModelConfig.precision) leaves model quality where fp32 has it.

Every head trains test-then-train on the same rows twice, in fp32 and in bf16 (fp32 master
weights and optimizer state, models/ctr.py); the progressive AUC over all rows must agree
within 0.001, on the synthetic stream (3 seeds) and on MovieLens-100k.
"""

import numpy as np
import pytest
import torch

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig, cpu_has_bf16, resolve_precision
from dimstream.models.ctr import ctr_model
from dimstream.models.evaluation import window_metrics
from dimstream.stream.decode import Decoder
from dimstream.stream.synthetic import SyntheticSource
from tests.helpers import ML100K

# 100k synthetic rows: with near-zero tables (ModelConfig.init_range) the first 20k rows are the
# noisy start of learning, where two runs part by up to 0.0025 whatever the precision
SYNTHETIC_ROWS, ML100K_ROWS, BATCH, DIM = 100_000, 40_000, 512, 16


def _synthetic(seed: int):
    src = SyntheticSource(seed=seed, rows_per_window=SYNTHETIC_ROWS)
    return src.schema, Decoder(src.schema).decode(src.window_table(0)).batch


def _movielens():
    from dimstream.stream.sources.movielens import load_movielens, movielens_schema

    schema = movielens_schema()
    return schema, Decoder(schema).decode(load_movielens(ML100K).slice(0, ML100K_ROWS)).batch


def progressive_auc(schema, batch, model: str, precision: str, seed: int = 0) -> float:
    """AUC of every row's prediction made before the arm trained on it (one pass)."""
    arm = _arm(schema, ModelConfig(model, precision=precision, seed=seed, batch_size=BATCH))
    steps = range(0, len(batch), BATCH)
    probs = np.concatenate([arm.train_step(batch.slice(lo, min(lo + BATCH, len(batch)))) for lo in steps])
    return window_metrics(batch.labels, probs)["auc"]


def _arm(schema, cfg: ModelConfig) -> Arm:
    spec = ArmSpec("control", {f: DIM for f in schema.feature_names})
    return Arm(spec, schema.num_embeddings, schema.multi_valued, cfg)


CASES = [("synthetic", 0, m) for m in ("deepfm", "wdl", "fm", "dcnv2")]
CASES += [("synthetic", 1, "deepfm"), ("synthetic", 2, "deepfm")]
CASES += [("ml-100k", 0, m) for m in ("deepfm", "wdl", "fm", "dcnv2")]


@pytest.mark.parametrize("data, seed, model", CASES)
def test_bf16_progressive_auc_is_within_0001_of_fp32(data, seed, model):
    if data == "ml-100k" and not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens-100k not at {ML100K}")
    schema, batch = _synthetic(seed) if data == "synthetic" else _movielens()
    fp32 = progressive_auc(schema, batch, model, "fp32", seed)
    bf16 = progressive_auc(schema, batch, model, "bf16", seed)
    print(f"{data} seed {seed} {model}: fp32 {fp32:.5f} bf16 {bf16:.5f} diff {bf16 - fp32:+.5f}")
    assert 0.54 < fp32 < 1  # it learned (DCN-V2, with no wide part, learns slowest): not two coin flips
    assert abs(bf16 - fp32) <= 0.001


def test_bf16_runs_the_dense_gemms_in_bf16_and_keeps_fp32_weights():
    schema, batch = _synthetic(0)
    arm = _arm(schema, ModelConfig("deepfm", precision="bf16", batch_size=BATCH))
    seen = []
    layer = ctr_model(arm).head.dnn[0]
    hook = layer.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    before = layer.weight.detach().clone()
    arm.train_step(batch.slice(0, BATCH))
    hook.remove()
    assert seen == [torch.bfloat16]
    assert layer.weight.dtype == torch.float32 and not torch.equal(layer.weight.detach(), before)
    state = arm.dense_optimizer.state[layer.weight]
    assert state["exp_avg"].dtype == torch.float32
    logits = arm.model(arm.kjt(batch.slice(0, 8)))
    assert logits.dtype == torch.float32  # the loss and the reported scores stay fp32


def test_auto_precision_follows_the_hardware(tmp_path):
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f\n")
    assert not cpu_has_bf16(str(flags))
    flags.write_text("processor : 0\nflags : fpu avx512f avx512_bf16\n")
    assert cpu_has_bf16(str(flags))
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        ModelConfig(precision="fp16")


@pytest.mark.parametrize("model", ["deepfm", "wdl", "fm", "dcnv2"])
def test_the_concatenated_fast_path_gives_the_per_field_path_s_logits(model):
    """Heads take the collection's concatenated output as it is (no split, no re-cat) and group
    projections by width (one bmm per width): the same logits as per-field lists, per-field
    matmuls, at uniform and at mixed widths."""
    from dimstream.models.heads import HEADS

    torch.manual_seed(0)
    for dims in ([8, 8, 8], [4, 8, 12, 8, 4, 12]):
        head = HEADS[model](dims, 8, (16, 8))
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.3)
        embs = [torch.randn(32, d) for d in dims]
        fast = head(torch.cat(embs, dim=1), 0.0)
        if hasattr(head, "proj"):  # the projections as one matmul per field, stacked
            proj = head.proj
            v = torch.stack([e if i < 0 else e @ proj.weights[i].t() for e, i in zip(embs, proj.index)], dim=1)
            assert torch.allclose(proj(torch.cat(embs, dim=1)), v, atol=1e-6)
        assert torch.allclose(fast, head(embs, 0.0), atol=1e-6) and fast.shape == (32,)


def test_lookups_without_fbgemm_s_bounds_check_train_exactly_as_with_it(monkeypatch):
    """The bounds check off (models/distributed.py BOUNDS_CHECK, issue 15) only drops a pass
    over ids that are rows already: the same predictions, bit for bit, step after step."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

    from dimstream.models import distributed

    schema, batch = _synthetic(0)
    cfg = ModelConfig("deepfm", precision="bf16", batch_size=BATCH)
    off = _arm(schema, cfg)
    monkeypatch.setattr(distributed, "BOUNDS_CHECK", BoundsCheckMode.WARNING)
    on = _arm(schema, cfg)
    for lo in range(0, 8 * BATCH, BATCH):
        part = batch.slice(lo, lo + BATCH)
        np.testing.assert_array_equal(off.train_step(part), on.train_step(part))
