"""Delta publication and `dimstream serve`: base + deltas replay the trainer exactly, `latest`
only ever names a complete version, and the server hot-reloads without failing a request."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pytest
import torch

from dimstream.models.serving import ServingModel
from dimstream.ops import export
from dimstream.ops.committer import Committer
from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner
from tests.helpers import REPO


def _config(tmp_path, **kw):
    base = dict(windows=1, rows_per_window=1500, state_dir=tmp_path / "state", metrics_addr="127.0.0.1:0")
    return RunConfig(**(base | dict(progress=False, export_dir=tmp_path / "served") | kw))


def _kind(version_dir):
    return json.loads((version_dir / "model.json").read_text())["kind"]


def test_base_plus_deltas_give_the_trainers_predictions_for_five_windows(tmp_path, monkeypatch):
    cfg = _config(tmp_path, windows=5, arms=("control", "slim"), search="sseds", realloc_min_gain=0.0)
    runner = Runner.from_config(cfg)
    rows = runner.source.window_table(9).slice(0, 300)  # a fixed batch no window trains on
    batch = runner.decoder.decode(rows).batch
    want, publish = {}, Committer._publish

    def recording(self, index, arm, meta, weights):  # the trainer's predictions as published
        publish(self, index, arm, meta, weights)
        want[index] = (arm.predict(batch), dict(arm.dims))

    monkeypatch.setattr(Committer, "_publish", recording)
    runner.run()
    served = tmp_path / "served"
    assert sorted(want) == [0, 1, 2, 3, 4]
    kinds = []
    for i, (probs, dims) in want.items():
        version = served / f"window-{i:06d}"
        got = ServingModel.load(version)(batch).numpy()
        assert np.abs(got - probs).max() < 1e-6, i
        kinds.append(_kind(version))
        if i and dims != want[i - 1][1]:  # the slim arm was re-shaped: a delta cannot say that
            assert kinds[-1] == "base", i
    reshaped = [i for i in want if i and want[i][1] != want[i - 1][1]]
    assert reshaped and all(kinds[i] == "base" for i in reshaped)  # re-allocation forced a base
    assert kinds[0] == "base" and "delta" in kinds
    delta = next(served / f"window-{i:06d}" for i in want if kinds[i] == "delta")
    assert (delta / "rows.safetensors").exists() and (delta / "dense.safetensors").exists()
    assert not (delta / "weights.pt").exists()  # a delta holds only what changed


def test_a_crash_during_publication_leaves_latest_at_a_complete_version(tmp_path, monkeypatch):
    cfg = _config(tmp_path, windows=3, arms=("control",), base_every=2)
    runner = Runner.from_config(cfg)
    real = export._replace_dir
    calls = []

    def crash_on_second_version(tmp, out, header):
        calls.append(out.name)
        if len(calls) == 2:  # window 1's files are written, it is not yet named
            raise OSError("disk gone (injected)")
        real(tmp, out, header)

    monkeypatch.setattr(export, "_replace_dir", crash_on_second_version)
    with pytest.raises(OSError, match="injected"):
        runner.run()
    served = tmp_path / "served"
    assert (served / "latest").read_text().strip() == "window-000000"
    rows = runner.source.window_table(9).slice(0, 50)
    assert ServingModel.load(served / "window-000000")(runner.decoder.decode(rows).batch).shape == (50,)
    assert not (served / "window-000001").exists() and list(served.glob(".window-000001.*"))  # unnamed
    # the daemon resumes (window 1 again, from its checkpoint or not): a fresh publisher starts with a base
    monkeypatch.setattr(export, "_replace_dir", real)
    Runner.from_config(cfg).run()
    latest = (served / "latest").read_text().strip()
    assert latest == "window-000002" and ServingModel.load(served / latest).version == latest
    assert not list(served.glob(".window-*"))  # the restarted publisher removed the leftovers


def test_publisher_forces_a_base_when_the_allocation_changes(tmp_path):
    """Re-allocation keeps dims but moves kept columns (column_ids): the rows all change meaning."""

    class Arm:  # what Publisher reads of an arm: its name and allocation
        name, dims = "slim", {"a": 4}

    pub = export.Publisher(tmp_path, base_every=24)
    w = {"emb_a": torch.zeros(3, 4), "head.b": torch.zeros(2)}
    meta = {"history_length": 1, "schema": {}, "model": {}, "arms": [{"name": "slim", "column_ids": {"a": [0]}}]}
    pub.publish(0, Arm, meta, w)
    w["emb_a"][1] += 1
    pub.publish(1, Arm, meta | {"history_length": 2}, w)
    meta2 = meta | {"history_length": 3, "arms": [{"name": "slim", "column_ids": {"a": [1]}}]}
    pub.publish(2, Arm, meta2, w)
    assert [_kind(tmp_path / f"window-{i:06d}") for i in range(3)] == ["base", "delta", "base"]
    assert json.loads((tmp_path / "window-000001" / "model.json").read_text())["tables"] == {"emb_a": 1}


# --- the server ---


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, ctype="application/json"):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


def _wait(pred, seconds, what):
    end = time.time() + seconds
    while time.time() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class _Client(threading.Thread):
    """Posts the same rows in a loop until stopped; keeps every answer."""

    def __init__(self, url, body):
        super().__init__(daemon=True)
        self.url, self.body, self.stop, self.answers = url, body, threading.Event(), []

    def run(self):
        while not self.stop.is_set():
            try:
                self.answers.append(_post(self.url, self.body))
            except OSError as e:  # a refused or dropped connection is a failed request too
                self.answers.append((None, {"error": str(e)}))


def test_serve_hot_reloads_three_versions_without_a_failed_request(tmp_path):
    cfg = _config(tmp_path, arms=("control",))
    first = Runner.from_config(cfg)
    first.run()  # window 0: the base the server starts on
    port = _free_port()
    block_torchrec = "import sys; sys.modules['torchrec'] = None; from dimstream.ops.cli import main; sys.exit(main())"
    argv = ["serve", "--export-dir", str(tmp_path / "served"), "--addr", f"127.0.0.1:{port}"]
    server = subprocess.Popen(
        [sys.executable, "-c", block_torchrec, *argv, "--poll-seconds", "0.2", "--max-body-bytes", "400000"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _get(url + "/readyz")[0] == 200, 120, "/readyz")
        schema = first.schema
        rows = first.source.window_table(9).slice(0, 64)  # label, event_time, p_true: ignored
        body = json.dumps(rows.to_pylist()).encode()
        client = _Client(url + "/predict", body)
        client.start()
        runner = Runner.from_config(_config(tmp_path, arms=("control",), base_every=3, windows=4))
        runner.run()  # windows 1 (a base: a restarted daemon holds nothing to diff), 2 and 3 (deltas)
        _wait(lambda: client.answers and client.answers[-1][1].get("model_version") == "window-000003", 60, "v3")
        time.sleep(0.3)
        client.stop.set()
        client.join(60)
        assert client.answers and all(code == 200 for code, _ in client.answers), [
            a for a in client.answers if a[0] != 200
        ][:3]
        versions = [a["model_version"] for _, a in client.answers]
        assert versions == sorted(versions) and len(set(versions)) >= 2  # it advanced, never went back
        batch = runner.decoder.decode(rows).batch
        want = runner.arm("control").predict(batch)
        assert np.abs(np.array(client.answers[-1][1]["predictions"]) - want).max() < 1e-6
        # Arrow IPC gives the same; a missing field scores as a null id does in training
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema) as w:
            w.write_table(rows)
        code, arrow = _post(url + "/predict", sink.getvalue().to_pybytes(), "application/vnd.apache.arrow.stream")
        assert code == 200 and np.abs(np.array(arrow["predictions"]) - want).max() < 1e-6
        field = schema.fields[0].source_column
        nulled = rows.set_column(rows.column_names.index(field), field, pa.nulls(64, rows.schema.field(field).type))
        code, missing = _post(url + "/predict", json.dumps(rows.drop_columns([field]).to_pylist()).encode())
        null_want = runner.arm("control").predict(runner.decoder.decode(nulled).batch)
        assert code == 200 and np.abs(np.array(missing["predictions"]) - null_want).max() < 1e-6
        assert not np.allclose(null_want, want)
        # bad requests: 4xx with a reason, and the server keeps serving
        bad = {
            b"not json": 400,
            b'{"a": 1}': 400,
            json.dumps([{field: {"x": 1}}]).encode(): 400,
            json.dumps([{field: 1}, {field: "two"}]).encode(): 400,
            b"[" + b"{}," * 200_000 + b"{}]": 413,
        }
        for payload, want_code in bad.items():
            code, answer = _post(url + "/predict", payload)
            assert code == want_code and answer["error"], (payload[:40], code, answer)
        assert _post(url + "/predict", body)[0] == 200
        _, metrics = _get(url + "/metrics")
        assert 'dimstream_serve_request_seconds_bucket{code="200"' in metrics
        assert "dimstream_serve_model_window 3.0" in metrics
        assert 'dimstream_serve_reloads_total{kind="delta"}' in metrics  # deltas applied beside the served model
        lag = float(
            next(x for x in metrics.splitlines() if x.startswith("dimstream_serve_model_lag_seconds ")).split()[1]
        )
        assert 0 <= lag < 300
    finally:
        server.terminate()
        out = server.communicate(timeout=30)[0].decode()
    assert "Traceback" not in out, out[-3000:]


def test_sigkill_at_random_moments_leaves_latest_at_a_complete_version(tmp_path):
    """A real crash: the daemon is SIGKILLed at random moments of a publishing run (base every 3,
    deltas between), restarted each time. After every kill `latest` names a version that loads
    whole (its base and every delta of its chain), and the last run publishes every window."""
    served, state = tmp_path / "served", tmp_path / "state"
    cmd = [sys.executable, "-m", "dimstream.ops.cli", "run", "--arms", "control", "--search", "none"]
    cmd += ["--rows-per-window", "1000", "--windows", "12", "--model", "fm", "--base-every", "3"]
    cmd += ["--export-dir", str(served), "--state-dir", str(state), "--metrics-addr", "127.0.0.1:0", "--no-progress"]
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(3):
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = (served / "latest").read_text() if (served / "latest").exists() else None
        deadline = time.monotonic() + 120
        while not (served / "latest").exists() or (served / "latest").read_text() == start:
            assert p.poll() is None and time.monotonic() < deadline, "no new version was published"
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0, 0.4)))  # somewhere in a window: training, checkpoint or publication
        p.kill()
        p.wait()
        latest = (served / "latest").read_text().strip()
        model = ServingModel.load(served / latest)  # loads whole, or raises
        assert model.version == latest
        seen.append(latest)
    assert seen == sorted(seen) and len(set(seen)) == 3  # the pointer only moves forward
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    latest = (served / "latest").read_text().strip()
    assert latest == "window-000011" and ServingModel.load(served / latest).version == latest
    assert not list(served.glob(".window-*"))  # no half-written version is left behind
