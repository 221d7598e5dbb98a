"""Issue 3's equal-budget acceptance, on the daemon itself (3 seeds; the same runs as
benchmarks/arms.py): the slim arm (SSEDS, kappa 0.25) against the control and against the
uniform arm of equal parameter budget, progressive AUC."""

import pytest

from benchmarks.arms import aggregate, run_seeds
from tests.helpers import ML100K


def _report(agg) -> str:
    return ", ".join(
        f"{a} {agg[a]['auc_mean']:.4f} ({agg[a]['embedding_params_mean']:,.0f} params)"
        for a in ("control", "slim", "uniform")
    )


@pytest.mark.timeout(2400)
def test_slim_matches_control_and_beats_uniform_on_the_synthetic_stream():
    """Windows 13-24, mean over seeds 0-2: slim >= control - 0.003 and slim > uniform."""
    runs = run_seeds("synthetic", range(3), "sseds", 0.25)  # one thread a run, two runs at a time
    agg = aggregate(runs)
    print("synthetic windows 13-24:", _report(agg))
    assert all(r["arms"]["slim"]["embedding_params"] <= 0.25 * r["arms"]["control"]["embedding_params"] for r in runs)
    assert agg["slim"]["auc_mean"] >= agg["control"]["auc_mean"] - 0.003, _report(agg)
    assert agg["slim"]["auc_mean"] > agg["uniform"]["auc_mean"], _report(agg)


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason=f"MovieLens-100k not at {ML100K}")
def test_slim_is_within_0002_of_uniform_on_ml100k():
    """One-day windows, second half, mean over seeds 0-2: slim >= uniform - 0.002."""
    runs = run_seeds("ml-100k", range(3), "sseds", 0.25)
    agg = aggregate(runs)
    print("ml-100k second half:", _report(agg))
    assert all(r["windows"] > 200 for r in runs)
    assert agg["slim"]["auc_mean"] >= agg["uniform"]["auc_mean"] - 0.002, _report(agg)
