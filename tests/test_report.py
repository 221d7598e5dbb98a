"""`dimstream report`: an HTML page whose plots exist and show every arm."""

import json
import subprocess
import sys

from tests.helpers import REPO


def _summary(n=6):
    arms = {}
    windows = []
    for i in range(n):
        arms = {
            "control": {
                "auc": 0.7 + i / 100,
                "logloss": 0.2,
                "embedding_params": 1000,
                "train_rows_per_s": 5e4,
                "dims": {"a": 32, "b": 32},
            },
            "slim": {
                "auc": 0.69 + i / 100,
                "logloss": 0.21,
                "embedding_params": 250,
                "train_rows_per_s": 6e4,
                "dims": {"a": 8 + 4 * (i % 2), "b": 0},
                "auc_diff_vs_control": {"diff": -0.01, "ci_low": -0.02, "ci_high": 0.0},
            },
        }
        windows.append({"index": i, "arms": arms, "search": {"seconds": 0.1 * (i + 1)}})
    return {"source": "synthetic", "model": "deepfm", "windows": windows}


def test_report_writes_html_and_pngs(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(_summary()))
    r = subprocess.run(
        [sys.executable, "-m", "dimstream.ops.cli", "report", "--state-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    html = (tmp_path / "report" / "index.html").read_text()
    pngs = ["auc_logloss.png", "auc_diff.png", "params.png", "allocation.png", "search_throughput.png"]
    for png in pngs:
        assert f"src='{png}'" in html
        assert (tmp_path / "report" / png).stat().st_size > 5000
    assert "<td>slim</td><td>0.7400</td>" in html and "-0.0100 [-0.0200, +0.0000]" in html


def test_report_without_a_summary_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dimstream.ops.cli", "report", "--state-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "cannot read" in r.stderr
