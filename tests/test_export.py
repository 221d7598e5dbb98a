"""Handing a model to serving: exported predictions equal the trainer's on the same rows."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dimstream.models.arm import ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.ops import checkpoint
from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner
from dimstream.ops.export import export_arm, predict
from tests.helpers import REPO


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_export_round_trip_matches_the_trainer(tmp_path, precision):
    """Under bf16 too: the export records what the heads ran in, and serving scores in it."""
    state = tmp_path / "state"
    cfg = RunConfig(
        model=ModelConfig(precision=precision),
        windows=2,
        rows_per_window=3000,
        state_dir=state,
        metrics_addr="127.0.0.1:0",
        progress=False,
        arms=("control", "slim"),
        search="sseds",
    )
    runner = Runner.from_config(cfg)
    runner.run()
    out = export_arm(state, "slim", tmp_path / "served")
    assert json.loads((out / "model.json").read_text())["precision"] == precision
    rows = runner.source.window_table(5).slice(0, 500)  # rows neither arm has seen
    probs = predict(out, rows.drop_columns(["label", "event_time"]))
    # the trainer's view of the same checkpoint
    meta = checkpoint.read_meta(checkpoint.latest(state))
    spec = next(a for a in meta["arms"] if a["name"] == "slim")
    arm = runner.build_arm(ArmSpec("slim", spec["dims"], spec["column_ids"]))
    checkpoint.load_arm_state(arm, checkpoint.read_tensors(checkpoint.latest(state))["slim"])
    want = arm.predict(runner.decoder.decode(rows).batch)
    assert len(probs) == 500 and np.allclose(probs, want, atol=1e-5)
    assert any(d == 0 for d in spec["dims"].values()) or len(set(spec["dims"].values())) > 1  # really mixed
    # and from the command line, on JSON lines
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps(r) for r in rows.slice(0, 20).drop_columns(["label", "event_time", "p_true"]).to_pylist())
    )
    r = subprocess.run(
        [sys.executable, "-m", "dimstream.ops.cli", "predict", "--model", str(out), "--input", str(jsonl)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = np.array([float(x) for x in r.stdout.split()])
    assert np.allclose(got, want[:20], atol=1e-5)


def test_the_daemon_publishes_every_window_with_an_atomic_latest_pointer(tmp_path):
    cfg = RunConfig(
        arms=("control",),
        windows=2,
        rows_per_window=2000,
        state_dir=tmp_path / "state",
        metrics_addr="127.0.0.1:0",
        progress=False,
        export_dir=tmp_path / "served",
    )
    runner = Runner.from_config(cfg)
    runner.run()
    served = tmp_path / "served"
    assert (served / "latest").read_text().strip() == "window-000001"
    assert (served / "window-000000" / "weights.pt").exists()  # the base: full weights
    delta = __import__("json").loads((served / "window-000001" / "model.json").read_text())
    assert delta["kind"] == "delta" and delta["chain"] == ["window-000000", "window-000001"]
    rows = runner.source.window_table(3).slice(0, 100)
    latest = served / (served / "latest").read_text().strip()
    probs = predict(latest, rows)
    assert probs.shape == (100,) and ((probs > 0) & (probs < 1)).all()
