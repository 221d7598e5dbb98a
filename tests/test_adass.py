"""AdaS&S (search/adass.py, models/supernet.py): the equations on toy cases, the budget, and the
daemon and the cron job searching with it and re-shaping the slim arm from the supernet."""

import json

import numpy as np
import pytest
import torch

from dimstream.models.config import ModelConfig
from dimstream.models.supernet import Supernet, layer_norm, prefix_variance, update_pe, update_pf
from dimstream.search import registry
from dimstream.search.adass import (
    PolicyNet,
    adass_search,
    allocation_scores,
    reinforce_loss,
    resource_penalty,
    rl_search,
    size_costs,
)
from dimstream.search.budget import Budget
from dimstream.stream.decode import Decoder
from tests.helpers import tiny_batch, tiny_schema
from tests.test_search_daemon import CLI, RUN, _cli, _record, _Runner, _summary, _window

CFG = ModelConfig("fm", interaction_dim=16, batch_size=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The search is thousands of tiny ops: on a shared CI machine a second intra-op thread
    mostly waits to be scheduled (8 subnet evaluations: 0.07 s on one thread, 0.4 s on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(n=1024, seed=0):
    return Decoder(tiny_schema()).decode(tiny_batch(n, seed)).batch


@pytest.fixture(scope="module")
def trained():
    """A control arm and a supernet (max width 16) trained on the same 1,024 rows."""
    from dimstream.models.arm import Arm, ArmSpec

    s, rows = tiny_schema(), _rows()
    control = Arm(ArmSpec("control", {f: 16 for f in s.feature_names}), s.num_embeddings, {"tags"}, CFG)
    net = Supernet(s.num_embeddings, {"tags"}, CFG, max_dim=16)
    for lo in range(0, len(rows), 64):
        control.train_step(rows.slice(lo, lo + 64))
        net.train_step(rows.slice(lo, lo + 64))
    return control, net, rows


def test_pe_update_is_eq5_per_field():
    """P_E - eta LN(Var / T), LN over each field's candidates: the least varying (least trained)
    candidate gains rate, the most varying loses it, and rows stay distributions."""
    pe = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    var = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 1.0]])
    z = (var / 4 - (var / 4).mean(1, keepdims=True)) / np.sqrt((var / 4).var(1, keepdims=True) + 1e-5)
    expect = pe - 0.05 * z
    np.testing.assert_allclose(update_pe(pe, var, eta=0.05), expect / expect.sum(1, keepdims=True))
    new = update_pe(pe, var, eta=0.05)
    assert new[0, 0] > 0.25 > new[0, 3] and new[1, 3] > 0.4
    np.testing.assert_allclose(new.sum(1), 1.0)
    assert update_pe(pe, var, eta=10.0).min() > 0  # clipped at the floor


def test_pf_update_is_eq6_over_the_kept_fields():
    pf = np.array([0.5, 0.5, 0.5, 0.5])
    grad, norm = np.array([1.0, 3.0, 0.0, 2.0]), np.array([2.0, 2.0, 9.0, 4.0])
    kept = np.array([True, True, False, True])
    new = update_pf(pf, grad, norm, kept, eta=0.1, lambda_fs=0.6)
    score = (0.6 * grad + 0.4 * norm)[[0, 1, 3]] / 4
    np.testing.assert_allclose(new[[0, 1, 3]], 0.5 + 0.1 * layer_norm(score))
    assert new[2] == 0.5  # dropped this step: no gradient to judge it by
    assert new[3] > new[1] > new[0]  # larger gradient and L1 norm: sampled more
    assert update_pf(pf, grad, norm, kept, eta=10.0).min() >= 0.2 and update_pf(pf, grad, norm, kept, 10.0).max() <= 1


def test_prefix_variance_is_the_variance_of_each_candidates_columns():
    x = torch.randn(50, 3, 8, dtype=torch.float64)
    v = prefix_variance(x, (0, 4, 8))
    for i in range(3):
        for t, d in enumerate((4, 8)):
            assert v[i, t] == pytest.approx(float(x[:, i, :d].var(unbiased=False)))


def test_the_policy_gradient_raises_the_probability_of_a_rewarded_action():
    torch.manual_seed(0)
    policy = PolicyNet(3, 4, np.log([10.0, 20.0, 30.0]))
    state = torch.tensor([1, 1, 1])
    acts = torch.tensor([[3, 0, 2], [0, 1, 1]])  # the first is rewarded, the second not
    p0 = torch.softmax(policy(state), -1)
    log_p = torch.log(p0.gather(1, acts.t())).sum(0)
    reinforce_loss(log_p, torch.tensor([1.0, 0.0])).backward()
    with torch.no_grad():
        for q in policy.parameters():
            q -= 0.05 * q.grad  # one descent step on eq. 8
        p1 = torch.softmax(policy(state), -1)
    prob = lambda p, a: float(p[torch.arange(3), a].prod())  # noqa: E731
    assert prob(p1, acts[0]) > prob(p0.detach(), acts[0])
    assert prob(p1, acts[1]) < prob(p0.detach(), acts[1])


def test_eq9_penalises_cost_and_rewards_leaving_the_uniform():
    cost = size_costs([10, 30], (0, 4, 8))
    assert cost[1, 2] == pytest.approx(30 * 8 / (20 * 8)) and cost[0, 0] == 0
    uniform, cheap = torch.full((2, 3), 1 / 3), torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])
    assert resource_penalty(cheap, cost, 1.0, 0.0) < resource_penalty(uniform, cost, 1.0, 0.0)
    assert resource_penalty(cheap, cost, 0.0, 0.1) < 0 == resource_penalty(uniform, cost, 0.0, 0.1)


def test_the_resource_penalty_moves_the_allocation_towards_the_budget():
    """A reward that pays for every column: without the penalty the argmax takes the largest
    size everywhere; with it (lambda_r found by dual ascent) its spend comes down to the budget."""
    sizes, rows = (0, 4, 8, 12, 16), [50, 40, 20, 16]
    limit = int(0.25 * 16 * sum(rows))
    reward = lambda archs: [0.5 + 0.01 * float(np.sqrt(np.asarray(sizes)[a]).sum()) for a in archs]  # noqa: E731
    free, _ = rl_search(reward, rows, sizes, limit, start=1, steps=25, lambda_r=0.0, dual_rate=0.0)
    held, trace = rl_search(reward, rows, sizes, limit, start=1, steps=25, lambda_r=1.0, dual_rate=0.5)
    spend = lambda p: int(np.dot(rows, np.asarray(sizes)[p.argmax(1)]))  # noqa: E731
    assert spend(free) > 2 * limit
    assert abs(spend(held) - limit) < abs(spend(free) - limit)
    assert trace[-1]["lambda_r"] > 1.0  # the multiplier rose while the argmax was over budget


def test_the_argmax_is_kept_within_the_budget_and_projected_over_it():
    p = np.array([[0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])  # argmax: 8 columns and 0
    s = allocation_scores(p, (0, 4, 8), 8)
    assert (s[0] > 1).all() and (s[1] <= 1).all()
    np.testing.assert_allclose(s[1], [0.3] * 4 + [0.1] * 4)


def test_a_supernet_trains_by_adaptive_sampling_and_round_trips(trained):
    _, net, rows = trained
    assert net.steps == 16 and not np.allclose(net.p_e, 1 / 4) and not np.allclose(net.p_f, 0.8)
    twin = Supernet.from_bytes(net.to_bytes())
    assert torch.equal(twin.table("user"), net.table("user")) and np.array_equal(twin.p_f, net.p_f)
    pooled = net.pooled(rows.slice(0, 200))
    arch = np.array([1, 4, 0, 2])  # "tags" dropped
    np.testing.assert_allclose(
        twin.subnet_logits(twin.pooled(rows.slice(0, 200)), arch), net.subnet_logits(pooled, arch)
    )
    other = pooled.clone()
    other[:, 2] = torch.randn_like(other[:, 2])  # a dropped field's embedding changes nothing
    assert torch.equal(net.subnet_logits(other, arch), net.subnet_logits(pooled, arch))


@pytest.mark.parametrize("kappa", [0.25, 0.5])
def test_the_search_respects_the_budget_in_blocks_of_4(trained, kappa):
    control, net, rows = trained
    r = adass_search(control, rows, Budget("params", kappa), supernet=net, steps=8)
    assert r.method == "adass" and r.params <= kappa * r.control_params and r.budget_reached <= r.budget_asked
    assert all(d % 4 == 0 for d in r.dims.values()) and any(r.dims.values())
    assert all(r.kept_columns[f] == list(range(d)) for f, d in r.dims.items())  # the first d columns
    if not r.details["projected"]:
        assert r.dims == r.details["argmax_dims"]  # section 3.3: the argmax of P


def test_the_daemon_trains_the_supernet_searches_and_warm_starts_from_it(tmp_path):
    """--search adass in DaemonSearch: the supernet's test-then-train AUC is in the record, the
    search re-shapes the slim arm, and a granted column starts from the supernet's column."""
    from dimstream.ops.searching import SUPERNET_FILE, DaemonSearch
    from dimstream.search.policy import Decision

    runner = _Runner(tmp_path, search="adass", search_every=1, realloc_min_gain=0.0)
    search = DaemonSearch(runner)
    search.method.rl["steps"] = 10
    window, record = _window(runner), _record(0)
    search.after_training(window, record)
    assert record.supernet["rows"] == 512 and 0 <= record.supernet["auc"] <= 1
    assert record.search["method"] == "adass" and record.reallocation["method"] == "adass"
    slim = runner.arm("slim")
    assert slim.embedding_params <= 0.25 * runner.arm("control").embedding_params
    # 410 rows before the search, its 102 held-out rows after it: 7 + 2 mini-batches of 64
    assert (tmp_path / SUPERNET_FILE).exists() and search.supernet.steps == 9
    saved = registry.build("adass", rows=100, supernet_file=tmp_path / SUPERNET_FILE)._supernet()  # the cron's
    assert saved.steps == 9 and torch.equal(saved.table("user"), search.supernet.table("user"))
    f = next(f for f, d in slim.spec.dims.items() if d < 16)
    dims = dict(slim.spec.dims) | {f: slim.spec.dims[f] + 4}
    grant = Decision(True, dims, {g: list(range(d)) for g, d in dims.items()}, 1.0, "test")
    assert search._reshape(grant, "daemon", "adass", _record(1))
    new = runner.arm("slim")
    got = _table(new, f)[:, -4:]
    torch.testing.assert_close(got, search.supernet.table(f)[:, dims[f] - 4 : dims[f]])
    if slim.spec.dims[f]:  # the columns it had keep their trained values
        torch.testing.assert_close(_table(new, f)[:, :-4], _table(slim, f))


def _table(arm, field):
    sd = arm.model.state_dict()
    return sd[next(k for k in sd if k.endswith(f".emb_{field}.weight"))].local_shards()[0].tensor


def test_the_daemon_and_the_cron_job_search_with_adass(tmp_path, monkeypatch):
    """`dimstream run --search adass` re-shapes the slim arm within the budget and saves the
    supernet; `dimstream search --method adass` searches that supernet and its plan is applied.
    Width 8 (sizes 0, 4, 8) keeps the 100 search steps short."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = [a if a != "none" else "adass" for a in RUN] + ["--control-dim", "8"]
    run[run.index("--search-every") + 1] = "1"
    _cli(run + ["--state-dir", str(tmp_path), "--windows", "1", "--rows-per-window", "1500"])
    s = _summary(tmp_path)
    w = s["windows"][0]
    assert w["search"]["method"] == "adass" and w["reallocation"]["method"] == "adass"
    assert 0.4 < w["supernet"]["auc"] < 1 and "supernet" not in w["arms"]
    # the arms' figures are from before the window's search; the re-shape's after it
    assert w["reallocation"]["embedding_params"] <= 0.25 * w["arms"]["control"]["embedding_params"]
    assert all(d % 4 == 0 for d in w["reallocation"]["dims"].values())
    assert (tmp_path / "supernet.pt").exists()
    r = _cli(["search", "--state-dir", str(tmp_path), "--method", "adass", "--rows", "1500"])
    assert "adass" in r.stdout
    plan = json.loads((tmp_path / "plans" / "pending.json").read_text())
    assert plan["method"] == "adass" and plan["budget_reached"] <= plan["budget_asked"]
    assert all(d % 4 == 0 for d in plan["dims"].values())
    stay = [a if a != "adass" else "none" for a in run]
    _cli(stay + ["--state-dir", str(tmp_path), "--windows", "2", "--rows-per-window", "1500"])
    assert (tmp_path / "plans" / "applied" / "000001.json").exists() or (
        tmp_path / "plans" / "kept" / "000001.json"
    ).exists()


assert CLI  # imported with RUN for the daemon test


def _one_class_window(runner, n=512):
    """A window whose rows are all of label 0 (a quiet day of a small table), the control
    trained on them."""
    from types import SimpleNamespace

    batch = _rows(n)
    batch = batch.take(batch.labels == 0)
    for s in range(0, len(batch), 64):
        runner.arm("control").train_step(batch.slice(s, min(s + 64, len(batch))))
    return SimpleNamespace(batch=batch)


def test_held_out_rows_of_one_class_are_said_and_the_daemon_owes_the_search(trained, tmp_path):
    """The reward is the held-out rows' AUC, undefined when they hold one class: the rewards
    were NaN, P became NaN and torch.multinomial raised, which killed the daemon (seen on
    ml-100k in the frontier) and again on every restart. Now the search says why at once, and
    the daemon owes a due search to the next window it can search."""
    from dimstream.ops.searching import DaemonSearch
    from tests.test_search_daemon import _Runner

    control, net, rows = trained
    zeros = rows.take(rows.labels == 0)
    with pytest.raises(ValueError, match=r"held-out rows are all of label 0, so the reward \(their AUC\)"):
        adass_search(control, zeros, Budget("params", 0.25), supernet=net, steps=2)
    method = registry.build("adass")
    assert "all of label 0" in method.unfit(zeros) and method.unfit(rows) is None
    assert method.unfit(rows.slice(0, 1)) == "1 rows, adass needs at least 2"

    runner = _Runner(tmp_path, search="adass", search_every=1, realloc_min_gain=0.0)
    search = DaemonSearch(runner)
    search.method.rl["steps"] = 5
    record = _record(0)
    search.after_training(_one_class_window(runner), record)
    assert record.search is None and record.search_failed is None and search._owed
    assert record.search_skipped.endswith("in the window: it runs at the next window that can be searched")
    assert record.supernet["rows"] > 0  # the supernet still trained on the window
    record = _record(1)
    search.after_training(_window(runner, seed=1), record)
    assert record.search["method"] == "adass" and record.search_skipped is None and not search._owed


def test_a_search_that_raises_is_recorded_and_counted_and_the_arms_stay(tmp_path, monkeypatch):
    """Whatever a search raises, training goes on: one failed hourly search must not stop the
    daemon (and every restart). The record and the log say why, a counter moves, and the next
    due search runs again."""
    from dimstream.ops.searching import DaemonSearch
    from dimstream.search.registry import METHODS, SearchMethod
    from tests.test_search_daemon import _Runner

    class Broken(SearchMethod):
        name = "broken"
        calls = 0

        def __init__(self, rows: int | None = None):
            pass

        def run(self, control, rows, budget, *, field_check=None):
            Broken.calls += 1
            raise RuntimeError("invalid multinomial distribution")

    monkeypatch.setitem(METHODS, "broken", Broken)
    runner = _Runner(tmp_path, search="broken", search_every=1)
    search = DaemonSearch(runner)
    before = {n: dict(runner.arm(n).spec.dims) for n in ("control", "slim")}
    for i in range(2):
        record = _record(i)
        search.after_training(_window(runner, seed=i), record)
        assert record.search_failed == "RuntimeError: invalid multinomial distribution" and record.search is None
        assert "search_failed" in record.to_dict() and record.reallocation is None
    assert Broken.calls == 2 and runner.metrics.search_failures.labels("broken")._value.get() == 2
    assert {n: runner.arm(n).spec.dims for n in ("control", "slim")} == before
