"""The re-pruning job and the daemon together: plans applied, bad plans rejected, crashes harmless."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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
    "4000",
    "--metrics-addr",
    "127.0.0.1:0",
    "--no-progress",
    "--model",
    "fm",
]


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
    applied = json.loads((tmp_path / "plans" / "applied" / "000002.json").read_text())
    assert applied["decision"]["reshape"] and applied["decision"]["reason"] == "over budget"
    assert applied["dims"] == plan["dims"]  # the archived plan, with the policy's decision added
    assert not (tmp_path / "plans" / "pending.json").exists()
    s = _summary(tmp_path)
    assert s["windows"][2]["reallocation"]["source"] == "plan"
    assert _slim_dims(tmp_path, 3) == plan["dims"]
    assert set(_slim_dims(tmp_path, 2).values()) == {32}
    assert (
        s["windows"][3]["arms"]["slim"]["embedding_params"]
        <= 0.25 * s["windows"][3]["arms"]["control"]["embedding_params"]
    )
    assert s["reallocations"][0]["window"] == 2


def test_bad_plans_are_rejected_and_the_run_goes_on(tmp_path):
    _cli(RUN + ["--state-dir", str(tmp_path), "--windows", "1"])
    _cli(["search", "--state-dir", str(tmp_path)])
    good = json.loads((tmp_path / "plans" / "pending.json").read_text())
    over = dict(good, dims={f: 32 for f in good["dims"]}, kept_columns={f: list(range(32)) for f in good["dims"]})
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
    p = subprocess.Popen(
        CLI + ["search", "--state-dir", str(tmp_path), "--method", "ham"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
    daemon = subprocess.Popen(
        CLI + RUN + ["--state-dir", str(tmp_path), "--windows", "7"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )
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
    base = [
        "run",
        "--arms",
        "control,slim",
        "--search",
        "sseds",
        "--search-every",
        "1",
        "--rows-per-window",
        "4000",
        "--metrics-addr",
        "127.0.0.1:0",
        "--no-progress",
        "--model",
        "fm",
        "--windows",
        "4",
    ]
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
    _cli(
        [
            "run",
            "--arms",
            "control,slim",
            "--search",
            "sseds",
            "--search-every",
            "1",
            "--rows-per-window",
            "8000",
            "--metrics-addr",
            "127.0.0.1:0",
            "--no-progress",
            "--model",
            "fm",
            "--windows",
            "4",
            "--field-check-rows",
            "8000",
            "--field-check-z",  # one window's own test (not the default pooled one: 4 windows
            "2",  # of 8,000 rows never pool the default 50,000 rows)
            "--field-check-min-rows",
            "0",
            "--realloc-min-gain",
            "0",
            "--saliency-decay",
            "0",
            "--state-dir",
            str(state),
        ]
    )
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


class _Runner:
    """Exactly what DaemonSearch may use of a runner; __slots__: nothing can be set on it."""

    __slots__ = ("cfg", "schema", "state_dir", "metrics", "arms", "multi")

    def __init__(self, state_dir, **cfg):
        from prometheus_client import CollectorRegistry

        from dimstream.models.arm import ArmSpec
        from dimstream.ops.metrics import Metrics
        from tests.helpers import tiny_schema

        self.schema = tiny_schema()
        self.cfg = SimpleNamespace(
            **(
                {
                    "search": "none",
                    "search_every": 0,
                    "search_rows": 8192,
                    "budget": 0.25,
                    "saliency_decay": 0.8,
                    "realloc_min_gain": 0.05,
                    "budget_fill": False,
                    "search_warmup": 0,
                    "field_check_rows": 0,
                    "field_check_z": 2.0,
                    "noise_floor": None,
                    "arms": ("control", "slim"),
                }
                | cfg
            )
        )
        self.state_dir, self.metrics, self.multi = state_dir, Metrics(CollectorRegistry()), {"tags"}
        self.arms = {n: self.build_arm(ArmSpec(n, {f: 16 for f in self.schema.feature_names})) for n in self.cfg.arms}

    def arm(self, name):
        return self.arms[name]

    def replace_arm(self, arm):
        self.arms[arm.name] = arm

    def build_arm(self, spec):
        from dimstream.models.arm import Arm
        from dimstream.models.config import ModelConfig

        return Arm(spec, self.schema.num_embeddings, self.multi, ModelConfig("fm", interaction_dim=16, batch_size=64))


def _window(runner, n=512, seed=0):
    from dimstream.stream.decode import Decoder
    from tests.helpers import tiny_batch

    batch = Decoder(runner.schema).decode(tiny_batch(n, seed)).batch
    for s in range(0, n, 64):
        runner.arm("control").train_step(batch.slice(s, s + 64))
    return SimpleNamespace(batch=batch)


def _record(index):
    from dimstream.ops.record import WindowRecord

    return WindowRecord(index=index, start="2026-01-01T00:00:00Z", end="2026-01-01T01:00:00Z", rows=512)


def _outcomes(runner):
    return {o: runner.metrics.plans.labels(o)._value.get() for o in ("applied", "kept", "rejected")}


def test_a_plan_goes_through_the_policy_applied_kept_or_rejected(tmp_path):
    """DaemonSearch on a runner with nothing but the allowed attributes: a valid plan that beats
    the incumbent is applied and archived with the policy's decision; the same plan again gains
    nothing and is kept out (plans/kept); a plan over the budget is rejected with its reason."""
    from dimstream.ops.searching import DaemonSearch
    from dimstream.search import Plan, registry, write_plan
    from dimstream.search.budget import Budget

    runner = _Runner(tmp_path)
    search = DaemonSearch(runner)
    window = _window(runner)
    result = registry.build("sseds", rows=None).run(runner.arm("control"), window.batch, Budget("params", 0.25))
    plan = Plan.from_result(result, runner.schema.fingerprint(), "ckpt-000001")
    pending = tmp_path / "plans" / "pending.json"
    pending.parent.mkdir()
    write_plan(pending, plan)
    first = _record(2)
    search.after_training(window, first)
    applied = json.loads((tmp_path / "plans" / "applied" / "000002.json").read_text())
    assert applied["decision"] == {
        "reshape": True,
        "dims": plan.dims,
        "gain": applied["decision"]["gain"],
        "reason": "over budget",
    }  # a control-sized slim arm is over any kappa < 1
    assert first.reallocation["source"] == "plan" and first.reallocation["dims"] == plan.dims
    assert runner.arm("slim").dims == plan.dims and not pending.exists()
    write_plan(pending, plan)
    second = _record(3)
    search.after_training(window, second)
    kept = json.loads((tmp_path / "plans" / "kept" / "000003.json").read_text())
    assert kept["decision"]["gain"] == 0.0 and kept["decision"]["reshape"] is False
    assert kept["dims"] == plan.dims and second.reallocation is None and runner.arm("slim").dims == plan.dims
    write_plan(
        pending,
        Plan(
            **(
                plan.__dict__
                | {"dims": {f: 16 for f in plan.dims}, "kept_columns": {f: list(range(16)) for f in plan.dims}}
            )
        ),
    )
    third = _record(4)
    search.after_training(window, third)
    assert third.plan_rejected.startswith("over budget") and (tmp_path / "plans" / "rejected" / "000004.json").exists()
    assert _outcomes(runner) == {"applied": 1.0, "kept": 1.0, "rejected": 1.0}
    assert search.state_dict()["search_scores"]["method"] == "sseds"  # the plans' scores were averaged
    assert not list((tmp_path / "plans").glob(".claimed-*"))


def test_the_daemon_search_checks_fields_searches_and_keeps_its_state(tmp_path):
    """before_training checks fields on the window (before the control trains on it), the
    search after training allocates without the dropped fields, and a fresh DaemonSearch loaded
    with the state_dict decides the next window exactly like the one that ran on."""
    from dimstream.ops.searching import FIELD_CHECK_FILE, DaemonSearch

    runner = _Runner(tmp_path, search="sseds", search_every=1, field_check_rows=256, realloc_min_gain=0.0)
    search = DaemonSearch(runner)
    assert search.method.rows == 8192  # the search_rows knob, offered to the method that takes it
    window = _window(runner)
    record = _record(0)
    search.before_training(window, record)
    assert record.field_check["rows"] == 256 and search.check is not None
    saved = json.loads((tmp_path / FIELD_CHECK_FILE).read_text())
    assert saved["window"] == 0 and saved["keep"] == search.check.keep
    search.after_training(window, record)
    assert record.search["method"] == "sseds" and record.reallocation["source"] == "daemon"
    assert all(record.reallocation["dims"][f] == 0 for f in search.check.dropped)
    twin = DaemonSearch(runner)
    twin.load_state_dict(json.loads(json.dumps(search.state_dict())))
    assert twin.state_dict() == search.state_dict()
    nxt = _window(runner, seed=1)
    a, b = _record(1), _record(1)
    search.before_training(nxt, a)
    twin.before_training(nxt, b)
    same = ("delta", "stderr", "dropped", "this_window")
    assert [a.field_check[k] for k in same] == [b.field_check[k] for k in same]
    assert search.check.keep == twin.check.keep and twin.state_dict() == search.state_dict()


def test_search_warmup_and_budget_fill(tmp_path):
    """--search-warmup 2: no search and no cut in windows 0-1, the first in window 2;
    --budget-fill spends the budget to within 256 parameters (a block of 64 rows), never above it."""
    base = RUN[:4] + ["sseds", "--search-every", "1"] + RUN[7:] + ["--windows", "3"]
    _cli(base + ["--state-dir", str(tmp_path), "--search-warmup", "2", "--budget-fill"])
    ws = _summary(tmp_path)["windows"]
    assert [bool(w.get("search")) for w in ws] == [False, False, True]
    assert [bool(w.get("reallocation")) for w in ws] == [False, False, True]
    limit = int(0.25 * ws[2]["arms"]["control"]["embedding_params"])
    assert limit - 4 * 64 < ws[2]["reallocation"]["embedding_params"] <= limit
