"""/metrics, /healthz and /readyz on the metrics address."""

import time
import urllib.error
import urllib.request

from dimstream.ops.http import Readiness, serve
from dimstream.ops.metrics import Metrics


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_readiness_and_metrics():
    ready = Readiness()
    ready.window_seconds = 3600
    server = serve("127.0.0.1", 0, ready, Metrics().registry)
    port = server.server_port
    try:
        assert _get(port, "/healthz") == (200, "ok\n")
        code, body = _get(port, "/readyz")
        assert code == 503 and "no model loaded" in body
        ready.model_loaded = True
        ready.last_close = time.time()
        assert _get(port, "/readyz")[0] == 200
        ready.last_close = time.time() - 2 * 3600 - 5  # no window closed for two window lengths
        code, body = _get(port, "/readyz")
        assert code == 503 and "no window closed" in body
        code, body = _get(port, "/metrics")
        assert code == 200 and "dimstream_arm_auc" in body and "process_cpu_seconds_total" in body
        assert _get(port, "/nope")[0] == 404
    finally:
        server.shutdown()
