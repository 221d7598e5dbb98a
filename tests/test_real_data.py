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
