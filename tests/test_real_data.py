"""Real data: DeepFM on MovieLens-100k in one-day windows (new users keep arriving)."""

import numpy as np
import pytest

from dimstream.models.config import ModelConfig
from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner
from dimstream.ops.history import read_log
from tests.helpers import ML100K


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason=f"MovieLens-100k not at {ML100K}")
def test_deepfm_on_ml100k_reaches_064_auc_over_the_second_half(tmp_path):
    cfg = RunConfig(
        arms=("control",),
        source=f"ml-100k:{ML100K}",
        window_seconds=86400,
        windows=10_000,
        state_dir=tmp_path,
        metrics_addr="127.0.0.1:0",
        progress=False,
        model=ModelConfig("deepfm"),
    )
    Runner.from_config(cfg).run()
    windows = read_log(tmp_path)  # every day (summary.json holds a bounded recent span)
    assert sum(w["rows"] for w in windows) == 100_000  # every rating trained once
    half = windows[len(windows) // 2 :]
    rows = np.array([w["rows"] for w in half], float)
    auc = np.array([w["arms"]["control"]["auc"] for w in half])
    ok = ~np.isnan(auc)  # a day with one class has no AUC
    weighted = float((auc[ok] * rows[ok]).sum() / rows[ok].sum())
    print(f"ml-100k DeepFM progressive AUC, second half (row-weighted): {weighted:.4f}")
    assert weighted >= 0.64


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason=f"MovieLens-100k not at {ML100K}")
def test_a_due_search_on_a_day_of_one_row_waits_for_the_next_day(tmp_path, capsys):
    """Day 45 of ml-100k holds one rating: HAM cannot hold a row out of it. The daemon used to
    die there (ValueError from ham_search, and again on every restart); now the search is owed
    to the next day, across a restart, and the record says why it did not run. The cron job
    on those recent rows says what is wrong instead of a traceback."""
    from dimstream.ops.cli import main
    from dimstream.search import registry

    def run(windows):
        cfg = RunConfig(
            arms=("control", "slim"),
            source=f"ml-100k:{ML100K}",
            window_seconds=86400,
            windows=windows,
            search="ham",
            search_every=46,  # due at window 45 only
            state_dir=tmp_path,
            metrics_addr="127.0.0.1:0",
            progress=False,
            model=ModelConfig("fm"),
        )
        runner = Runner.from_config(cfg)
        runner.search.method = registry.build("ham", steps=10)
        runner.run()
        return read_log(tmp_path)

    windows = run(46)  # stops after day 45
    assert len(windows) == 46 and windows[45]["rows"] == 1 and "search" not in windows[45]
    assert windows[45]["search_skipped"].startswith("1 rows, ham needs at least 2 in the window")
    assert main(["search", "--state-dir", str(tmp_path), "--method", "ham"]) == 2
    assert "cannot be searched: 1 rows, ham needs at least 2" in capsys.readouterr().err
    windows = run(47)  # resumed: the owed search runs on day 46
    assert windows[46]["search"]["method"] == "ham" and "search_skipped" not in windows[46]
    assert not any("search" in w for w in windows[:46])
