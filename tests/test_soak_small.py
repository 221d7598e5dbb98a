"""A short soak (benchmarks/soak.py): a real `dimstream run` over a files: directory, SIGKILLed
at a random moment after a checkpoint and restarted, with a bad input every other window (each
kind once); every window must be in the history once and in order, with the rows expected, and
every bad row in the dead letters once with its reason. The long one (300 windows, 8 kills)
writes benchmarks/results/soak.json."""

import json
import subprocess
import sys

from tests.helpers import REPO


def test_short_soak_with_a_kill_and_every_kind_of_bad_input(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "benchmarks/soak.py", "--windows", "14", "--rows", "40", "--bad-every", "2"]
    cmd += ["--kills", "1", "--max-kill-delay", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["kills"] == 1 and s["starts"] == 2
    assert s["windows_unique_and_contiguous"] and s["window_starts_contiguous"]
    assert s["rows_per_window_as_expected"] and s["rows_trained"] == s["rows_expected"] == 14 * 80 - 6
    assert s["every_bad_row_dead_lettered_once_with_its_reason"] and s["every_corrupt_file_dead_lettered_once"]
    assert s["bad_inputs"] == {
        "nan_label": 1,
        "null_label": 1,
        "label_out_of_range": 1,
        "wrong_type": 1,
        "bad_event_time": 1,
        "late": 1,
        "corrupt_input": 1,
    }
    assert s["dead_letter_rows"] == 6 and s["dead_letter_inputs"] == 1
