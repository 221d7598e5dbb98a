"""`dimstream serve`: latency (p50/p99) and rows/s of POST /predict at batch 1 and 256, for the
control arm and the searched slim arm, each exported by a short daemon run.

Latency: one client, keep-alive, requests back to back. Throughput: `CLIENTS` clients at once.
Bodies: JSON (a list of row objects, as a caller writes them) and, at batch 256, Arrow IPC.
The server runs as its own process (`dimstream serve`), the clients in this one, on the same
machine: the figures include the clients' cost and the machine's other load.

Writes benchmarks/results/serving.json.  Run: .venv/bin/python benchmarks/serving.py
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 4.0  # per measurement
CLIENTS = 4
ARMS = {"control": ("control",), "slim": ("control", "slim")}


def export(tmp: Path, arms: tuple[str, ...]) -> tuple[Path, pa.Table]:
    cfg = RunConfig(
        arms=arms,
        windows=2,
        rows_per_window=5000,
        state_dir=tmp / "state",
        export_dir=tmp / "served",
        metrics_addr="127.0.0.1:0",
        progress=False,
    )
    runner = Runner.from_config(cfg)
    runner.run()
    return tmp / "served", runner.source.window_table(9).slice(0, 256)


def bodies(rows: pa.Table) -> dict[str, tuple[bytes, str, int]]:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as w:
        w.write_table(rows)
    return {
        "json_batch1": (json.dumps(rows.slice(0, 1).to_pylist()).encode(), "application/json", 1),
        "json_batch256": (json.dumps(rows.to_pylist()).encode(), "application/json", 256),
        "arrow_batch256": (sink.getvalue().to_pybytes(), "application/vnd.apache.arrow.stream", 256),
    }


def start_server(export_dir: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dimstream.ops.cli", "serve", "--export-dir", str(export_dir)]
    proc = subprocess.Popen([*cmd, "--addr", f"127.0.0.1:{port}"], cwd=ROOT, stderr=subprocess.DEVNULL)
    end = time.time() + 120
    while time.time() < end:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready")


def loop(port: int, body: bytes, ctype: str, seconds: float, out: list) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        c.request("POST", "/predict", body, {"Content-Type": ctype})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"status {r.status}")
        out.append(time.perf_counter() - t0)


def measure(port: int, body: bytes, ctype: str, rows: int) -> dict:
    lat: list[float] = []
    loop(port, body, ctype, SECONDS, lat)
    per_client: list[list[float]] = [[] for _ in range(CLIENTS)]
    threads = [threading.Thread(target=loop, args=(port, body, ctype, SECONDS, o)) for o in per_client]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = sum(len(o) for o in per_client)
    return {
        "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3),
        "requests_sequential": len(lat),
        "rows_per_s_one_client": round(rows * len(lat) / SECONDS, 1),
        f"rows_per_s_{CLIENTS}_clients": round(rows * done / wall, 1),
    }


def main() -> None:
    result = {
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "seconds_per_measurement": SECONDS,
        "clients": CLIENTS,
        "arms": {},
    }
    for arm, arms in ARMS.items():
        with tempfile.TemporaryDirectory() as tmp:
            served, rows = export(Path(tmp), arms)
            proc, port = start_server(served)
            try:
                result["arms"][arm] = {k: measure(port, *v) for k, v in bodies(rows).items()}
            finally:
                proc.terminate()
                proc.wait(30)
    result["load_average_at_end"] = os.getloadavg()[0]  # the machine is shared: read the figures with it
    out = ROOT / "benchmarks" / "results" / "serving.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
