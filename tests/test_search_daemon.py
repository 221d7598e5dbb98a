"""The re-pruning job and the daemon together: plans applied, bad plans rejected, crashes harmless."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO

CLI = [sys.executable, "-m", "dimstream.ops.cli"]
RUN = ["run", "--arms", "control,slim", "--search", "none", "--search-every", "0", "--rows-per-window", "4000",
       "--metrics-addr", "127.0.0.1:0", "--no-progress", "--model", "fm"]


def _cli(args, check=True):
    r = subprocess.run(CLI + args, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _summary(state: Path) -> dict:
    return json.loads((state / "summary.json").read_text())


def _slim_dims(state: Path, window: int) -> dict:
    return _summary(state)["windows"][window]["arms"]["slim"]["dims"]


def test_cron_plan_is_applied_at_the_next_window_boundary(tmp_path):
    _cli(RUN + ["--state-dir", str(tmp_path), "--windows", "2"])
    r = _cli(["search", "--state-dir", str(tmp_path), "--method", "sseds", "--budget", "0.25"])
    assert "pending.json" in r.stdout
    plan = json.loads((tmp_path / "plans" / "pending.json").read_text())
    assert plan["method"] == "sseds" and plan["checkpoint"] == "ckpt-000001"
    assert plan["budget_reached"] <= plan["budget_asked"]
    assert all(d % 4 == 0 for d in plan["dims"].values())
    _cli(RUN + ["--state-dir", str(tmp_path), "--windows", "4"])
    assert (tmp_path / "plans" / "applied" / "000002.json").exists()
    assert not (tmp_path / "plans" / "pending.json").exists()
    s = _summary(tmp_path)
    assert s["windows"][2]["reallocation"]["source"] == "plan"
    assert _slim_dims(tmp_path, 3) == plan["dims"]
    assert set(_slim_dims(tmp_path, 2).values()) == {32}
    assert s["windows"][3]["arms"]["slim"]["embedding_params"] <= 0.25 * s["windows"][3]["arms"]["control"]["embedding_params"]
    assert s["reallocations"][0]["window"] == 2


def test_bad_plans_are_rejected_and_the_run_goes_on(tmp_path):
    _cli(RUN + ["--state-dir", str(tmp_path), "--windows", "1"])
    _cli(["search", "--state-dir", str(tmp_path)])
    good = json.loads((tmp_path / "plans" / "pending.json").read_text())
    over = dict(good, dims={f: 32 for f in good["dims"]},
                kept_columns={f: list(range(32)) for f in good["dims"]})
    other = dict(good, schema_fingerprint="0123456789abcdef")
    bad_plans = ["{ not json", json.dumps(over), json.dumps(other)]
    for i, text in enumerate(bad_plans):
        (tmp_path / "plans" / "pending.json").write_text(text)
        _cli(RUN + ["--state-dir", str(tmp_path), "--windows", str(2 + i)])
        assert (tmp_path / "plans" / "rejected" / f"{1 + i:06d}.json").exists()
    s = _summary(tmp_path)
    reasons = [w.get("plan_rejected", "") for w in s["windows"][1:4]]
    assert "malformed" in reasons[0] or "JSON" in reasons[0], reasons
    assert reasons[1].startswith("over budget") and reasons[2].startswith("another schema")
    assert all(set(w["arms"]["slim"]["dims"].values()) == {32} for w in s["windows"])
    assert [w["index"] for w in s["windows"]] == [0, 1, 2, 3]


def test_killing_the_search_leaves_the_state_dir_valid(tmp_path):
    _cli(RUN + ["--state-dir", str(tmp_path), "--windows", "1"])
    p = subprocess.Popen(CLI + ["search", "--state-dir", str(tmp_path), "--method", "ham"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    pending = tmp_path / "plans" / "pending.json"
    if pending.exists():  # finished before the kill: then it is complete
        json.loads(pending.read_text())
    _cli(RUN + ["--state-dir", str(tmp_path), "--windows", "2"])
    assert [w["index"] for w in _summary(tmp_path)["windows"]] == [0, 1]
    _cli(["search", "--state-dir", str(tmp_path)])  # and the next search works
    assert not list((tmp_path / "plans").glob(".pending.json.*"))


def test_cron_and_daemon_running_at_once(tmp_path):
    _cli(RUN + ["--state-dir", str(tmp_path), "--windows", "1"])
    log = open(tmp_path / "daemon.log", "w+")  # a file, not a pipe: a full pipe would block the daemon
    daemon = subprocess.Popen(CLI + RUN + ["--state-dir", str(tmp_path), "--windows", "7"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=log, text=True)
    searches = 0
    while daemon.poll() is None and searches < 4:
        r = _cli(["search", "--state-dir", str(tmp_path)], check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        searches += 1
    daemon.wait(timeout=600)
    assert daemon.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    s = _summary(tmp_path)
    assert [w["index"] for w in s["windows"]] == list(range(7))
    for f in (tmp_path / "plans").rglob("*.json"):
        json.loads(f.read_text())  # every plan file is whole
    applied = list((tmp_path / "plans" / "applied").glob("*.json"))
    assert applied and not list((tmp_path / "plans").glob(".claimed-*"))


def test_slim_is_reshaped_only_when_the_search_gains_enough(tmp_path):
    """--realloc-min-gain: after the first cut (the control-sized slim arm is over budget) the slim
    arm keeps its columns unless the searched allocation's total saliency beats them by the
    threshold; every search records that gain."""
    base = ["run", "--arms", "control,slim", "--search", "sseds", "--search-every", "1", "--rows-per-window", "4000",
            "--metrics-addr", "127.0.0.1:0", "--no-progress", "--model", "fm", "--windows", "4"]
    _cli(base + ["--state-dir", str(tmp_path / "sticky"), "--realloc-min-gain", "1000"])
    _cli(base + ["--state-dir", str(tmp_path / "eager"), "--realloc-min-gain", "0", "--saliency-decay", "0"])
    sticky, eager = _summary(tmp_path / "sticky")["windows"], _summary(tmp_path / "eager")["windows"]
    assert [bool(w.get("reallocation")) for w in sticky] == [True, False, False, False]
    assert all(w["search"]["gain_over_current"] < 1000 for w in sticky[1:])
    assert all(w["arms"]["slim"]["dims"] == sticky[1]["arms"]["slim"]["dims"] for w in sticky[2:])
    # single shots (no moving average) and no threshold: re-shaped whenever the shot differs
    assert sum(bool(w.get("reallocation")) for w in eager) >= 2
    assert all(w["search"]["gain_over_current"] > 0 for w in eager[1:] if w.get("reallocation"))


def test_the_daemon_checks_fields_on_a_search_window_before_training_on_it(tmp_path):
    """--field-check-rows: before the arms train on a search window, the control's held-out
    field check runs on its rows; the fields it drops get 0 columns in that search's allocation."""
    state = tmp_path / "s"
    _cli(["run", "--arms", "control,slim", "--search", "sseds", "--search-every", "1", "--rows-per-window", "8000",
          "--metrics-addr", "127.0.0.1:0", "--no-progress", "--model", "fm", "--windows", "4",
          "--field-check-rows", "8000", "--realloc-min-gain", "0", "--saliency-decay", "0",
          "--state-dir", str(state)])
    windows = _summary(state)["windows"]
    checks = [w["field_check"] for w in windows]
    assert all(c["rows"] == 8000 and c["z"] == 2.0 for c in checks)
    for c in checks:  # the decision is the stated test on the recorded numbers
        assert c["dropped"] == [f for f in c["delta"] if not c["delta"][f] > 2.0 * c["stderr"][f]]
    used = [(w, c) for w, c in zip(windows, checks) if "ignored" not in c and c["dropped"]]
    assert used, checks  # some window's check dropped fields and was used
    for w, c in used:
        if w.get("reallocation"):
            assert all(w["reallocation"]["dims"][f] == 0 for f in c["dropped"])
    r = _cli(RUN + ["--state-dir", str(tmp_path / "bad"), "--field-check-rows", "1"], check=False)
    assert r.returncode != 0 and "field_check_rows" in r.stderr
    # the cron job cannot check (its rows are trained rows): it uses the daemon's latest check
    saved = json.loads((state / "field_check.json").read_text())
    last = checks[-1]
    assert saved["window"] == 3 and saved["delta"] == last["delta"]
    assert [f for f, k in saved["keep"].items() if not k] == last["dropped"]
    r = _cli(["search", "--state-dir", str(state)])
    plan = json.loads((state / "plans" / "pending.json").read_text())
    assert all(plan["dims"][f] == 0 for f in last["dropped"]) and "dropped by the field check" in r.stdout
    assert plan["field_check"] == {"rows": 8000, "z": 2.0, "dropped": last["dropped"]}
    (state / "field_check.json").write_text('{"delta": {"user_id": 1.0')
    r = _cli(["search", "--state-dir", str(state)], check=False)
    assert r.returncode == 2 and "cannot use the field check" in r.stderr and "--field-check off" in r.stderr
    r = _cli(["search", "--state-dir", str(state), "--field-check", "off"])
    assert "dropped by the field check" not in r.stdout
    assert json.loads((state / "plans" / "pending.json").read_text())["field_check"] is None


def test_searches_are_averaged_and_the_average_is_checkpointed_state():
    from types import SimpleNamespace

    from dimstream.ops.searching import smoothed_allocation
    from dimstream.search.budget import SearchResult

    rows = {"a": 10, "b": 10}
    runner = SimpleNamespace(cfg=SimpleNamespace(saliency_decay=0.5, budget=0.5), extra={},
                             schema=SimpleNamespace(num_embeddings=rows))
    control = SimpleNamespace(dims={"a": 8, "b": 8})

    def result(a, b):
        return SearchResult("sseds", {}, {}, {"a": a, "b": b}, "params", 80, 80, 160, 0.1, 100, 80)

    s1, dims1, _ = smoothed_allocation(runner, result([1.0] * 8, [0.0] * 8), control)
    assert dims1 == {"a": 8, "b": 0}
    # one contrary shot does not flip the allocation: the average still favours a
    s2, dims2, kept2 = smoothed_allocation(runner, result([0.0] * 8, [0.8] * 8), control)
    assert list(s2["a"]) == [0.5] * 8 and list(s2["b"]) == [0.4] * 8
    assert dims2 == {"a": 8, "b": 0} and kept2["a"] == list(range(8))
    assert runner.extra["search_scores"]["scores"]["b"] == [0.4] * 8  # in the checkpoint's meta


def test_field_checks_are_averaged_with_the_variance_of_an_average():
    """delta <- d delta + (1-d) delta_new, var <- d^2 var + (1-d)^2 var_new, keep = delta > z sqrt(var):
    a field that passes once by chance is still dropped; evidence accumulates across windows."""
    from types import SimpleNamespace

    from dimstream.ops.searching import averaged_check
    from dimstream.search.fieldcheck import FieldCheck

    runner = SimpleNamespace(cfg=SimpleNamespace(saliency_decay=0.5), extra={})

    def shot(a, b):  # (delta, stderr) per field
        return FieldCheck({"x": a[0], "y": b[0]}, {"x": a[1], "y": b[1]},
                          {"x": a[0] > 2 * a[1], "y": b[0] > 2 * b[1]}, 2.0, 100, 0.1)

    first = averaged_check(runner, shot((0.0, 1.0), (3.0, 1.0)))
    assert first.keep == {"x": False, "y": True} and first.stderr == {"x": 1.0, "y": 1.0}
    second = averaged_check(runner, shot((2.5, 1.0), (1.0, 1.0)))  # x passes alone, y fails alone
    assert second.delta == {"x": 1.25, "y": 2.0}
    assert second.stderr["x"] == pytest.approx(np.sqrt(0.25 + 0.25))  # 0.707, so the bar is 1.41
    assert second.keep == {"x": False, "y": True}
    assert runner.extra["field_check_avg"]["var"] == {"x": 0.5, "y": 0.5}
    runner.cfg.saliency_decay = 0.0  # no averaging: the window's own check
    assert averaged_check(runner, shot((1.0, 1.0), (3.0, 1.0))).keep == {"x": False, "y": True}
