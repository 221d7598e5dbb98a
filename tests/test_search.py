"""Dimension search: masks, SSEDS gradients, HAM's STE, the budget, the plan file, ground truth."""

import copy
import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.models.ctr import CTRModel
from dimstream.models.evaluation import _ranks
from dimstream.ops.config import RunConfig
from dimstream.search import (
    Budget,
    BudgetError,
    FieldCheck,
    Plan,
    PlanError,
    allocate,
    check_fields,
    ham_search,
    make_result,
    masked_logits,
    masked_loss,
    ones_masks,
    orthogonal_regulariser,
    rank_blocks,
    read_plan,
    registry,
    select_blocks,
    sseds_search,
    validate_plan,
    write_plan,
)
from dimstream.search.budget import params_of
from dimstream.search.ham import copy_arm, ham_gradient, ham_update, soft_orthogonality, split_holdout, touched_rows
from dimstream.search.masks import mask_gradient, pooled_embeddings
from dimstream.search.sseds import saliency_scores
from dimstream.stream.decode import Decoder
from dimstream.stream.synthetic import SyntheticSource
from tests.helpers import tiny_batch, tiny_schema

DIMS = {"user": 8, "item": 8, "tags": 12, "price": 4}


def _decoded(n=64, seed=0):
    return Decoder(tiny_schema()).decode(tiny_batch(n, seed)).batch


def _model(model="deepfm", seed=0):
    torch.manual_seed(seed)
    m = CTRModel(
        DIMS,
        tiny_schema().num_embeddings,
        {"tags"},
        ModelConfig(model, mlp=(16,), interaction_dim=8),
        device=torch.device("cpu"),
    )
    with torch.no_grad():  # weights large enough that every column matters
        for p in m.parameters():
            p.uniform_(-0.5, 0.5)
    return m


def _arm(model="deepfm"):
    return Arm(
        ArmSpec("control", dict(DIMS)),
        tiny_schema().num_embeddings,
        {"tags"},
        ModelConfig(model, mlp=(16,), interaction_dim=8),
    )


def _tables(arm):
    return {
        k: v.local_shards()[0].tensor.clone() for k, v in arm.model.state_dict().items() if hasattr(v, "local_shards")
    }


# --- (1) masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["deepfm", "fm", "wdl", "dcnv2"])
def test_all_ones_mask_equals_the_unmasked_model(model):
    arm = _arm(model)
    batch = _decoded()
    kjt = batch.to_kjt(arm.feature_names)
    with torch.no_grad():
        plain = arm.model(kjt)
        masked = masked_logits(arm, kjt, ones_masks(arm.dims))
    torch.testing.assert_close(masked, plain)
    # a zero column changes the output: the mask really reaches the head (by little: an untrained
    # table's values are within +-init_range, 1e-4, so FM's products move by ~1e-8, inside allclose)
    zero = ones_masks(arm.dims)
    zero["user"][0] = 0.0
    assert (masked_logits(arm, kjt, zero).detach() - plain).abs().max() > 0


def test_searching_never_modifies_the_control_arm():
    """SSEDS and HAM backprop into masks only: the fused tables, the dense weights and the
    optimizer states of the control arm stay exactly as they were; no dense .grad is left."""
    arm = _arm()
    batch = _decoded(256)
    for s in range(0, 256, 64):
        arm.train_step(batch.slice(s, s + 64))
    tables = _tables(arm)
    dense = {n: p.detach().clone() for n, p in arm.model.named_parameters() if ".embedding." not in f".{n}"}
    for p in arm.model.parameters():
        p.grad = None
    sseds_search(arm, batch, Budget("params", 0.5), rows=None, batch_size=64)
    tr, va = split_holdout(batch, 0.25)
    ham_search(arm, tr, va, Budget("params", 0.5), steps=20, batch_size=32, eval_every=10)
    for k, v in _tables(arm).items():
        torch.testing.assert_close(v, tables[k], rtol=0, atol=0, msg=k)
    for n, p in arm.model.named_parameters():
        if n in dense:
            torch.testing.assert_close(p.detach(), dense[n], rtol=0, atol=0, msg=n)
            assert p.grad is None, n


# --- (2) SSEDS gradient vs finite differences ------------------------------------------------------


@pytest.mark.parametrize("model", ["deepfm", "dcnv2"])
def test_sseds_gradient_equals_central_finite_difference(model):
    """g_ij = dL/dalpha_ij at alpha = 1 (SSEDS eq. 10), as computed by saliency_scores over
    several accumulated mini-batches, equals (L(1 + d e_ij) - L(1 - d e_ij)) / 2d of the mean
    loss over all rows, evaluated in float64."""
    m = _model(model)
    batch = _decoded(96)
    g, s, _ = saliency_scores(m, batch, batch_size=32)  # 3 mini-batches, accumulated
    ref = copy.deepcopy(m)
    ref.head.double()
    kjt, y = batch.to_kjt(ref.feature_names), batch.labels_tensor().double()

    def loss(alpha):
        with torch.no_grad():
            return float(masked_loss(ref, kjt, y, alpha))

    delta = 1e-5
    checked = 0
    for f, d in DIMS.items():
        for j in {0, d // 2, d - 1}:
            up, down = ones_masks(DIMS, dtype=torch.float64), ones_masks(DIMS, dtype=torch.float64)
            up[f][j] += delta
            down[f][j] -= delta
            fd = (loss(up) - loss(down)) / (2 * delta)
            assert g[f][j] == pytest.approx(fd, rel=1e-3, abs=1e-6), (f, j)
            checked += 1
    assert checked >= 10
    # eq. 11: saliency is |g| normalised over all columns
    total = sum(np.abs(v).sum() for v in g.values())
    for f in DIMS:
        np.testing.assert_allclose(s[f], np.abs(g[f]) / total)
    assert sum(v.sum() for v in s.values()) == pytest.approx(1.0)


def test_gradient_accumulated_over_minibatches_equals_one_big_batch():
    m = _model()
    batch = _decoded(100)
    masks = ones_masks(DIMS, requires_grad=True)
    whole, _, _ = mask_gradient(m, [batch], masks)
    parts, _, n = mask_gradient(m, [batch.slice(0, 30), batch.slice(30, 64), batch.slice(64, 100)], masks)
    assert n == 100
    for f in DIMS:
        torch.testing.assert_close(parts[f], whole[f], rtol=1e-5, atol=1e-7)


# --- (3) HAM's straight-through gradient ------------------------------------------------------------


def test_ham_ste_gradient_equals_gradient_wrt_the_hard_mask():
    """HAM eq. 2: the gradient w.r.t. alpha is dL/dm at m = 1[alpha > 0], computed here with
    autograd on the mask itself; the forward pass uses the hard mask."""
    m = _model()
    batch = _decoded(80)
    gen = torch.Generator().manual_seed(1)
    alpha = {f: torch.randn(d, generator=gen) * 0.01 for f, d in DIMS.items()}
    g, loss = ham_gradient(m, batch, alpha)
    hard = {f: (a > 0).float().requires_grad_(True) for f, a in alpha.items()}
    ref_loss = masked_loss(m, batch.to_kjt(m.feature_names), batch.labels_tensor(), hard)
    ref = torch.autograd.grad(ref_loss, [hard[f] for f in DIMS])
    assert loss == pytest.approx(float(ref_loss), rel=1e-6)
    for f, r in zip(DIMS, ref):
        torch.testing.assert_close(g[f], r)
    assert any(float((a <= 0).sum()) for a in alpha.values())  # some columns were masked...
    assert all(float(g[f].abs().sum()) > 0 for f in DIMS)  # ...and still get a gradient


def test_ham_update_is_eq3_and_masked_columns_can_come_back():
    alpha = {"a": torch.tensor([0.01, -0.002, 0.0005])}
    grad = {"a": torch.tensor([0.0, -0.01, 0.01])}
    ham_update(alpha, grad, sign=1.0, lr=1.0, mu=5e-5)
    torch.testing.assert_close(alpha["a"], torch.tensor([0.01 - 5e-5, -0.002 + 0.01 - 5e-5, 0.0005 - 0.01 - 5e-5]))
    assert alpha["a"][1] > 0 and alpha["a"][2] < 0  # a masked column returns, a kept one leaves


def test_ham_search_copy_is_exact_and_reaches_a_column_target():
    arm = _arm()
    batch = _decoded(512, seed=3)
    twin = copy_arm(arm)
    torch.testing.assert_close(torch.from_numpy(twin.predict(batch)), torch.from_numpy(arm.predict(batch)))
    tr, va = split_holdout(batch, 0.25)
    r = ham_search(arm, tr, va, Budget("columns", columns=16), steps=300, lr=1.0, batch_size=64, eval_every=25)
    assert r.method == "ham" and r.budget_kind == "columns" and r.budget_asked == 16
    assert sum(r.dims.values()) <= 16 and all(d % 4 == 0 for d in r.dims.values())
    assert r.budget_reached == sum(r.dims.values()) > 0
    for f, d in r.dims.items():  # kept columns are the field's highest alphas
        assert len(r.kept_columns[f]) == d
        a = np.array(r.saliency[f])
        if d:
            assert a[r.kept_columns[f]].min() >= np.delete(a, r.kept_columns[f]).max(initial=-np.inf)


# --- eq. 1: soft orthogonality -------------------------------------------------------------------


def test_soft_orthogonality_is_eq1_and_the_regulariser_trains_touched_rows_only():
    q, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    assert float(soft_orthogonality({"a": q})) == pytest.approx(0.0, abs=1e-12)
    v = torch.randn(10, 4, dtype=torch.float64)
    expected = ((v.t() @ v - torch.eye(4, dtype=torch.float64)) ** 2).sum() / 16
    assert float(soft_orthogonality({"a": v})) == pytest.approx(float(expected))
    # the lookup returns the table rows of the ids the batch touches
    m = _model()
    batch = _decoded(40)
    kjt = batch.to_kjt(m.feature_names)
    rows = touched_rows(m, kjt)
    for f, (ids, emb) in rows.items():
        w = m.embedding.deep.embedding_bags[f"emb_{f}"].weight
        torch.testing.assert_close(emb, w[ids])
    # on a sharded arm the penalty's gradient moves exactly the touched rows (fused update)
    arm = Arm(
        ArmSpec("control", dict(DIMS)),
        tiny_schema().num_embeddings,
        {"tags"},
        ModelConfig("deepfm", mlp=(16,), interaction_dim=8, sparse_optimizer="sgd", sparse_lr=0.1),
    )
    before = _tables(arm)
    reg = orthogonal_regulariser(arm, kjt, lam=1.0)
    assert reg.requires_grad and float(reg) > 0
    reg.backward()
    after = _tables(arm)
    key = "embedding.deep.embedding_bags.emb_user.weight"
    moved = (after[key] - before[key]).abs().sum(dim=1) > 0
    touched = torch.zeros(len(moved), dtype=torch.bool)
    touched[rows["user"][0]] = True
    assert moved.any() and torch.equal(moved, moved & touched)


# --- (4) budget and quantisation -----------------------------------------------------------------

ROWS = {"big": 1000, "mid": 100, "small": 10, "tiny": 2}
CTRL = {"big": 16, "mid": 16, "small": 16, "tiny": 16}


def _scores(seed=0):
    rng = np.random.default_rng(seed)
    return {f: rng.random(16) * w for f, w in zip(CTRL, (1.0, 0.5, 0.2, 0.01))}


@pytest.mark.parametrize("kappa", [0.05, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocation_is_quantised_within_budget_and_keeps_top_columns(kappa, seed):
    scores = _scores(seed)
    a = allocate(scores, Budget("params", kappa), CTRL, ROWS)
    assert all(d % 4 == 0 and 0 <= d <= 16 for d in a.dims.values())
    assert a.used == params_of(a.dims, ROWS) <= kappa * params_of(CTRL, ROWS) and a.limit == int(
        kappa * params_of(CTRL, ROWS)
    )
    for f, cols in a.kept_columns.items():  # each field keeps its top-scored columns
        assert len(cols) == a.dims[f] and cols == sorted(cols)
        if cols:
            assert scores[f][cols].min() >= np.delete(scores[f], cols).max(initial=-np.inf)


def test_selection_stops_at_the_first_block_that_does_not_fit():
    """SSEDS eq. 12 over blocks of 4: the kept set is a prefix of the ranking (quantile threshold)."""
    ranking = [("big", 0), ("mid", 0), ("big", 1), ("tiny", 0), ("tiny", 1)]
    kept = select_blocks(ranking, ROWS, limit=4 * 1150)
    assert kept == {"big": 1, "mid": 1}  # big/1 overflows: tiny blocks below it are not kept


def test_fill_spends_what_the_prefix_leaves_on_the_next_blocks_that_fit():
    """Budget.fill: after the prefix, lower-ranked blocks that still fit are kept, best first,
    and a field whose block did not fit gets none of its later ones."""
    ranking = [("big", 0), ("mid", 0), ("big", 1), ("tiny", 0), ("big", 2), ("mid", 1), ("tiny", 1)]
    kept = select_blocks(ranking, ROWS, limit=4 * 1150, fill=True)
    assert kept == {"big": 1, "mid": 1, "tiny": 2}  # 4 x 1108: big/1, big/2 and mid/1 overflow
    assert select_blocks(ranking, ROWS, limit=4 * 1210, fill=True) == {"big": 1, "mid": 2, "tiny": 2}
    scores = _scores(0)
    plain, filled = (allocate(scores, Budget("params", 0.25, fill=f), CTRL, ROWS) for f in (False, True))
    assert plain.used < filled.used <= filled.limit
    assert all(filled.dims[f] >= plain.dims[f] for f in CTRL)


def test_blocks_are_ranked_by_the_mean_score_of_four_columns():
    """One lucky column does not buy a field 4 columns: a block's score is its columns' mean."""
    scores = {
        "x": np.array([9, 8, 7, 6, 5, 1, 1, 1.0]),
        "y": np.array([4, 4, 4, 4, 4, 3, 3, 3.0]),
        "z": np.array([10, 0, 0, 0, 0, 0, 0, 0.0]),
    }
    ranking, order = rank_blocks(scores)
    # means: x0 7.5, y0 4, y1 3.5, z0 2.5, x1 2, z1 0
    assert ranking == [("x", 0), ("y", 0), ("y", 1), ("z", 0), ("x", 1), ("z", 1)]
    assert list(order["x"][:4]) == [0, 1, 2, 3]
    assert rank_blocks(scores, min_score=2.5)[0] == [("x", 0), ("y", 0), ("y", 1)]
    a = allocate(scores, Budget("columns", columns=12), {"x": 8, "y": 8, "z": 8}, {"x": 1, "y": 1, "z": 1})
    assert a.dims == {"x": 4, "y": 8, "z": 0} and a.kept_columns["x"] == [0, 1, 2, 3]


def test_a_field_can_go_to_zero_and_noise_like_fields_leave():
    scores = _scores()
    scores["tiny"] = np.full(16, 1e-6)  # useless field
    a = allocate(scores, Budget("params", 0.25), CTRL, ROWS)
    assert a.dims["tiny"] == 0 and a.kept_columns["tiny"] == []
    assert a.dims["big"] > 0


def test_column_budget_counts_columns_not_parameters():
    scores = _scores()
    a = allocate(scores, Budget("columns", columns=20), CTRL, ROWS)
    assert sum(a.dims.values()) <= 20 and a.used == sum(a.dims.values()) and a.limit == 20
    assert all(d % 4 == 0 for d in a.dims.values())
    # the most salient field gets the most columns when columns all cost the same
    assert a.dims["big"] == max(a.dims.values())


def test_budget_errors_are_explicit():
    with pytest.raises(BudgetError, match="kind"):
        Budget("bytes")
    with pytest.raises(BudgetError, match="kappa"):
        Budget("params", kappa=1.5)
    with pytest.raises(BudgetError, match="columns"):
        Budget("columns")
    with pytest.raises(BudgetError, match="too small"):
        allocate(_scores(), Budget("params", 0.0001), CTRL, ROWS)


def test_a_field_the_check_drops_gets_zero_and_its_budget_goes_to_the_others():
    scores = _scores()
    free = allocate(scores, Budget("params", 0.25), CTRL, ROWS)
    a = allocate(scores, Budget("params", 0.25), CTRL, ROWS, keep_fields={"big": False})
    assert free.dims == {"big": 4, "mid": 0, "small": 0, "tiny": 0}
    assert a.dims["big"] == 0 and a.kept_columns["big"] == [] and a.used <= a.limit == free.limit
    # big's 4,000 parameters go down the ranking: mid, small and tiny now all keep columns
    assert a.dims["mid"] > 0 and a.dims["small"] > 0 and a.dims["tiny"] > 0
    with pytest.raises(BudgetError, match="too small"):
        allocate(scores, Budget("params", 0.25), CTRL, ROWS, keep_fields={f: False for f in CTRL})


# --- (4b) the held-out field check ------------------------------------------------------------------


def test_field_check_is_eq9_per_field_with_the_field_replaced_by_its_mean():
    """delta_f = mean_rows[l(e_f -> mean e_f) - l], stderr from the paired differences, over
    mini-batches (means over all rows); keep_f = delta_f > z * stderr_f."""
    m = _model()
    batch = _decoded(96)
    check = check_fields(m, batch, z=1.0, batch_size=32)
    embs, wide = pooled_embeddings(m, batch.to_kjt(m.feature_names))
    y = batch.labels_tensor()

    def losses(e):
        with torch.no_grad():
            return torch.nn.functional.binary_cross_entropy_with_logits(m.head(e, wide), y, reduction="none").double()

    base = losses(embs)
    for i, f in enumerate(m.feature_names):
        e = list(embs)
        e[i] = embs[i].mean(0, keepdim=True).expand_as(embs[i])
        d = (losses(e) - base).numpy()
        assert check.delta[f] == pytest.approx(d.mean(), rel=1e-4, abs=1e-7), f
        assert check.stderr[f] == pytest.approx(d.std(ddof=1) / np.sqrt(96), rel=1e-4, abs=1e-7), f
        assert check.keep[f] == (check.delta[f] > check.stderr[f])
    assert check.rows == 96 and check.z == 1.0 and set(check.dropped) == {f for f in DIMS if not check.keep[f]}
    assert all(check.delta[f] != 0 and check.stderr[f] > 0 for f in DIMS)
    assert FieldCheck.from_dict(json.loads(json.dumps(check.to_dict()))) == check
    with pytest.raises(ValueError, match="not a field check"):
        FieldCheck.from_dict(check.to_dict() | {"keep": {"user": True}})


def test_a_field_that_says_nothing_about_the_row_is_dropped():
    """Every row has the same user id: replacing the user embedding by its mean changes nothing,
    delta = 0 exactly, and the field fails the test; SSEDS then gives it 0 columns."""
    raw = tiny_batch(128)
    raw = raw.set_column(raw.schema.get_field_index("user"), "user", pa.array(np.full(128, 7)))
    batch = Decoder(tiny_schema()).decode(raw).batch
    arm = _arm()
    check = check_fields(arm, batch)
    assert check.delta["user"] == 0.0 and check.stderr["user"] == 0.0 and not check.keep["user"]
    # the other fields of this untrained model pass or fail the test by chance (its init): keep
    # them, so that what is checked is that SSEDS obeys the check's verdict on `user`
    check = dataclasses.replace(check, keep={f: f != "user" for f in check.keep})
    r = sseds_search(arm, batch, Budget("params", 0.5), rows=None, field_check=check)
    assert r.dims["user"] == 0 and r.details["field_check"]["keep"]["user"] is False
    plain = sseds_search(arm, batch, Budget("params", 0.5), rows=None)
    assert plain.details["field_check"] is None


def test_field_check_refuses_too_few_rows_and_a_negative_z():
    with pytest.raises(ValueError, match="at least 2"):
        check_fields(_model(), _decoded(1))
    with pytest.raises(ValueError, match="z must be"):
        check_fields(_model(), _decoded(8), z=-1)


def test_sseds_per_parameter_ranks_by_saliency_per_row():
    arm = _arm()
    batch = _decoded(256)
    full = sseds_search(arm, batch, Budget("params", 0.3), rows=None)
    per = sseds_search(arm, batch, Budget("params", 0.3), rows=None, per_parameter=True)
    assert full.saliency == per.saliency and per.details["per_parameter"]
    rows = tiny_schema().num_embeddings
    for r in (full, per):
        assert r.method == "sseds" and r.budget_kind == "params"
        assert r.params == r.budget_reached == params_of(r.dims, rows) <= 0.3 * r.control_params
        assert r.control_params == params_of(DIMS, rows) and r.rows_used == 256
        assert set(r.dims) == set(rows) and all(d % 4 == 0 for d in r.dims.values())
    # per parameter, the cheapest field (price: 16 rows) is ranked first among equals of saliency
    dens = {f: np.array(per.saliency[f]) / rows[f] for f in DIMS}
    best = max(DIMS, key=lambda f: dens[f].max())
    assert per.dims[best] > 0


def test_the_registered_methods_are_the_search_functions():
    """`--search sseds|ham` (search/registry.py) run sseds_search / ham_search with their knobs;
    the allocation floor the daemon's policy uses is the method's (HAM: alpha > 0)."""
    arm, batch, budget = _arm(), _decoded(256), Budget("params", 0.3)
    a = registry.build("sseds", rows=None, steps=5).run(arm, batch, budget)  # steps: not an SSEDS knob
    b = sseds_search(arm, batch, budget, rows=None)
    assert (a.method, a.dims, a.kept_columns, a.saliency) == ("sseds", b.dims, b.kept_columns, b.saliency)
    h = registry.get("ham", steps=20, batch_size=32, eval_every=10).run(arm, batch, budget)
    g = ham_search(arm, *split_holdout(batch, 0.2), budget, steps=20, batch_size=32, eval_every=10)
    assert (h.method, h.dims, h.saliency, h.rows_used) == ("ham", g.dims, g.saliency, 256)
    assert registry.lookup("ham").min_score == 0.0 and registry.lookup("sseds").min_score is None
    with pytest.raises(TypeError, match="no knob rows"):
        registry.get("ham", rows=8192)


def test_make_result_is_the_allocation_with_its_figures():
    """The one SearchResult builder: dims over every field, the budget in its unit, the
    parameters of the control and of the allocation, the field check in the details."""
    rows = {"a": 100, "b": 10, "c": 50}
    check = FieldCheck({"a": 1.0, "b": 0.0}, {"a": 0.1, "b": 0.1}, {"a": True, "b": False}, 2.0, 10, 0.0)
    scores = {"a": np.arange(8.0), "b": np.full(8, 9.0)}
    r = make_result(
        "m",
        scores,
        Budget("params", 0.5),
        {"a": 8, "b": 8},
        rows,
        started=0.0,
        rows_used=7,
        field_check=check,
        details={"x": 1},
    )
    assert r.dims == {"a": 4, "b": 0, "c": 0} and r.kept_columns == {"a": [4, 5, 6, 7], "b": [], "c": []}
    assert (r.budget_asked, r.budget_reached, r.control_params, r.params) == (440, 400, 880, 400)
    assert r.saliency == {"a": [float(x) for x in range(8)], "b": [9.0] * 8} and r.rows_used == 7
    assert r.details == {"x": 1, "kappa": 0.5, "field_check": check.to_dict()} and r.duration_seconds > 0


# --- (5) the plan file ---------------------------------------------------------------------------

NUM = {"a": 100, "b": 10, "c": 50}
CONTROL = {"a": 8, "b": 8, "c": 8}


def _plan(**kw):
    p = Plan(
        dims={"a": 0, "b": 8, "c": 4},
        kept_columns={"a": [], "b": list(range(8)), "c": [1, 3, 5, 7]},
        saliency={f: [0.1] * 8 for f in NUM},
        method="sseds",
        budget_kind="params",
        budget_asked=420,
        budget_reached=280,
        schema_fingerprint="abc123",
        checkpoint="ckpt-000011",
        created_at="2026-01-01T00:00:00Z",
        duration_seconds=0.25,
    )
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def test_plan_round_trip_is_atomic(tmp_path):
    path = tmp_path / "plans" / "plan.json"
    plan = _plan()
    write_plan(path, plan)
    assert read_plan(path) == plan
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]  # no temporaries left
    validate_plan(read_plan(path), "abc123", NUM, CONTROL, kappa=0.25)
    write_plan(path, _plan(method="ham"))  # replaced whole
    assert read_plan(path).method == "ham"


def test_the_plan_says_which_field_check_it_followed(tmp_path):
    path = tmp_path / "plan.json"
    checked = _plan(field_check={"rows": 50_000, "z": 2.0, "dropped": ["user"]})
    write_plan(path, checked)
    assert read_plan(path) == checked
    old = {k: v for k, v in json.loads(path.read_text()).items() if k != "field_check"}
    path.write_text(json.dumps(old))  # a plan written before the check existed
    assert read_plan(path).field_check is None
    path.write_text(json.dumps(old | {"field_check": "user"}))
    with pytest.raises(PlanError, match="field_check"):
        read_plan(path)


def test_plan_from_a_search_result_validates(tmp_path):
    arm = _arm()
    r = sseds_search(arm, _decoded(128), Budget("params", 0.25))
    plan = Plan.from_result(r, tiny_schema().fingerprint(), "ckpt-000001")
    write_plan(tmp_path / "plan.json", plan)
    back = read_plan(tmp_path / "plan.json")
    assert back.dims == r.dims and back.kept_columns == r.kept_columns
    validate_plan(back, tiny_schema().fingerprint(), tiny_schema().num_embeddings, DIMS, kappa=0.25)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"{not json", "malformed"),
        (b"[1, 2]", "malformed"),
        (b"", "malformed"),
        (json.dumps({"dims": {}}).encode(), "missing key"),
    ],
)
def test_malformed_plan_files_are_refused(tmp_path, content, reason):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(PlanError) as e:
        read_plan(path)
    assert e.value.reason == reason and str(e.value).startswith(reason)


def test_missing_plan_file_and_bad_types_are_refused(tmp_path):
    with pytest.raises(PlanError, match="malformed: cannot read"):
        read_plan(tmp_path / "absent.json")
    for key, bad in [
        ("dims", {"a": "8"}),
        ("kept_columns", {"a": [0.5]}),
        ("budget_kind", "bytes"),
        ("saliency", {"a": ["x"]}),
        ("duration_seconds", -1),
        ("dims", {"a": True}),
    ]:
        d = _plan().to_dict() | {key: bad}
        (tmp_path / "p.json").write_text(json.dumps(d))
        with pytest.raises(PlanError) as e:
            read_plan(tmp_path / "p.json")
        assert e.value.reason == "bad type", key


@pytest.mark.parametrize(
    "change, kwargs, reason",
    [
        ({"dims": {"a": 8, "b": 8, "c": 8}, "kept_columns": {f: list(range(8)) for f in NUM}}, {}, "over budget"),
        ({}, {"schema_fingerprint": "zzz999"}, "another schema"),
        (
            {"dims": {"a": 0, "b": 6, "c": 4}, "kept_columns": {"a": [], "b": list(range(6)), "c": [1, 3, 5, 7]}},
            {},
            "width not a multiple of 4",
        ),
        ({"dims": {"a": 0, "b": 8, "c": 4, "d": 4}}, {}, "unknown field"),
        ({"dims": {"b": 8, "c": 4}, "kept_columns": {"b": list(range(8)), "c": [1, 3, 5, 7]}}, {}, "missing field"),
        ({"kept_columns": {"a": [], "b": list(range(8)), "c": [1, 3, 5, 9]}}, {}, "bad kept columns"),
        ({"kept_columns": {"a": [], "b": list(range(8)), "c": [1, 3, 3, 7]}}, {}, "bad kept columns"),
        (
            {"dims": {"a": 0, "b": 12, "c": 0}, "kept_columns": {"a": [], "b": list(range(12)), "c": []}},
            {},
            "wider than the control",
        ),
        ({"dims": {"a": 0, "b": 0, "c": 0}, "kept_columns": {"a": [], "b": [], "c": []}}, {}, "keeps no field"),
        ({"budget_kind": "columns", "budget_asked": 8}, {}, "over budget"),
    ],
)
def test_invalid_plans_are_rejected_with_a_reason(change, kwargs, reason):
    plan = _plan(**change)
    with pytest.raises(PlanError) as e:
        validate_plan(plan, kwargs.get("schema_fingerprint", "abc123"), NUM, CONTROL, kappa=0.25)
    assert e.value.reason == reason, str(e.value)


# --- (6) ground truth on the synthetic stream ---------------------------------------------------------


def spearman(x, y) -> float:
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    return float(np.corrcoef(rx, ry)[0, 1])


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other and
    every step slows down; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained_control():
    """Control arm, width 32 everywhere, DeepFM, trained on 12 default windows (50,000 rows)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = SyntheticSource()
        dec = Decoder(src.schema)
        multi = {f.name for f in src.schema.fields if f.kind == "multi"}
        arm = Arm(
            ArmSpec("control", {f: 32 for f in src.schema.feature_names}),
            src.schema.num_embeddings,
            multi,
            ModelConfig("deepfm"),
        )
        for w in range(12):
            batch = dec.decode(src.window_table(w)).batch
            for s in range(0, len(batch), arm.config.batch_size):
                arm.train_step(batch.slice(s, min(s + arm.config.batch_size, len(batch))))
        held = dec.decode(src.window_table(12)).batch  # the next window, never trained on
        yield src, arm, batch, held
    finally:
        torch.set_num_threads(n)


def _truth_report(src, r) -> tuple[int, int, float, str]:
    rank = src.field_rank
    noise = [f for f in rank if rank[f] == 0]
    signal = [f for f in rank if rank[f] > 0]
    pruned = sum(r.dims[f] == 0 for f in noise)
    rho = spearman([rank[f] for f in signal], [r.dims[f] for f in signal])
    lines = [
        f"{r.method}: noise fields pruned {pruned}/{len(noise)}, Spearman(rank, dim) {rho:.3f}",
        f"{'field':15s} rank  dim  field score (sum over columns)",
    ]
    lines += [f"{f:15s} {rank[f]:4d} {r.dims[f]:4d}  {sum(r.saliency[f]):+.5f}" for f in rank]
    return pruned, len(noise), rho, "\n".join(lines)


@pytest.fixture(scope="module")
def held_out_check(trained_control):
    """The held-out field check of the trained control on the next window (50,000 rows)."""
    src, arm, recent, held = trained_control
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return check_fields(arm, held)
    finally:
        torch.set_num_threads(n)


def test_the_field_check_drops_every_noise_field_and_keeps_the_strong_ones(trained_control, held_out_check):
    """Exact held-out eq. 9 per field: every rank-0 field fails the z = 2 test (replacing it by
    its mean does not raise the next window's loss), every field of rank >= 4 passes."""
    src, *_ = trained_control
    check = held_out_check
    rank = src.field_rank
    assert check.rows == 50_000 and check.z == 2.0
    assert [f for f in rank if rank[f] == 0 and check.keep[f]] == []
    assert [f for f in rank if rank[f] >= 4 and not check.keep[f]] == []
    for f in rank:  # the decision is the stated test on the reported numbers
        assert check.keep[f] == (check.delta[f] > 2.0 * check.stderr[f])


@pytest.mark.parametrize("method", ["sseds", "ham"])
def test_search_recovers_the_synthetic_truth(trained_control, held_out_check, one_thread, method):
    """kappa = 0.25: at least 75% of the rank-0 (noise) fields get 0 columns, and the allocated
    width of the signal fields follows their true rank (Spearman >= 0.6).

    Both searches rank columns as the papers do and allocate after the held-out field check
    (search/fieldcheck.py) on the next window, which the control has not trained on: neither
    saliency alone prunes the noise fields the online control has memorised (the runs without
    the check in benchmarks/results/search.json, truth_runs). SSEDS runs as the daemon does with
    the field check on (issue 14): on the last 8,192 trained rows (search_rows), after the check at the
    default z (field_check_z) on 50,000 held-out rows, as many as the daemon's averaged check
    must pool before it may drop a field (field_check_min_rows). On the whole last window it
    reaches Spearman 0.52 on this fixture: the daemon's rows rank the signal fields better here.
    HAM trains a copy on the next window's first 80% and moves alpha on its last 20% (z = 2);
    lr = 1.0 is taken from the paper's grid {1, 0.1, 0.01, 0.001} (section 4.3) because on
    this stream |dL/dm| per column is so small that with lr = 1e-3 the data term of eq. 3 is
    far below mu and the search is blind (compare "ham lr=0.001" with "ham lr=1" in
    benchmarks/results/search.json, runs[])."""
    src, arm, recent, held = trained_control
    budget = Budget("params", kappa=0.25)
    if method == "sseds":
        cfg, c = RunConfig(), held_out_check
        check = FieldCheck.decide(c.delta, c.stderr, cfg.field_check_z, c.rows, c.seconds, cfg.field_check_min_rows)
        assert check.rows >= cfg.field_check_min_rows > 0
        r = sseds_search(arm, recent, budget, rows=cfg.search_rows, field_check=check)
    else:
        check = held_out_check
        tr, va = split_holdout(held, 0.2)
        r = ham_search(arm, tr, va, budget, steps=1000, lr=1.0, field_check=check)
    assert r.params <= 0.25 * r.control_params and all(d % 4 == 0 for d in r.dims.values())
    assert all(r.dims[f] == 0 for f in check.dropped)
    assert r.details["field_check"]["keep"] == check.keep
    pruned, n_noise, rho, report = _truth_report(src, r)
    assert pruned >= 0.75 * n_noise and rho >= 0.6, report
