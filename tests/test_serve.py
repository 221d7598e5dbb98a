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

from dimstream.models.serving import ServingModel, load_tensors
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
    # each search's own allocation behind a 10% gain gate: windows 1 and 2 re-shape the slim arm
    # and 3 and 4 keep it (gates of 5-20% do the same); the moving average would keep the first
    # allocation through 5 windows of 1,500 rows, and no gate re-shapes at every window
    cfg = _config(
        tmp_path, windows=5, arms=("control", "slim"), search="sseds", saliency_decay=0.0, realloc_min_gain=0.1
    )
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

    class Arm:  # what Publisher reads of an arm: its name, allocation and precision
        name, dims, precision = "slim", {"a": 4}, "fp32"

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


# --- managed vocabularies: the mapping travels with every version ---


def _managed_stream(tmp_path, windows):
    """A files source of synthetic windows whose user and site ids churn (30% of a field's ids
    replaced each window), both managed: user_id LRU in 96 rows (about 220 users a window, so ids
    are admitted and evicted in every window), site (string ids) LFU, admitted after 2
    occurrences. Returns (source, its [schema] table, rows no window trains on)."""
    import pyarrow.parquet as pq

    from dimstream.stream.synthetic import SyntheticField, SyntheticSource

    fields = (
        SyntheticField("user_id", 400, 3, zipf=1.1),
        SyntheticField("site", 200, 5, string_ids=True),
        SyntheticField("item_id", 300, 4),
        SyntheticField("tags", 50, 4, kind="multi"),
        SyntheticField("num_price", 0, 1, kind="numeric"),
    )
    src = SyntheticSource(seed=0, rows_per_window=1200, fields=fields, churn={"user_id": 0.3, "site": 0.3})
    data = tmp_path / "data"
    data.mkdir()
    for w in range(windows):
        pq.write_table(src.window_table(w), data / f"part-{w:03d}.parquet")
    managed = {
        "user_id": {"vocab": "managed", "capacity": 96, "eviction": "lru"},
        "site": {"vocab": "managed", "capacity": 64, "admit_after": 2, "id_type": "str"},
    }
    schema = {
        "fields": [
            {"name": f.name, "kind": f.kind, "num_embeddings": n} | managed.get(f.name, {})
            for f, n in zip(fields, (1, 1, 600, 100, 64))
        ]
    }
    # rows of every window (ids admitted, evicted and re-admitted along the way), a window no
    # run trains on, and ids no window carries (they read the default row)
    seen = pa.concat_tables([src.window_table(w).slice(0, 40) for w in range(windows)])
    rows = pa.concat_tables([seen, src.window_table(windows + 3).slice(0, 40)]).drop_columns(["p_true"])
    unknown = rows.slice(0, 8).to_pylist()
    for i, r in enumerate(unknown):
        r["user_id"], r["site"] = 10**12 + i, f"never-seen-{i}"
    return f"files:{data}", schema, pa.concat_tables([rows, pa.Table.from_pylist(unknown, rows.schema)])


def _mapping(model, field):
    m = model.vocab[field]
    return dict(zip(m.raw_ids.tolist(), m.rows.tolist()))


def test_a_managed_field_is_published_with_its_mapping_and_replays_the_trainer(tmp_path, monkeypatch):
    from dimstream.models.vocab import vocabs_of
    from dimstream.stream.decode import raw_ids

    source, schema, rows = _managed_stream(tmp_path, windows=5)
    cfg = _config(tmp_path, source=source, schema=schema, windows=5, arms=("control",), base_every=3, seed=0)
    runner = Runner.from_config(cfg)  # --export-dir with managed fields: no longer refused
    batch = runner.decoder.decode(rows).batch
    want, publish = {}, Committer._publish

    def recording(self, index, arm, meta, weights):  # the trainer's predictions and mapping as published
        publish(self, index, arm, meta, weights)
        want[index] = (arm.predict(batch), {f: v.mapping() for f, v in vocabs_of(arm).items()})

    monkeypatch.setattr(Committer, "_publish", recording)
    runner.run()
    served = tmp_path / "served"
    assert sorted(want) == [0, 1, 2, 3, 4]
    assert [_kind(served / f"window-{i:06d}") for i in range(5)] == ["base", "delta", "delta", "base", "delta"]
    users = set(batch.values["user_id"].tolist())
    stepped = ServingModel.load(served / "window-000000")  # and deltas applied one by one, in place
    for i, (probs, mappings) in want.items():
        version = served / f"window-{i:06d}"
        if i:
            stepped = ServingModel.load(version) if _kind(version) == "base" else stepped
            if _kind(version) == "delta":
                stepped.apply_delta(version)
        for model in (ServingModel.load(version), stepped):
            assert model.version == version.name
            assert np.abs(model(batch).numpy() - probs).max() < 1e-6, i
            assert all(_mapping(model, f) == mappings[f] for f in ("user_id", "site")), i
        meta = json.loads((version / "model.json").read_text())
        assert meta["vocab"]["user_id"] == {"live_ids": len(mappings["user_id"]), "default_row": 95}
        if not i:
            continue
        before, now = want[i - 1][1]["user_id"], mappings["user_id"]
        # ids of the fixed batch were evicted and others admitted between the two versions
        assert users & (set(before) - set(now)) and users & (set(now) - set(before)), i
        if _kind(version) == "delta":  # rows handed to another id were re-drawn: they are in the delta
            moved = set(now.values()) - {r for u, r in now.items() if before.get(u) == r}
            delta_rows = load_tensors(version / "rows")
            assert moved and moved <= set(delta_rows["emb_user_id/ids"].tolist()), i
            assert moved <= set(delta_rows["wide_user_id/ids"].tolist()), i
    # ids no window carried read the default row (the trainer's too: its predictions matched above)
    last = ServingModel.load(served / "window-000004")
    unknown = torch.from_numpy(raw_ids(pa.array([10**12, 10**12 + 1]), "user_id"))
    assert last.vocab["user_id"](unknown).tolist() == [95, 95]
    sites = torch.from_numpy(raw_ids(pa.array(["never-seen-0"]), "site"))
    assert last.vocab["site"](sites).tolist() == [63]
    # `dimstream predict` shares the path, and `dimstream export` writes the mapping too
    probs = export.predict(served / "window-000004", rows.drop_columns(["label", "event_time"]))
    assert np.abs(probs - want[4][0]).max() < 1e-6
    exported = export.export_arm(tmp_path / "state", "control", tmp_path / "exported")
    assert np.abs(export.predict(exported, rows) - want[4][0]).max() < 1e-6
    # a base without a managed field's mapping is refused: raw ids would be read as rows
    weights = torch.load(exported / "weights.pt", weights_only=True)
    torch.save({k: v for k, v in weights.items() if not k.startswith("vocab_site/")}, exported / "weights.pt")
    with pytest.raises(ValueError, match="no mapping for managed field 'site'"):
        ServingModel.load(exported)


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


def test_serve_maps_managed_ids_as_the_trainer_across_reloads(tmp_path, monkeypatch):
    """`dimstream serve` on a managed field (int user ids, string site ids): the served version
    advances by deltas that re-map ids, and every answer is the trainer's, unknown ids included."""
    publish = export.Publisher.publish

    def publish_then_wait_for_the_server(self, index, *args, **kwargs):
        # A server that polled after window 2 and not between would load it as a base (its chain
        # does not extend the served one): hold the trainer until window 1 is served, so that
        # window 2 must arrive as a delta however the two processes are scheduled.
        out = publish(self, index, *args, **kwargs)
        if index == 1:
            _wait(lambda: _post(url + "/predict", body)[1].get("model_version") == "window-000001", 60, "v1")
        return out

    monkeypatch.setattr(export.Publisher, "publish", publish_then_wait_for_the_server)
    source, schema, rows = _managed_stream(tmp_path, windows=3)
    kw = dict(source=source, schema=schema, arms=("control",), seed=0)
    Runner.from_config(_config(tmp_path, windows=1, **kw)).run()  # window 0: the base the server starts on
    port = _free_port()
    block_torchrec = "import sys; sys.modules['torchrec'] = None; from dimstream.ops.cli import main; sys.exit(main())"
    argv = ["serve", "--export-dir", str(tmp_path / "served"), "--addr", f"127.0.0.1:{port}", "--poll-seconds", "0.2"]
    server = subprocess.Popen(
        [sys.executable, "-c", block_torchrec, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _get(url + "/readyz")[0] == 200, 120, "/readyz")
        body = json.dumps(rows.to_pylist()).encode()
        code, first = _post(url + "/predict", body)
        assert code == 200 and first["model_version"] == "window-000000"
        runner = Runner.from_config(_config(tmp_path, windows=3, **kw))
        runner.run()  # window 1 (a base: a restarted daemon holds nothing to diff) and 2 (a delta)
        _wait(lambda: _post(url + "/predict", body)[1].get("model_version") == "window-000002", 60, "v2")
        code, answer = _post(url + "/predict", body)
        want = runner.arm("control").predict(runner.decoder.decode(rows).batch)
        assert code == 200 and np.abs(np.array(answer["predictions"]) - want).max() < 1e-6
        assert np.abs(np.array(first["predictions"]) - want).max() > 1e-3  # the model did move
        _, metrics = _get(url + "/metrics")
        assert 'dimstream_serve_reloads_total{kind="delta"} 1.0' in metrics  # the delta re-mapped ids in place
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
