"""The A/B verdict (ops/verdict.py) and the main job that prints it: `dimstream run`, no --arms."""

import json
import math
import subprocess
import sys

import pytest

from dimstream.ops.verdict import format_verdict, pooled_difference, spearman, verdict
from tests.helpers import REPO


def _window(i, rows, slim_diff, se):
    half = 1.959964 * se
    ctl = {"auc": 0.75, "logloss": 0.20, "ctr_pred": 0.06, "ctr_obs": 0.05, "embedding_params": 1000}
    ctl["dims"] = {"a": 16, "b": 16, "noise": 16}
    slim = {
        "auc": 0.75 + slim_diff,
        "logloss": 0.19,
        "ctr_pred": 0.05,
        "ctr_obs": 0.05,
        "embedding_params": 200,
        "dims": {"a": 12, "b": 4, "noise": 0},
        "auc_diff_vs_control": {"diff": slim_diff, "ci_low": slim_diff - half, "ci_high": slim_diff + half},
    }
    return {"index": i, "rows": rows, "arms": {"control": ctl, "slim": slim}}


def test_the_verdict_pools_the_second_half_weighted_by_rows():
    # the first half (windows 0, 1) differs wildly and must not count; window 2 has 3x the rows of 3
    windows = [_window(0, 100, -0.5, 0.1), _window(1, 100, -0.5, 0.1)]
    windows += [_window(2, 3000, 0.004, 0.002), _window(3, 1000, 0.008, 0.004)]
    v = verdict({"windows": windows, "truth": {"field_rank": {"a": 5, "b": 2, "noise": 0}}})
    assert v["windows"] == [2, 3]
    d = v["arms"]["slim"]["auc_diff"]
    assert d["diff"] == pytest.approx(0.75 * 0.004 + 0.25 * 0.008)
    se = math.sqrt((0.75 * 0.002) ** 2 + (0.25 * 0.004) ** 2)
    assert d["ci_high"] - d["ci_low"] == pytest.approx(2 * 1.959964 * se)
    ctl = v["arms"]["control"]
    assert ctl["calibration"] == pytest.approx(1.2) and ctl["rows"] == 4000 and "auc_diff" not in ctl
    assert v["arms"]["slim"]["params_share"] == pytest.approx(0.2)
    assert v["allocation"]["widest"][0] == ("a", 12) and v["allocation"]["pruned"] == ["noise"]
    assert v["truth"]["spearman"] == pytest.approx(1.0) and v["truth"]["noise_pruned"] == [1, 1]
    text = format_verdict(v)
    assert "slim: better than control at 20.0%" in text
    assert "noise fields pruned 1 of 1" in text and "pruned 1 of 3: noise" in text


def test_the_verdict_counts_searches_skipped_and_failed_over_the_whole_stream():
    """A slim arm whose searches were skipped or failed may hold a stale allocation: the verdict
    says so, with the last error, counting the first half too (a search is due there)."""
    windows = [_window(i, 1000, 0.001, 0.001) for i in range(4)]
    windows[0]["search"] = windows[3]["search"] = {"method": "adass"}
    windows[1]["search_skipped"] = "its 3 held-out rows are all of label 0 ..."
    windows[2]["search_failed"] = "RuntimeError: invalid multinomial distribution"
    v = verdict({"windows": windows})
    assert v["searches"] == {
        "run": 2,
        "skipped": 1,
        "failed": 1,
        "last_failure": "RuntimeError: invalid multinomial distribution",
    }
    text = format_verdict(v)
    assert "searches: 2 run, 1 skipped (owed to a later window), 1 failed (last: RuntimeError: invalid" in text
    assert "searches" not in verdict({"windows": [_window(i, 1000, 0.0, 0.001) for i in range(2)]})


def test_pooled_difference_ignores_windows_without_an_interval():
    nan = {"diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    d = pooled_difference([nan, {"diff": 0.01, "ci_low": 0.0, "ci_high": 0.02}], [50, 50])
    assert d["diff"] == pytest.approx(0.01) and d["ci_low"] == pytest.approx(0.0)
    assert math.isnan(pooled_difference([nan], [10])["diff"])


def test_spearman_averages_tied_ranks():
    # ranks of x: 1, 2.5, 2.5, 4 against y's 1, 2, 3, 4: r = 0.9486833
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(spearman([4, 4, 4], [1, 2, 3]))


def test_the_main_job_runs_the_three_arms_with_the_default_search_and_prints_the_verdict(tmp_path):
    args = ["run", "--state-dir", str(tmp_path), "--windows", "4", "--rows-per-window", "3000", "--model", "fm"]
    args += ["--metrics-addr", "127.0.0.1:0", "--no-progress"]
    r = subprocess.run(
        [sys.executable, "-m", "dimstream.ops.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert all(set(w["arms"]) == {"control", "slim", "uniform"} for w in s["windows"])
    assert {w["search"]["method"] for w in s["windows"] if "search" in w} == {"sseds"}
    out = r.stdout
    assert "dimstream verdict: windows 2-3 (second half of the stream, 6,000 rows), fm on synthetic" in out
    for arm in ("control", "slim", "uniform"):
        assert any(line.startswith(f"{arm} ") for line in out.splitlines()), out
    assert "against the true field ranks: Spearman" in out and "slim allocation: widest" in out
    page = tmp_path / "report" / "index.html"
    assert f"dimstream report: {page}" in out
    assert "<h2>Verdict</h2>" in page.read_text() and (tmp_path / "report" / "auc_diff.png").exists()
