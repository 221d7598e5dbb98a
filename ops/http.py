"""The daemon's HTTP endpoint: /metrics (Prometheus), /healthz and /readyz."""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class Readiness:
    """Ready once a model is loaded and the last window closed less than two window lengths ago.

    Window lengths are event time; a live stream closes windows about as fast as event time
    passes, so wall time since the last close is compared with two window lengths (or with
    `max_idle_seconds` if set, for replays that run faster than real time)."""

    def __init__(self):
        self.model_loaded = False
        self.last_close: float | None = None
        self.started = time.time()
        self.window_seconds = 3600
        self.max_idle_seconds: float | None = None

    def ready(self) -> tuple[bool, str]:
        if not self.model_loaded:
            return False, "no model loaded"
        limit = self.max_idle_seconds or 2 * self.window_seconds
        since = time.time() - (self.last_close or self.started)
        if since > limit:
            return False, f"no window closed for {since:.0f}s (limit {limit:.0f}s)"
        return True, "ready"


class _Handler(BaseHTTPRequestHandler):
    readiness: Readiness
    registry: CollectorRegistry

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n")
        elif path == "/readyz":
            ok, why = self.readiness.ready()
            self._send(200 if ok else 503, (why + "\n").encode())
        else:
            self._send(404, b"not found\n")

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):  # keep the daemon's log for the daemon
        pass


POLL_SECONDS = 0.02


def serve(host: str, port: int, readiness: Readiness, registry: CollectorRegistry) -> ThreadingHTTPServer:
    """Serve `registry` in a daemon thread; port 0 picks a free port (see server.server_port)."""
    handler = type("Handler", (_Handler,), {"readiness": readiness, "registry": registry})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    # shutdown() waits for the loop to look at its flag: at the default 0.5 s poll, every run's
    # exit waited up to half a second for it
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": POLL_SECONDS}, name="metrics-http", daemon=True
    ).start()
    return server
