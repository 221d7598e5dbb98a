"""`dimstream run` end to end: options, outputs, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dimstream.ops.history import read_log
from tests.helpers import REPO

DIMSTREAM = [sys.executable, "-m", "dimstream.ops.cli"]


def _run(args, **kw):
    return subprocess.run(DIMSTREAM + args, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--model", "xgboost"], "invalid choice"),
        (["run", "--window", "0h"], "bad duration"),
        (["run", "--metrics-addr", "nowhere"], "bad address"),
        (["run", "--arms", "slim"], "must include control"),
        (["run", "--source", "files:/no/such/dir"], "files:/no/such/dir"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(args, message, tmp_path):
    r = _run(args + ["--state-dir", str(tmp_path)])
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("dimstream: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]


def test_bad_config_file_exits_2(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("windows = 3\nmodle = 'fm'\n")
    r = _run(["run", "--config", str(cfg)])
    assert r.returncode == 2 and "unknown config key(s): modle" in r.stderr
    cfg.write_text("windows = [")
    r = _run(["run", "--config", str(cfg)])
    assert r.returncode == 2 and "not valid TOML" in r.stderr


def _summary(state: Path) -> dict:
    return json.loads((state / "summary.json").read_text())


def test_run_writes_summary_plot_and_continues_in_the_same_state_dir(tmp_path):
    base = [
        "run",
        "--arms",
        "control",
        "--state-dir",
        str(tmp_path),
        "--rows-per-window",
        "3000",
        "--metrics-addr",
        "127.0.0.1:0",
        "--model",
        "fm",
        "--no-progress",
    ]
    r = _run(base + ["--windows", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    s = _summary(tmp_path)
    assert [w["index"] for w in s["windows"]] == [0, 1]
    w = s["windows"][1]
    assert w["rows"] == 3000 and w["rejected_rows"] == 0 and 0.5 < w["bayes_auc"] < 1
    arm = w["arms"]["control"]
    assert set(arm) >= {"auc", "logloss", "ctr_pred", "ctr_obs", "embedding_params", "dims", "train_rows_per_s"}
    assert set(arm["dims"].values()) == {16} and arm["embedding_params"] == 16 * sum(
        f["num_embeddings"]
        for f in json.loads((tmp_path / "checkpoints" / "ckpt-000001" / "meta.json").read_text())["schema"]["fields"]
    )
    assert s["truth"]["field_rank"]["noise_flag"] == 0
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    r = _run(base + ["--windows", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [w["index"] for w in _summary(tmp_path)["windows"]] == [0, 1, 2]
    # the history continues unchanged (wall-clock timings aside: they are measured after the checkpoint)
    untimed = lambda ws: [{k: v for k, v in w.items() if not k.endswith("_seconds")} for w in ws]  # noqa: E731
    assert untimed(_summary(tmp_path)["windows"][:2]) == untimed(s["windows"])


def test_sigkill_mid_window_then_resume_trains_every_window_exactly_once(tmp_path):
    state, ref_state = tmp_path / "killed", tmp_path / "reference"
    base = [
        "run",
        "--arms",
        "control",
        "--rows-per-window",
        "20000",
        "--windows",
        "5",
        "--metrics-addr",
        "127.0.0.1:0",
        "--model",
        "fm",
        "--no-progress",
    ]
    ref = _run(base + ["--state-dir", str(ref_state)])
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = subprocess.Popen(
        DIMSTREAM + base + ["--state-dir", str(state)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (state / "checkpoints" / "ckpt-000001").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.4)  # into window 2's training
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(_summary(state)["windows"])
    assert 2 <= done < 5
    r = _run(base + ["--state-dir", str(state)])
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = _summary(state)["windows"], _summary(ref_state)["windows"]
    assert [w["index"] for w in got] == [0, 1, 2, 3, 4]
    assert [w["index"] for w in read_log(state)] == [0, 1, 2, 3, 4]  # the log too: each window once
    assert [w["rows"] for w in got] == [20000] * 5
    # the same model state as an uninterrupted run: nothing lost, nothing trained twice
    for g, w in zip(got, want):
        assert g["arms"]["control"]["auc"] == pytest.approx(w["arms"]["control"]["auc"], abs=2e-4)
        assert g["arms"]["control"]["logloss"] == pytest.approx(w["arms"]["control"]["logloss"], abs=2e-4)


def test_sigterm_mid_window_exits_0_within_the_grace_period_and_resumes(tmp_path):
    state = tmp_path / "state"
    base = [
        "run",
        "--arms",
        "control",
        "--rows-per-window",
        "20000",
        "--windows",
        "4",
        "--metrics-addr",
        "127.0.0.1:0",
        "--model",
        "fm",
        "--no-progress",
        "--state-dir",
        str(state),
        "--grace-seconds",
        "0.5",
    ]
    log = open(tmp_path / "stderr.log", "w+")  # a file, not a pipe: a full pipe would block the daemon
    proc = subprocess.Popen(DIMSTREAM + base, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.time() + 300
    while not (state / "checkpoints" / "ckpt-000000").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # into window 1's training
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert time.time() - t0 < 10
    assert "SIGTERM" in err
    done = [w["index"] for w in _summary(state)["windows"]]
    assert done == list(range(len(done))) and 1 <= len(done) < 4  # whole windows only, never half-saved
    r = _run(base)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [w["index"] for w in _summary(state)["windows"]] == [0, 1, 2, 3]
    assert [w["rows"] for w in _summary(state)["windows"]] == [20000] * 4


def test_a_state_dir_resumes_under_another_precision_but_not_other_model_settings(tmp_path, caplog):
    """A state dir of the fp32 default (sessions before `auto`) resumes under `auto`: the
    precision is how the heads compute, the state is fp32 either way. Any other model setting
    still refuses, naming it."""
    import dataclasses

    from dimstream.models.config import ModelConfig
    from dimstream.ops.config import ConfigError, RunConfig
    from dimstream.ops.daemon import Runner

    base = dict(rows_per_window=1000, state_dir=tmp_path, metrics_addr="127.0.0.1:0", progress=False)
    base |= dict(arms=("control",), search="none")
    Runner.from_config(RunConfig(windows=1, model=ModelConfig(precision="fp32"), **base)).run()
    cfg = RunConfig(windows=2, model=ModelConfig(precision="auto"), **base)
    with caplog.at_level("INFO", logger="dimstream"):
        runner = Runner.from_config(cfg)
    assert "trained at precision fp32; this run continues at auto" in caplog.text
    assert runner.arm("control").config.precision == "auto"
    summary = runner.run()
    assert [w["index"] for w in summary["windows"]] == [0, 1]
    other = dataclasses.replace(cfg, windows=3, model=ModelConfig(precision="auto", mlp=(32,)))
    with pytest.raises(ConfigError, match=r"other settings: mlp \[256, 128\] \(this run: \[32\]\)"):
        Runner.from_config(other)
