"""A real Prometheus server scrapes a running `dimstream run` and holds what the summary holds."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.helpers import REPO

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("CI"),
    reason="prometheus not installed (apt-get install prometheus; CI installs it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def test_prometheus_scrapes_auc_params_and_dims_of_both_arms(tmp_path):
    assert PROMETHEUS, "prometheus must be installed on CI"
    dport, pport = _free_port(), _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: dimstream\n    static_configs: [{{targets: ['127.0.0.1:{dport}']}}]\n"
    )
    state = tmp_path / "state"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dimstream.ops.cli",
            "run",
            "--arms",
            "control,slim",
            "--search",
            "sseds",
            "--windows",
            "3",
            "--rows-per-window",
            "3000",
            "--model",
            "fm",
            "--state-dir",
            str(state),
            "--no-progress",
            "--metrics-addr",
            f"127.0.0.1:{dport}",
            "--linger-seconds",
            "60",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "daemon.log", "w"),
    )
    prom = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{pport}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while (
            not (state / "summary.json").exists()
            or len(json.loads((state / "summary.json").read_text())["windows"]) < 3
        ):
            assert daemon.poll() is None and time.time() < deadline, (tmp_path / "daemon.log").read_text()[-2000:]
            time.sleep(0.5)
        last = json.loads((state / "summary.json").read_text())["windows"][-1]
        time.sleep(4)  # a few scrapes after the last window closed
        got = {}
        while time.time() < deadline:
            try:
                got = {r["metric"]["arm"]: float(r["value"][1]) for r in _query(pport, "dimstream_arm_auc")}
            except OSError:
                got = {}
            if set(got) == {"control", "slim"}:
                break
            time.sleep(1)
        for arm in ("control", "slim"):
            assert got[arm] == pytest.approx(last["arms"][arm]["auc"], abs=1e-9)
        params = {r["metric"]["arm"]: float(r["value"][1]) for r in _query(pport, "dimstream_arm_embedding_params")}
        assert params["slim"] == last["arms"]["slim"]["embedding_params"] or params["slim"] < params["control"]
        assert params["control"] == last["arms"]["control"]["embedding_params"]
        dims = {
            r["metric"]["field"]: float(r["value"][1])
            for r in _query(pport, 'dimstream_arm_field_embedding_dim{arm="control"}')
        }
        assert dims == {f: float(d) for f, d in last["arms"]["control"]["dims"].items()}
        slim_dims = _query(pport, 'dimstream_arm_field_embedding_dim{arm="slim"}')
        assert len(slim_dims) == len(dims) and any(float(r["value"][1]) < 32 for r in slim_dims)
        diff = _query(pport, 'dimstream_arm_auc_diff_vs_control{arm="slim"}')
        assert float(diff[0]["value"][1]) == pytest.approx(last["arms"]["slim"]["auc_diff_vs_control"]["diff"])
    finally:
        prom.terminate()
        daemon.terminate()
        prom.wait(timeout=30)
        daemon.wait(timeout=60)
    assert daemon.returncode == 0
