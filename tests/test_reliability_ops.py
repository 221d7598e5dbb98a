"""Faults found by probing the daemon: a shared state dir, a damaged checkpoint, a read-only
state dir, a hostile plan. Each is refused in one line or survived, never a crash mid-run."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dimstream.models.config import ModelConfig
from dimstream.ops.config import ConfigError, RunConfig
from dimstream.ops.daemon import Runner
from dimstream.ops.history import read_log
from tests.helpers import REPO

CLI = [sys.executable, "-m", "dimstream.ops.cli"]
RUN = [
    "run",
    "--arms",
    "control,slim",
    "--search",
    "none",
    "--search-every",
    "0",
    "--rows-per-window",
    "1000",
    "--control-dim",
    "4",
    "--metrics-addr",
    "127.0.0.1:0",
    "--no-progress",
    "--model",
    "fm",
]


def _cli(args, timeout=300):
    return subprocess.run(CLI + args, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dimstream: error:")]


def _cfg(state, windows, **kw):
    return RunConfig(
        windows=windows,
        rows_per_window=1000,
        control_dim=4,
        model=ModelConfig("fm"),
        metrics_addr="127.0.0.1:0",
        progress=False,
        state_dir=state,
        **({"arms": ("control",)} | kw),
    )


def _run(state, windows, **kw) -> tuple[dict, list[int]]:
    """Run to `windows` windows in-process; (summary, indices of the windows trained now)."""
    runner = Runner.from_config(_cfg(state, windows, **kw))
    trained = []
    runner.observers.append(lambda r, w, rec: trained.append(rec.index))
    return runner.run(), trained


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, level=logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def warnings():
    """WARNING and above of the `dimstream` loggers (the suite runs with -p no:logging)."""
    handler = _Records()
    logger = logging.getLogger("dimstream")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# --- 5. one daemon per state dir -----------------------------------------------------------------


def test_a_second_daemon_refuses_the_state_dir_while_search_export_report_work_beside_it(tmp_path):
    log = open(tmp_path.parent / f"{tmp_path.name}-daemon.log", "w+")
    daemon = subprocess.Popen(
        CLI + RUN + ["--state-dir", str(tmp_path), "--windows", "2", "--linger-seconds", "300"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.time() + 240
        while len(read_log(tmp_path)) < 2:  # both windows done; the daemon lingers, lock held
            assert daemon.poll() is None and time.time() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(0.2)
        second = _cli(RUN + ["--state-dir", str(tmp_path), "--windows", "3"])
        assert second.returncode == 2, second.stderr[-3000:]
        assert _errors(second.stderr) == [
            f"dimstream: error: state dir {tmp_path} in use by pid {daemon.pid} (a running daemon); "
            "stop it or use another --state-dir"
        ], second.stderr[-3000:]
        assert [r["index"] for r in read_log(tmp_path)] == [0, 1]  # the refused one touched nothing
        assert "window 2" not in second.stderr
        # the readers never take the lock
        r = _cli(["search", "--state-dir", str(tmp_path), "--method", "sseds"])
        assert r.returncode == 0 and "ckpt-000001" in r.stdout, r.stderr[-3000:]
        assert json.loads((tmp_path / "plans" / "pending.json").read_text())["checkpoint"] == "ckpt-000001"
        r = _cli(["export", "--state-dir", str(tmp_path), "--arm", "slim", "--out", str(tmp_path / "served")])
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((tmp_path / "served" / "model.json").read_text())["window"] == 1
        r = _cli(["report", "--state-dir", str(tmp_path), "--out", str(tmp_path / "report")])
        assert r.returncode == 0 and (tmp_path / "report").is_dir(), r.stderr[-3000:]
    finally:
        os.kill(daemon.pid, signal.SIGKILL)  # dies holding the lock: the kernel drops it
        daemon.wait(timeout=60)
        log.close()
    # the lock file of the dead daemon stays, with its pid; it blocks nothing
    assert (tmp_path / "daemon.lock").read_text().strip() == str(daemon.pid)
    third = _cli(RUN + ["--state-dir", str(tmp_path), "--windows", "3"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert [r["index"] for r in read_log(tmp_path)] == [0, 1, 2]
    assert (tmp_path / "plans" / "applied" / "000002.json").exists()  # the cron plan made beside it


def test_the_lock_is_held_from_from_config_to_the_end_of_run(tmp_path):
    first = Runner.from_config(_cfg(tmp_path, 1))
    with pytest.raises(ConfigError, match=f"state dir {tmp_path} in use by pid {os.getpid()} "):
        Runner.from_config(_cfg(tmp_path, 2))
    assert first.run()["totals"]["windows"] == 1
    summary, trained = _run(tmp_path, 2)  # released at the end of run
    assert trained == [1] and summary["totals"]["windows"] == 2
    stopped = Runner.from_config(_cfg(tmp_path, 3))
    stopped.close()  # a runner never run gives the state dir back too
    assert _run(tmp_path, 3)[1] == [2]


# --- 6. a damaged newest checkpoint --------------------------------------------------------------


def test_a_truncated_newest_checkpoint_falls_back_to_the_older_one_and_retrains_after_it(tmp_path, warnings):
    first, trained = _run(tmp_path, 3)
    assert trained == [0, 1, 2]
    before = read_log(tmp_path)
    arms = tmp_path / "checkpoints" / "ckpt-000002" / "arms-rank0.pt"
    size = arms.stat().st_size
    with open(arms, "r+b") as f:
        f.truncate(size // 2)
    summary, trained = _run(tmp_path, 4)
    assert trained == [2, 3]  # resumed from ckpt-000001: window 2's rows are read again, not skipped
    log = read_log(tmp_path)
    assert [r["index"] for r in log] == [0, 1, 2, 3]
    assert [w["index"] for w in summary["windows"]] == [0, 1, 2, 3] and summary["totals"]["rows"] == 4000
    again = log[2]
    assert (again["start"], again["end"], again["rows"]) == (before[2]["start"], before[2]["end"], 1000)
    assert again["bayes_auc"] == pytest.approx(before[2]["bayes_auc"], abs=1e-12)  # the very same rows
    skipped = [m for m in warnings.lines() if "ckpt-000002" in m]
    assert len(skipped) == 1 and f"arms-rank0.pt has {size // 2:,} bytes" in skipped[0], warnings.lines()
    # the new window 2 checkpoint replaced the truncated one and is complete
    from dimstream.ops import checkpoint

    assert checkpoint.verify(tmp_path / "checkpoints" / "ckpt-000002") is None
    assert checkpoint.latest(tmp_path).name == "ckpt-000003"


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x80\x00garbage", b"no such checkpoint\n"], ids=["binary", "text"])
def test_garbage_in_latest_falls_back_with_a_warning(tmp_path, warnings, garbage):
    _run(tmp_path, 2)
    (tmp_path / "checkpoints" / "LATEST").write_bytes(garbage)
    summary, trained = _run(tmp_path, 3)
    assert trained == [2] and [r["index"] for r in read_log(tmp_path)] == [0, 1, 2]
    assert summary["totals"]["windows"] == 3
    pointer = [m for m in warnings.lines() if "LATEST" in m]
    assert len(pointer) == 1 and "does not name a checkpoint" in pointer[0], warnings.lines()
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "ckpt-000002"


def test_checkpoints_none_of_which_is_complete_stop_the_start_instead_of_wiping_the_log(tmp_path, warnings):
    _run(tmp_path, 2)
    for c in (tmp_path / "checkpoints").glob("ckpt-*"):
        (c / "complete-rank0.json").unlink()
    with pytest.raises(ConfigError, match="holds checkpoints .*ckpt-000001.*ckpt-000000.* but none is complete"):
        Runner.from_config(_cfg(tmp_path, 3))
    assert [r["index"] for r in read_log(tmp_path)] == [0, 1]  # untouched
    assert len([m for m in warnings.lines() if "no completion marker" in m]) == 2
    _run(tmp_path / "fresh", 1)  # and the refused start released its lock on the way out
    assert Runner.from_config(_cfg(tmp_path / "fresh", 1)).close() is None


# --- 7. a state dir that cannot be written -------------------------------------------------------


def test_a_state_dir_under_a_regular_file_is_refused_in_one_line_before_training(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    state = tmp_path / "afile" / "state"
    t0 = time.monotonic()
    r = _cli(RUN + ["--state-dir", str(state), "--windows", "1"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert _errors(r.stderr) == [f"dimstream: error: state dir {state} is not writable: Not a directory"]
    assert "Traceback" not in r.stderr and "window 0" not in r.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o500 directory regardless")
def test_a_read_only_state_dir_is_refused_in_one_line_before_training(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o500)
    try:
        r = _cli(RUN + ["--state-dir", str(state), "--windows", "1"])
    finally:
        state.chmod(0o700)
    assert r.returncode == 2, r.stderr[-3000:]
    assert _errors(r.stderr) == [f"dimstream: error: state dir {state} is not writable: Permission denied"]
    assert not list(state.iterdir())


def test_the_writable_check_leaves_nothing_behind_and_creates_a_missing_dir(tmp_path):
    from dimstream.ops.daemon import check_writable

    check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


# --- 8. hostile plans ----------------------------------------------------------------------------


def _slim_run(state, windows):
    return _run(state, windows, arms=("control", "slim"), search="none", search_every=0)


def test_a_plan_of_100k_nested_brackets_is_rejected_and_archived_and_the_daemon_goes_on(tmp_path):
    _slim_run(tmp_path, 1)
    plans = tmp_path / "plans"
    hostile = b"[" * 100_000 + b"]" * 100_000
    (plans / "pending.json").write_bytes(hostile)
    summary, trained = _slim_run(tmp_path, 2)
    assert trained == [1] and [r["index"] for r in read_log(tmp_path)] == [0, 1]
    assert (plans / "rejected" / "000001.json").read_bytes() == hostile
    assert not list(plans.glob(".claimed-*")) and not (plans / "pending.json").exists()
    assert summary["windows"][1]["plan_rejected"] == (
        f"malformed: {plans / f'.claimed-{os.getpid()}.json'} nests 100000 deep (at most 32)"
    )
    assert set(summary["windows"][1]["arms"]["slim"]["dims"].values()) == {4}  # allocation unchanged


def test_plans_too_big_or_deep_are_malformed_and_unknown_keys_warn_once(tmp_path, warnings):
    from dimstream.search.plan import MAX_PLAN_BYTES, Plan, PlanError, read_plan, write_plan

    path = tmp_path / "p.json"
    path.write_bytes(b'{"method": "' + b"x" * MAX_PLAN_BYTES + b'"}')
    with pytest.raises(PlanError, match=f"larger than {MAX_PLAN_BYTES:,} bytes") as e:
        read_plan(path)
    assert e.value.reason == "malformed"
    # nesting hidden from the bracket count by brackets in a string: the parser's limit catches it
    path.write_bytes(b'["' + b"]" * 200_000 + b'", ' + b"[" * 100_000 + b"]" * 100_000 + b"]")
    with pytest.raises(PlanError, match="nests too deep to parse") as e:
        read_plan(path)
    assert e.value.reason == "malformed"
    plan = Plan(
        dims={"a": 4},
        kept_columns={"a": [0, 1, 2, 3]},
        saliency={"a": [0.1, 0.2, 0.3, 0.4]},
        method="sseds",
        budget_kind="params",
        budget_asked=10,
        budget_reached=8,
        schema_fingerprint="f",
        checkpoint=None,
        created_at="2026-01-01T00:00:00Z",
        duration_seconds=0.5,
    )
    write_plan(path, plan)
    path.write_text(json.dumps(json.loads(path.read_text()) | {"zeta": 1, "alpha": [2]}))
    assert read_plan(path) == plan
    assert warnings.lines() == [f"plan {path}: ignoring unknown key(s) alpha, zeta"]


def test_a_claim_left_by_a_dead_daemon_is_archived_as_rejected(tmp_path):
    _slim_run(tmp_path, 1)
    plans = tmp_path / "plans"
    (plans / ".claimed-999999.json").write_text("[[[]]]")
    summary, trained = _slim_run(tmp_path, 2)
    assert trained == [1]
    assert (plans / "rejected" / "000001.stale-0.json").read_text() == "[[[]]]"
    assert not list(plans.glob(".claimed-*"))
