"""The allocation policy: moving average of the searches' scores, the gain gate, the averaged
field check, and its state across a restart (search/policy.py)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from dimstream.search.fieldcheck import FieldCheck
from dimstream.search.policy import AllocationPolicy

ROWS = {"a": 10, "b": 10}
CONTROL = {"a": 8, "b": 8}
FULL = {"a": list(range(8)), "b": list(range(8))}  # a control-sized slim arm: over any kappa < 1


def proposal(a, b, method="m", dims=None, kept=None):
    return SimpleNamespace(
        method=method, saliency={"a": list(a), "b": list(b)}, dims=dims or {}, kept_columns=kept or {}
    )


def test_the_moving_average_keeps_one_contrary_shot_from_flipping_the_allocation():
    p = AllocationPolicy(kappa=0.5, decay=0.5, min_gain=0.05)
    first = p.decide(proposal([1.0] * 8, [0.0] * 8), CONTROL, ROWS, FULL)
    assert first.reshape and first.reason == "over budget"
    assert first.dims == {"a": 8, "b": 0} and first.kept_columns == {"a": list(range(8)), "b": []}
    slim = first.kept_columns
    second = p.decide(proposal([0.0] * 8, [0.8] * 8), CONTROL, ROWS, slim)
    # s = 0.5 * s + 0.5 * s_new: a 0.5, b 0.4 per column; a still wins, and the incumbent is it
    state = p.state_dict()["search_scores"]
    assert state == {"method": "m", "scores": {"a": [0.5] * 8, "b": [0.4] * 8}}
    assert second.dims == {"a": 8, "b": 0} and second.gain == 0.0
    assert not second.reshape and second.reason == "no gain"
    # the same contrary shot alone (decay 0) takes the proposal's own allocation, and it wins
    alone = AllocationPolicy(kappa=0.5, decay=0.0, min_gain=0.05)
    own = proposal([0.0] * 8, [0.8] * 8, dims={"a": 0, "b": 8}, kept={"a": [], "b": list(range(8))})
    d = alone.decide(own, CONTROL, ROWS, slim)
    assert d.dims == {"a": 0, "b": 8} and d.gain == float("inf") and d.reshape
    assert d.to_dict() == {"reshape": True, "dims": {"a": 0, "b": 8}, "gain": None, "reason": "gain inf% >= 5.0%"}


def test_the_average_restarts_when_the_method_changes():
    p = AllocationPolicy(kappa=0.5, decay=0.8, min_gain=0.05)
    p.decide(proposal([1.0] * 8, [0.0] * 8, method="m"), CONTROL, ROWS, FULL)
    p.decide(proposal([0.0] * 8, [2.0] * 8, method="other"), CONTROL, ROWS, FULL)
    assert p.state_dict()["search_scores"] == {"method": "other", "scores": {"a": [0.0] * 8, "b": [2.0] * 8}}


def test_the_gate_measures_the_gain_on_the_averaged_scores():
    """gain = (S(new) - S(incumbent)) / S(incumbent), S = sum of the averaged scores of the kept
    columns; re-shape iff gain >= min_gain, or whenever the slim arm is over the budget."""
    score_a, score_b = [1.0] * 4 + [0.0] * 4, [2.0] * 4 + [0.0] * 4
    incumbent = {"a": [0, 1, 2, 3], "b": []}  # 40 params = floor(0.25 * 160): within the budget
    for min_gain, reshape in ((0.25, True), (1.0, True), (1.5, False)):
        p = AllocationPolicy(kappa=0.25, decay=0.5, min_gain=min_gain)
        d = p.decide(proposal(score_a, score_b), CONTROL, ROWS, incumbent)
        assert d.dims == {"a": 0, "b": 4} and d.kept_columns["b"] == [0, 1, 2, 3]
        assert d.gain == pytest.approx((8.0 - 4.0) / 4.0) and d.reshape is reshape
    # over the budget the arm is re-shaped even to a lower score
    p = AllocationPolicy(kappa=0.25, decay=0.5, min_gain=0.05)
    d = p.decide(proposal(score_a, score_b), CONTROL, ROWS, {"a": list(range(8)), "b": [0, 1, 2, 3]})
    assert d.gain == pytest.approx((8.0 - 12.0) / 12.0) and d.reshape and d.reason == "over budget"


def test_fields_the_check_drops_score_zero_for_the_incumbent_too():
    p = AllocationPolicy(kappa=0.25, decay=0.5, min_gain=0.05)
    d = p.decide(proposal([3.0] * 8, [1.0] * 8), CONTROL, ROWS, {"a": [], "b": [0, 1, 2, 3]}, keep={"b": False})
    assert d.dims == {"a": 4, "b": 0}  # a wins anyway; b is out of the allocation
    assert d.gain == float("inf") and d.reshape  # the incumbent's b columns are worth 0
    p = AllocationPolicy(kappa=0.25, decay=0.5, min_gain=0.05)
    d = p.decide(proposal([1.0] * 8, [3.0] * 8), CONTROL, ROWS, {"a": [0, 1, 2, 3], "b": []}, keep={"b": False})
    assert d.dims == {"a": 4, "b": 0} and d.gain == 0.0 and not d.reshape  # b would win, but is dropped


def test_the_methods_floor_applies_to_the_averaged_allocation():
    """HAM keeps a block only if its mean alpha is > 0 (SearchMethod.min_score = 0.0)."""
    alphas = proposal([-0.01] * 8, [0.02] * 4 + [-0.03] * 4)
    floor = AllocationPolicy(kappa=1.0, decay=0.5, min_gain=0.0).decide(alphas, CONTROL, ROWS, FULL, min_score=0.0)
    free = AllocationPolicy(kappa=1.0, decay=0.5, min_gain=0.0).decide(alphas, CONTROL, ROWS, FULL)
    assert floor.dims == {"a": 0, "b": 4} and free.dims == {"a": 8, "b": 8}


def shot(x, y):  # (delta, stderr) per field
    return FieldCheck(
        {"x": x[0], "y": y[0]}, {"x": x[1], "y": y[1]}, {"x": x[0] > 2 * x[1], "y": y[0] > 2 * y[1]}, 2.0, 100, 0.1
    )


def test_field_checks_are_averaged_with_the_variance_of_an_average():
    """delta <- d delta + (1-d) delta_new, var <- d^2 var + (1-d)^2 var_new, keep = delta > z sqrt(var):
    a field that passes once by chance is still dropped; evidence accumulates across windows."""
    p = AllocationPolicy(kappa=0.25, decay=0.5, min_gain=0.05)
    first = p.average_check(shot((0.0, 1.0), (3.0, 1.0)))
    assert first.keep == {"x": False, "y": True} and first.stderr == {"x": 1.0, "y": 1.0}
    second = p.average_check(shot((2.5, 1.0), (1.0, 1.0)))  # x passes alone, y fails alone
    assert second.delta == {"x": 1.25, "y": 2.0}
    assert second.stderr["x"] == pytest.approx(np.sqrt(0.25 + 0.25))  # so the bar is 2 * 0.707
    assert second.keep == {"x": False, "y": True}
    state = p.state_dict()["field_check_avg"]
    assert {k: state[k] for k in ("delta", "var")} == {"delta": {"x": 1.25, "y": 2.0}, "var": {"x": 0.5, "y": 0.5}}
    alone = AllocationPolicy(kappa=0.25, decay=0.0, min_gain=0.05)  # no averaging: the window's own check
    alone.average_check(shot((0.0, 1.0), (3.0, 1.0)))
    assert alone.average_check(shot((2.5, 1.0), (1.0, 1.0))).keep == {"x": True, "y": False}


def test_the_state_survives_a_json_round_trip_and_the_next_decision_is_the_same():
    a = AllocationPolicy(kappa=0.5, decay=0.8, min_gain=0.05)
    a.decide(proposal([0.3, 0.1] * 4, [0.2] * 8), CONTROL, ROWS, FULL)
    a.average_check(shot((0.4, 0.1), (0.1, 0.2)))
    b = AllocationPolicy(kappa=0.5, decay=0.8, min_gain=0.05)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    nxt = proposal([0.0] * 8, [0.6] * 8)
    da, db = (p.decide(nxt, CONTROL, ROWS, {"a": list(range(8)), "b": []}) for p in (a, b))
    assert da == db and da.dims == {"a": 0, "b": 8}  # 0.8 * 0.2 + 0.2 * 0.6 = 0.28 > 0.8 * 0.3 or 0.8 * 0.1
    assert b.state_dict()["search_scores"]["scores"]["b"] == pytest.approx([0.28] * 8)
    assert a.average_check(shot((0.0, 0.1), (0.0, 0.1))) == b.average_check(shot((0.0, 0.1), (0.0, 0.1)))
    # the daemon's earlier checkpoints kept the same two entries in meta["extra"]
    old = {"search_scores": {"method": "m", "scores": {"a": [1.0] * 8, "b": [0.0] * 8}}}
    b.load_state_dict(old)
    assert b.state_dict() == old | {"field_check_avg": None}
    b.load_state_dict(None)
    assert b.state_dict() == {"search_scores": None, "field_check_avg": None}


def test_a_search_on_fewer_rows_moves_the_average_by_its_share_of_decay_rows():
    """d = decay ** (rows / decay_rows): 4 searches of 2,048 rows move the average as far as one
    of 8,192 does (ml-100k's ~470-row days otherwise re-shaped the slim arm on noise)."""
    one = AllocationPolicy(kappa=0.5, decay=0.5, min_gain=0.0, decay_rows=8192)
    four = AllocationPolicy(kappa=0.5, decay=0.5, min_gain=0.0, decay_rows=8192)
    for p in (one, four):
        p.decide(proposal([1.0] * 8, [0.0] * 8), CONTROL, ROWS, FULL)
    one.decide(proposal([0.0] * 8, [1.0] * 8), CONTROL, ROWS, FULL, rows=8192)
    for _ in range(4):
        four.decide(proposal([0.0] * 8, [1.0] * 8), CONTROL, ROWS, FULL, rows=2048)
    a_one = one.state_dict()["search_scores"]["scores"]["a"][0]
    a_four = four.state_dict()["search_scores"]["scores"]["a"][0]
    assert a_one == pytest.approx(0.5) and a_four == pytest.approx(0.5)
    # one small search alone moves it by 1 - 0.5 ** 0.25 (16%), not by half
    small = AllocationPolicy(kappa=0.5, decay=0.5, min_gain=0.0, decay_rows=8192)
    small.decide(proposal([1.0] * 8, [0.0] * 8), CONTROL, ROWS, FULL)
    small.decide(proposal([0.0] * 8, [1.0] * 8), CONTROL, ROWS, FULL, rows=2048)
    assert small.state_dict()["search_scores"]["scores"]["b"][0] == pytest.approx(1 - 0.5**0.25)
    # more rows than decay_rows count as decay_rows; no decay_rows: the decay as given
    big = AllocationPolicy(kappa=0.5, decay=0.5, min_gain=0.0, decay_rows=8192)
    assert big.row_decay(100_000) == 0.5 and AllocationPolicy(0.5, 0.5, 0.0).row_decay(10) == 0.5
