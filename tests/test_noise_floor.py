"""The noise floor of SSEDS's saliency (search/noisefloor.py): its arithmetic, its gradient and
standard error against per-row mask gradients, and the search and config that carry it."""

import numpy as np
import pytest
import torch

from dimstream.models.config import ModelConfig
from dimstream.models.ctr import CTRModel
from dimstream.ops.config import ConfigError, RunConfig
from dimstream.search import Budget, registry, sseds_search
from dimstream.search.fieldcheck import FieldCheck, ablation_diffs, check_fields
from dimstream.search.masks import mask_gradient, ones_masks, pooled_embeddings
from dimstream.search.noisefloor import apply_floor, field_floor, gradient_and_error
from dimstream.search.policy import AllocationPolicy
from dimstream.search.sseds import minibatches, saliency_scores
from dimstream.stream.decode import Decoder
from tests.helpers import tiny_batch, tiny_schema

DIMS = {"user": 8, "item": 8, "tags": 12, "price": 4}


def _model(seed=0):
    torch.manual_seed(seed)
    return CTRModel(
        DIMS,
        tiny_schema().num_embeddings,
        {"tags"},
        ModelConfig("deepfm", mlp=(16,), interaction_dim=8),
        device=torch.device("cpu"),
    )


def test_a_field_whose_saliency_equals_its_null_gets_zero_and_a_strong_field_keeps_its_columns():
    se = np.full(4, 0.01)
    at_null = np.full(4, np.sqrt(2 / np.pi) * 0.01)  # sum |g| = the null's mean exactly
    strong = np.array([0.30, -0.20, 0.10, 0.05])
    floor = field_floor({"noise": at_null, "strong": strong}, {"noise": se, "strong": se}, k=1.0)
    assert floor.null_mean["noise"] == pytest.approx(floor.saliency["noise"])
    assert floor.null_sd["noise"] == pytest.approx(np.sqrt((1 - 2 / np.pi) * 4) * 0.01)
    assert floor.keep == {"noise": False, "strong": True} and floor.floored == ["noise"]
    out = apply_floor({"noise": np.abs(at_null), "strong": np.abs(strong)}, floor)
    assert out["noise"].tolist() == [0.0] * 4
    assert out["strong"].tolist() == np.abs(strong).tolist()
    # k = 0: just above the null's mean passes, at it does not
    assert field_floor({"a": at_null * 1.001}, {"a": se}, 0.0).keep == {"a": True}
    assert field_floor({"a": at_null * 0.999}, {"a": se}, 0.0).keep == {"a": False}
    with pytest.raises(ValueError, match="k must be >= 0"):
        field_floor({"a": at_null}, {"a": se}, -1.0)


def test_gradient_and_error_are_eq10_and_the_standard_error_of_per_row_mask_gradients():
    m = _model()
    batch = Decoder(tiny_schema()).decode(tiny_batch(48, 0)).batch
    g, se, loss, n = gradient_and_error(m, minibatches(batch, 16))
    g_ref, _, loss_ref = saliency_scores(m, batch, batch_size=16)
    assert n == 48 and loss == pytest.approx(loss_ref, rel=1e-5)
    per_row = []  # dl_r/dalpha at alpha = 1, one row at a time
    for r in range(len(batch)):
        gr, _, _ = mask_gradient(m, [batch.slice(r, r + 1)], ones_masks(m.dims, requires_grad=True))
        per_row.append({f: v.double().numpy() for f, v in gr.items()})
    for f in DIMS:
        rows = np.stack([p[f] for p in per_row])
        np.testing.assert_allclose(g[f], g_ref[f], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(g[f], rows.mean(0), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(se[f], rows.std(0, ddof=1) / np.sqrt(len(rows)), rtol=1e-3, atol=1e-8)


def test_sseds_with_a_floor_gives_floored_fields_no_block_even_when_the_budget_is_filled():
    m = _model()
    batch = Decoder(tiny_schema()).decode(tiny_batch(64, 1)).batch
    budget = Budget("params", kappa=1.0, fill=True)  # room for every column: only the floor prunes
    off = sseds_search(m, batch, budget, rows=None, batch_size=32)
    assert all(off.dims[f] == DIMS[f] for f in DIMS) and off.details["noise_floor"] is None
    g, se, _, _ = gradient_and_error(m, minibatches(batch, 32))
    t = {f: np.abs(g[f]).sum() for f in DIMS}
    mu = {f: np.sqrt(2 / np.pi) * se[f].sum() for f in DIMS}
    sd = {f: np.sqrt((1 - 2 / np.pi) * np.square(se[f]).sum()) for f in DIMS}
    z = {f: (t[f] - mu[f]) / sd[f] for f in DIMS}
    k = float(np.median(list(z.values())))  # half the fields below it
    on = sseds_search(m, batch, budget, rows=None, batch_size=32, noise_floor=k)
    floored = on.details["noise_floor"]["floored"]
    assert sorted(floored) == sorted(f for f in DIMS if z[f] <= k) and 0 < len(floored) < len(DIMS)
    for f in DIMS:
        assert on.dims[f] == (0 if f in floored else DIMS[f]), f
        assert (max(on.saliency[f]) == 0.0) == (f in floored)
    # a floor no field passes (a control that has learnt nothing yet) is ignored, not an empty arm
    none = sseds_search(m, batch, budget, rows=None, batch_size=32, noise_floor=1e9)
    assert none.dims == off.dims and none.details["noise_floor"] == {"ignored": "no field passed"}


def test_the_noise_floor_option_reaches_the_method_and_is_validated():
    assert RunConfig().noise_floor is None and RunConfig().field_check_z == 0.5
    method = registry.build("sseds", rows=100, noise_floor=2.0)
    assert method.noise_floor == 2.0 and method.min_score == 0.0
    assert registry.build("sseds", rows=100).min_score is None
    assert "noise_floor" not in registry.knobs("ham")
    with pytest.raises(ConfigError, match="noise_floor"):
        RunConfig(noise_floor=-1.0)
    with pytest.raises(ConfigError, match="field_check_z"):
        RunConfig(field_check_z=-0.5)
    with pytest.raises(ConfigError, match="knob of search sseds, not of 'ham'"):
        RunConfig(search="ham", noise_floor=2.0)
    assert RunConfig(noise_floor=2.0).search == "sseds"  # the default method takes it


def test_the_run_command_line_carries_both_options():
    from dimstream.ops.cli import _run_config, build_parser

    cfg = _run_config(build_parser().parse_args(["run", "--noise-floor", "2.5", "--field-check-z", "0"]))
    assert cfg.noise_floor == 2.5 and cfg.field_check_z == 0.0


# --- the pooled held-out field check (search/fieldcheck.py, search/policy.py) ---


def _shot(rows: int, z: float = 0.5, min_rows: int = 50_000) -> FieldCheck:
    """One window's check: `signal` raises the held-out loss by 5 standard errors, `noise`
    lowers it by one (memorised noise: its mean does better on unseen rows)."""
    return FieldCheck.decide({"signal": 5e-3, "noise": -1e-3}, {"signal": 1e-3, "noise": 1e-3}, z, rows, 0.0, min_rows)


def test_the_averaged_check_drops_nothing_until_its_effective_rows_reach_min_rows():
    d, n = 0.8, 8192
    policy = AllocationPolicy(0.25, decay=d, min_gain=0.0)
    w2, seen = 1.0 / n, []  # the average's sum of squared weights over rows, computed here by hand
    for k in range(12):
        if k:
            w2 = d * d * w2 + (1 - d) ** 2 / n
        check = policy.average_check(_shot(n))
        assert check.rows == round(1 / w2) and check.min_rows == 50_000
        seen.append((check.rows, check.dropped))
    # 8,192 rows a window: 1.47x after 2 shots, 6.66x (54,539 rows) after 8, never 9x = (1+d)/(1-d)
    assert [r for r, _ in seen[:3]] == [8192, 12047, 17239]
    first = next(k for k, (r, _) in enumerate(seen) if r >= 50_000)
    assert first == 7 and all(dropped == [] for _, dropped in seen[:first])
    assert all(dropped == ["noise"] for _, dropped in seen[first:])
    assert max(r for r, _ in seen) < n * (1 + d) / (1 - d)


def test_without_averaging_one_window_below_min_rows_never_drops_and_old_states_resume():
    policy = AllocationPolicy(0.25, decay=0.0, min_gain=0.0)
    assert all(policy.average_check(_shot(8192)).dropped == [] for _ in range(5))
    assert policy.average_check(_shot(50_000)).dropped == ["noise"]  # one shot of enough rows decides
    old = AllocationPolicy(0.25, decay=0.8, min_gain=0.0)  # a checkpoint from before the rows were pooled
    old.load_state_dict(
        {"field_check_avg": {"delta": {"signal": 5e-3, "noise": -1e-3}, "var": {"signal": 1e-6, "noise": 1e-6}}}
    )
    assert old.average_check(_shot(8192)).rows == round(1 / (0.64 / 8192 + 0.04 / 8192))
    c = _shot(100, min_rows=7)
    assert FieldCheck.from_dict(c.to_dict()) == c and c.dropped == ["noise"]
    legacy = {k: v for k, v in c.to_dict().items() if k != "min_rows"}
    assert FieldCheck.from_dict(legacy).min_rows == 0


def test_ablation_diffs_mean_is_the_check_and_shuffle_permutes_the_field_across_rows():
    m = _model(3)
    batch = Decoder(tiny_schema()).decode(tiny_batch(40, 2)).batch
    check = check_fields(m, batch, z=0.0, batch_size=16)
    mean = ablation_diffs(m, batch, "mean", batch_size=16)
    assert {f: float(d.mean()) for f, d in mean.items()} == pytest.approx(check.delta, rel=1e-9, abs=1e-12)
    shuffled = ablation_diffs(m, batch, "shuffle", batch_size=16, seed=5)
    embs, wide = pooled_embeddings(m, batch.to_kjt(m.feature_names))
    perm = None
    gen = torch.Generator().manual_seed(5)
    y = batch.labels_tensor()
    with torch.no_grad():
        base = torch.nn.functional.binary_cross_entropy_with_logits(m.head(embs, wide), y, reduction="none")
        for i, f in enumerate(m.feature_names):  # one permutation per field, drawn in field order
            perm = torch.randperm(len(batch), generator=gen)
            ablated = list(embs)
            ablated[i] = embs[i][perm]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(m.head(ablated, wide), y, reduction="none")
            np.testing.assert_allclose(shuffled[f], (loss - base).double().numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="mean or shuffle"):
        ablation_diffs(m, batch, "zero")


def test_the_min_rows_option_reaches_the_daemon_config_and_is_validated():
    from dimstream.ops.cli import _run_config, build_parser

    cfg = _run_config(build_parser().parse_args(["run", "--field-check-min-rows", "1000"]))
    assert cfg.field_check_min_rows == 1000
    with pytest.raises(ConfigError, match="field_check_min_rows"):
        RunConfig(field_check_min_rows=-1)
