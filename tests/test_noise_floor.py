"""The noise floor of SSEDS's saliency (search/noisefloor.py): its arithmetic, its gradient and
standard error against per-row mask gradients, and the search and config that carry it."""

import numpy as np
import pytest
import torch

from dimstream.models.config import ModelConfig
from dimstream.models.ctr import CTRModel
from dimstream.ops.config import ConfigError, RunConfig
from dimstream.search import Budget, registry, sseds_search
from dimstream.search.masks import mask_gradient, ones_masks
from dimstream.search.noisefloor import apply_floor, field_floor, gradient_and_error
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
    assert RunConfig().noise_floor is None and RunConfig().field_check_z == 2.0
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
