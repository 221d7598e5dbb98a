"""AutoSrh (search/autosrh.py): the soft selection layer, eq. 13's first-order gradient, eq. 14,
the pruning under the budget, and the slim arm re-allocated by it in the daemon and by the cron."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.search import Budget, registry, split_holdout
from dimstream.search.autosrh import (
    AutoSrh,
    alpha_gradient,
    alpha_step,
    autosrh_search,
    column_scores,
    init_alpha,
    normalise_rows,
    weight_step,
)
from dimstream.search.ham import copy_arm
from dimstream.search.masks import ctr_model, masked_logits, pooled_embeddings
from dimstream.stream.decode import Decoder
from tests.helpers import REPO, autosrh_run_config, tiny_batch, tiny_schema

DIMS = {"user": 8, "item": 8, "tags": 12, "price": 4}


def _decoded(n=64, seed=0):
    return Decoder(tiny_schema()).decode(tiny_batch(n, seed)).batch


def _arm(optimizer="adagrad"):
    cfg = ModelConfig("deepfm", mlp=(16,), interaction_dim=8, sparse_optimizer=optimizer, sparse_lr=0.1)
    return Arm(ArmSpec("control", dict(DIMS)), tiny_schema().num_embeddings, {"tags"}, cfg)


def _trained_arm(rows=256):
    arm = _arm()
    batch = _decoded(rows, seed=5)
    for s in range(0, rows, 64):
        arm.train_step(batch.slice(s, s + 64))
    return arm


def _tables(arm):
    sd = arm.model.state_dict()
    return {k: v.local_shards()[0].tensor.clone() for k, v in sd.items() if hasattr(v, "local_shards")}


def test_alpha_starts_at_one_and_the_clip_keeps_it_in_the_unit_interval():
    alpha = init_alpha({**DIMS, "gone": 0})
    assert set(alpha) == set(DIMS) and all(torch.equal(a, torch.ones(DIMS[f])) for f, a in alpha.items())
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):  # large steps both ways: without the clip alpha would leave [0, 1] at once
        alpha_step(alpha, {f: torch.randn(d, generator=rng) * 1e3 for f, d in DIMS.items()}, lr=0.7)
        assert all(float(a.min()) >= 0.0 and float(a.max()) <= 1.0 for a in alpha.values())
    assert any(float(a.min()) == 0.0 for a in alpha.values()) and any(float(a.max()) == 1.0 for a in alpha.values())
    r = autosrh_search(_trained_arm(), *split_holdout(_decoded(256, 2), 0.25), steps=60, lr=0.2, batch_size=32)
    final = [x for a in r.details["alpha"].values() for x in a]
    assert 0.0 <= min(final) and max(final) <= 1.0 and min(final) < 1.0  # it moved, and stayed inside


def test_eq14_normalises_each_row_by_its_mean_absolute_gradient():
    """g_norm(alpha_l*) = g(alpha_l*) / (sum_k |g_lk| / K + eps_g): rows of gradients 1e4 apart
    come out on one scale; the step of alpha_step is lr times that, before the clip."""
    g = {"frequent": torch.tensor([3e3, -1e3, 2e3, 2e3]), "rare": torch.tensor([3e-1, -1e-1, 2e-1, 2e-1])}
    out = normalise_rows(g, eps=1e-7)
    for f in g:
        torch.testing.assert_close(out[f], g[f] / (g[f].abs().sum() / 4 + 1e-7))
        assert float(out[f].abs().mean()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(out["frequent"], out["rare"], rtol=1e-5, atol=0)
    assert torch.equal(normalise_rows({"dead": torch.zeros(4)})["dead"], torch.zeros(4))
    tiered = normalise_rows({"f": torch.stack([g["frequent"], g["rare"]])})["f"]  # [L, K]: one row per tier
    torch.testing.assert_close(tiered, torch.stack([out["frequent"], out["rare"]]))
    alpha = {"frequent": torch.full((4,), 0.5), "rare": torch.full((4,), 0.5)}
    alpha_step(alpha, g, lr=0.1)
    torch.testing.assert_close(alpha["rare"], torch.tensor([0.5 - 0.15, 0.5 + 0.05, 0.4, 0.4]))


def test_first_order_alpha_gradient_equals_finite_difference_of_held_out_loss_after_one_step():
    """Eq. 12 then eq. 13 without its second-order term: after one weight step on training rows
    (through alpha), dL_val(Theta', alpha)/dalpha equals the central finite difference of the
    held-out loss at Theta' (float64), and differs from the gradient before the step."""
    arm = _trained_arm()
    work = copy_arm(arm, "fd")
    train, val = _decoded(64, seed=11), _decoded(96, seed=12)
    alpha = {f: torch.rand(d, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1 for f, d in DIMS.items()}
    before, _ = alpha_gradient(work, val, alpha)
    weight_step(work, train, alpha)
    g, _ = alpha_gradient(work, val, alpha)
    m = ctr_model(work)
    kjt, y = val.to_kjt(m.feature_names), val.labels_tensor().double()
    embs, wide = pooled_embeddings(m, kjt)
    head = copy.deepcopy(m.head).double()

    def loss(a):
        with torch.no_grad():
            out = [e.double() * a[f] for e, f in zip(embs, m.feature_names)]
            return float(F.binary_cross_entropy_with_logits(head(out, wide.double()), y))

    delta, checked = 1e-5, 0
    for f, d in DIMS.items():
        for j in {0, d // 2, d - 1}:
            up = {k: v.double().clone() for k, v in alpha.items()}
            down = {k: v.double().clone() for k, v in alpha.items()}
            up[f][j] += delta
            down[f][j] -= delta
            assert float(g[f][j]) == pytest.approx((loss(up) - loss(down)) / (2 * delta), rel=2e-3, abs=1e-6), (f, j)
            checked += 1
    assert checked >= 10
    assert not all(torch.allclose(before[f], g[f], rtol=1e-3, atol=1e-7) for f in DIMS)  # the step mattered


def test_the_search_prunes_within_budget_on_a_copy_and_keeps_the_top_scored_columns():
    arm = _trained_arm()
    tables = _tables(arm)
    dense = {n: p.detach().clone() for n, p in arm.model.named_parameters() if ".embedding." not in f".{n}"}
    for p in arm.model.parameters():
        p.grad = None
    batch = _decoded(320, seed=3)
    for kappa in (0.3, 0.6):
        r = registry.build("autosrh", rows=256, steps=40, batch_size=32).run(arm, batch, Budget("params", kappa))
        assert r.method == "autosrh" and r.rows_used == 256
        assert r.params <= kappa * r.control_params and r.budget_reached == r.params <= r.budget_asked
        assert all(d % 4 == 0 for d in r.dims.values()) and any(r.dims.values())
        assert r.details["weight_steps"] == 7  # 192 training rows in batches of 32: one pass
        for f, d in r.dims.items():
            s = np.array(r.saliency[f])
            assert len(r.kept_columns[f]) == d
            if d:
                assert s[r.kept_columns[f]].min() >= np.delete(s, r.kept_columns[f]).max(initial=-np.inf)
    # the control arm is untouched: tables, head, no gradient left behind
    for k, v in _tables(arm).items():
        torch.testing.assert_close(v, tables[k], rtol=0, atol=0, msg=k)
    for n, p in arm.model.named_parameters():
        if n in dense:
            torch.testing.assert_close(p.detach(), dense[n], rtol=0, atol=0, msg=n)
            assert p.grad is None, n
    # the column score is eq. 8 then eq. 15's magnitude: alpha_ij * mean_b |e_bij|
    alpha = {f: torch.linspace(0, 1, d) for f, d in DIMS.items()}
    s = column_scores(arm, batch, alpha, batch_size=100)
    embs, _ = pooled_embeddings(arm, batch.to_kjt(ctr_model(arm).feature_names))
    for f, e in zip(ctr_model(arm).feature_names, embs):
        np.testing.assert_allclose(s[f], (alpha[f] * e.abs().mean(0)).double().numpy(), rtol=1e-5)
    assert registry.knobs("autosrh") == {"rows", "val_fraction", "steps", "lr", "batch_size", "weight_passes", "tiers"}
    assert isinstance(registry.build("autosrh", rows=100), AutoSrh) and registry.lookup("autosrh").min_score is None


def test_the_daemon_reallocates_the_slim_arm_by_autosrh_from_the_control_columns(tmp_path):
    """--search autosrh: after window 0 the slim arm is re-shaped to AutoSrh's allocation within
    kappa x control, widths multiples of 4, warm-started: it computes exactly the control model
    with every column but the kept ones masked (the "winning ticket" of models/realloc.py)."""
    from dimstream.ops.daemon import Runner
    from dimstream.stream.synthetic import SyntheticSource

    # fp32: an identity of the computation, which bf16 holds only to its rounding (README, precision)
    fp32 = ModelConfig("fm", precision="fp32")
    cfg = autosrh_run_config(tmp_path, rows_per_window=3000, windows=1, search_rows=2000, model=fp32)
    runner = Runner.from_config(cfg)
    summary = runner.run()
    (w0,) = summary["windows"]
    assert w0["search"]["method"] == "autosrh" and w0["search"]["rows"] == 2000
    realloc = w0["reallocation"]
    assert realloc["source"] == "daemon" and realloc["method"] == "autosrh"
    assert all(d % 4 == 0 for d in realloc["dims"].values()) and any(realloc["dims"].values())
    control, slim = runner.arm("control"), runner.arm("slim")
    assert slim.embedding_params <= cfg.budget * control.embedding_params
    assert slim.dims == realloc["dims"] and slim.embedding_params == realloc["embedding_params"]
    src = SyntheticSource(seed=cfg.seed + 7, rows_per_window=500)
    batch = Decoder(src.schema).decode(src.window_table(0)).batch
    mask = {f: torch.zeros(d) for f, d in control.dims.items()}
    for f, cols in slim.spec.column_ids.items():
        mask[f][cols[: slim.dims[f]]] = 1.0
    with torch.no_grad():
        masked = torch.sigmoid(masked_logits(control, batch.to_kjt(control.feature_names), mask)).numpy()
    np.testing.assert_allclose(slim.predict(batch), masked, rtol=1e-4, atol=1e-6)


def test_the_cron_job_runs_autosrh_and_the_daemon_applies_its_plan(tmp_path):
    cli = [sys.executable, "-m", "dimstream.ops.cli"]
    run = ["run", "--arms", "control,slim", "--search", "none", "--search-every", "0", "--rows-per-window", "3000"]
    run += ["--metrics-addr", "127.0.0.1:0", "--no-progress", "--model", "fm", "--state-dir", str(tmp_path)]

    def call(args):
        r = subprocess.run(cli + args, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    call(run + ["--windows", "1"])
    out = call(["search", "--state-dir", str(tmp_path), "--method", "autosrh", "--rows", "2000"]).stdout
    assert "autosrh on ckpt-000000, 2000 rows" in out
    plan = json.loads((tmp_path / "plans" / "pending.json").read_text())
    assert plan["method"] == "autosrh" and plan["budget_reached"] <= plan["budget_asked"]
    assert all(d % 4 == 0 for d in plan["dims"].values())
    call(run + ["--windows", "2"])
    applied = json.loads((tmp_path / "plans" / "applied" / "000001.json").read_text())
    assert applied["method"] == "autosrh" and applied["decision"]["reshape"]
    w = json.loads((tmp_path / "summary.json").read_text())["windows"]
    assert w[1]["reallocation"]["source"] == "plan" and w[1]["reallocation"]["method"] == "autosrh"
    assert w[1]["reallocation"]["dims"] == plan["dims"] and set(w[1]["arms"]["slim"]["dims"].values()) == {32}
    assert w[1]["reallocation"]["embedding_params"] <= 0.25 * w[1]["arms"]["control"]["embedding_params"]


def test_feature_blocks_and_tier_weights_follow_the_counts():
    """Section 4.2.1: seen rows sorted by count, cut into L equal blocks, unseen rows in the tail;
    a row's tier weights are the shares of its ids in each tier, and the per-row mask of a
    single-valued field is exactly its id's row of alpha (eq. 8)."""
    from dimstream.search.autosrh import feature_blocks, row_counts, row_masks, tier_weights

    batch = _decoded(200, seed=4)
    counts = row_counts(batch, tiny_schema().num_embeddings)
    assert all(int(counts[f].sum()) == len(batch.values[f]) for f in DIMS)
    tier_of = {f: feature_blocks(counts[f], 3) for f in DIMS}
    for f in DIMS:
        seen = counts[f] > 0
        assert set(tier_of[f][~seen]) <= {2}
        for a in range(3):  # every id of a tier is at least as frequent as every id of the next
            for b in range(a + 1, 3):
                hi, lo = counts[f][seen & (tier_of[f] == a)], counts[f][seen & (tier_of[f] == b)]
                if len(hi) and len(lo):
                    assert hi.min() >= lo.max()
    w = tier_weights(batch, list(DIMS), tier_of, 3)
    torch.testing.assert_close(w["tags"].sum(1), torch.ones(len(batch)))  # every row has >= 1 tag
    alpha = {f: torch.rand(3, d, generator=torch.Generator().manual_seed(2)) for f, d in DIMS.items()}
    masks = row_masks(alpha, w)
    ids = batch.values["user"]  # single-valued: one id per row
    torch.testing.assert_close(masks["user"], alpha["user"][torch.from_numpy(tier_of["user"][ids])])


def test_with_tiers_the_frequent_ids_of_user_and_item_get_more_columns_than_their_tail():
    """tiers = 2 on the synthetic stream (Zipf ids), kappa 0.25: AutoSrh's (field, tier)
    allocation gives the frequent tier of user_id and item_id more columns than their tail,
    within the budget summed over the (field, tier) tables, widths multiples of 4."""
    from dimstream.stream.synthetic import SyntheticSource

    src = SyntheticSource(rows_per_window=10_000)
    dec = Decoder(src.schema)
    fields = src.schema.feature_names
    multi = {f.name for f in src.schema.fields if f.kind == "multi"}
    arm = Arm(ArmSpec("control", {f: 16 for f in fields}), src.schema.num_embeddings, multi, ModelConfig("deepfm"))
    for w in range(4):
        batch = dec.decode(src.window_table(w)).batch
        for s in range(0, len(batch), 512):
            arm.train_step(batch.slice(s, min(s + 512, len(batch))))
    r = registry.build("autosrh", tiers=2).run(arm, batch, Budget("params", 0.25))
    t = r.details["tiers"]
    for f in ("user_id", "item_id"):
        assert t["dims"][f][0] > t["dims"][f][1], (f, t["dims"][f])
        assert sum(t["rows"][f]) == src.schema.num_embeddings[f]
    assert (
        t["budget_reached"]
        == t["params"]
        <= t["budget_asked"]
        == int(0.25 * 16 * sum(src.schema.num_embeddings.values()))
    )
    assert all(d % 4 == 0 for ds in t["dims"].values() for d in ds)
    assert r.params <= 0.25 * r.control_params  # the field-level allocation, for the slim arm
