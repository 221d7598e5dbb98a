"""`dimstream serve`: an HTTP scoring server over an export dir, hot-reloading base + deltas.

POST /predict  body: a JSON list of row objects (field -> raw value, as in the stream), or an
               Arrow IPC stream (Content-Type: application/vnd.apache.arrow.stream);
               answer: {"predictions": [p, ...], "model_version": "window-000123"}
GET /metrics, /healthz, /readyz (200 once a model is loaded).

HTTP stack: uvicorn (ASGI, with the httptools C parser) running a bare ASGI app. Scoring runs in
a thread pool so the event loop keeps accepting while torch computes (torch releases the GIL in
its kernels). A watcher thread follows EXPORT_DIR/latest; a new version is built beside the
served one (deltas applied to a copy) and swapped in by one reference assignment, so requests
in flight finish on the model they started with and none fails during a reload.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dimstream.ops.config import ConfigError, parse_addr

log = logging.getLogger(__name__)
ARROW_STREAM = "application/vnd.apache.arrow.stream"
DRAIN_FACTOR = 4  # an oversized body up to 4 x the limit is read (and dropped) before its 413


class BadRequest(ValueError):
    """The client's fault: answered 400 (413 for an oversized body) with this message."""

    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP scoring server over an export dir (follows `latest`)")
    p.add_argument("--export-dir", type=Path, required=True, help="the daemon's --export-dir")
    p.add_argument("--addr", default="127.0.0.1:8080", help="HOST:PORT to listen on")
    p.add_argument("--poll-seconds", type=float, default=1.0, help="how often `latest` is read (1)")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20, help="larger bodies get 413 (16 MiB)")
    p.add_argument("--threads", type=int, default=4, help="scoring threads: requests scored at once (4)")
    p.add_argument(
        "--torch-threads", type=int, default=1, help="torch intra-op threads per request (1: parallel across requests)"
    )
    p.set_defaults(func=cmd_serve)


# --- the model being served and its reloads ---


def null_type(spec, id_type=None) -> pa.DataType:
    """The Arrow type of a missing field's column: all nulls, decoded exactly as a null value of
    the stream is in training (stream/decode.py + stream/hashing.py: integer ids and numerics
    hash as NULL_ID, string ids as the empty string, a missing list is an empty bag)."""
    ids = pa.string() if spec.id_type == "str" else pa.int64()
    return {"numeric": pa.float64(), "categorical": ids}.get(spec.kind, pa.list_(ids))


class Served:
    """The model now served, with its version; `refresh` follows EXPORT_DIR/latest."""

    def __init__(self, export_dir: Path, metrics: ServeMetrics):
        self.dir, self.metrics = Path(export_dir), metrics
        self.model = None  # (ServingModel, Decoder): swapped as one reference
        self.lock = threading.Lock()  # one reload at a time

    def latest_name(self) -> str | None:
        try:
            return (self.dir / "latest").read_text().strip() or None
        except FileNotFoundError:
            return None

    def refresh(self) -> bool:
        """Load the version `latest` names if it is not the one served; False if unchanged."""
        from dimstream.models.serving import ServingModel, read_meta
        from dimstream.stream.decode import Decoder

        with self.lock:
            name = self.latest_name()
            current = self.model[0] if self.model else None
            if name is None or (current is not None and current.version == name):
                return False
            meta = read_meta(self.dir / name)
            chain = meta.get("chain", [name])
            if current is not None and meta.get("kind") == "delta" and chain[: len(current.chain)] == current.chain:
                model = copy.deepcopy(current)  # apply the new deltas beside the served model
                for step in chain[len(current.chain) :]:
                    model.apply_delta(self.dir / step)
                kind = "delta"
            else:
                model, kind = ServingModel.load(self.dir / name), "base"
            self.model = (model, Decoder(model.schema))  # the swap: one assignment
            self.metrics.loaded(model, kind)
            log.info("serving %s (%s)", name, kind)
            return True

    def watch(self, poll_seconds: float, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.refresh()
            except Exception as e:  # a bad version must not stop serving the good one
                self.metrics.reload_errors.inc()
                log.warning("reload failed, still serving the previous version: %s", e)
            stop.wait(poll_seconds)


def rows_table(body: bytes, content_type: str) -> pa.Table:
    """The request's rows as Arrow: an IPC stream, or a JSON list of objects."""
    if content_type.split(";")[0].strip() == ARROW_STREAM:
        try:
            return pa.ipc.open_stream(body).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise BadRequest(f"body is not an Arrow IPC stream: {e}") from None
    try:
        rows = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BadRequest("body must be a JSON list of row objects (field name -> raw value)")
    return rows


def as_table(rows, schema) -> pa.Table:
    """The schema's columns only (others ignored), missing ones as nulls of their field's type."""
    if isinstance(rows, pa.Table):
        n, get = rows.num_rows, (lambda c: rows.column(c) if c in rows.column_names else None)
    else:
        n, get = len(rows), (lambda c: _json_column(rows, c))
    cols = {}
    for f in schema.fields:
        c = f.source_column
        if c in cols:
            continue
        col = get(c)
        if col is None or pa.types.is_null(col.type):
            col = pa.nulls(n, null_type(f))
        cols[c] = col
    cols[schema.label] = pa.array(np.zeros(n, np.int8))
    cols[schema.event_time] = pa.array(np.zeros(n, np.int64))
    return pa.table(cols)


def _json_column(rows: list[dict], name: str) -> pa.Array | None:
    values = [r.get(name) for r in rows]  # JSON is parsed row by row anyway; Arrow IPC is the bulk path
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
        raise BadRequest(f"column {name!r}: values of mixed or unsupported types ({e})") from None


def score(served: Served, body: bytes, content_type: str) -> tuple[np.ndarray, str]:
    current = served.model  # one read: this request finishes on this version whatever reloads
    if current is None:
        raise BadRequest("no model loaded yet", 503)
    model, decoder = current
    rows = rows_table(body, content_type)
    table = as_table(rows, model.schema)
    if table.num_rows == 0:
        return np.zeros(0, np.float32), model.version
    result = decoder.decode(table)
    if result.rejected_counts:
        r = result.rejected[0]
        raise BadRequest(f"rows refused: {result.rejected_counts} ({r.detail})")
    return model(result.batch).numpy(), model.version


# --- metrics ---


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.latency = Histogram(
            "dimstream_serve_request_seconds",
            "POST /predict latency, by status code",
            ["code"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.rows = Counter("dimstream_serve_rows", "rows scored", registry=r)
        self.window = Gauge("dimstream_serve_model_window", "window index of the served version", registry=r)
        self.version = Gauge(
            "dimstream_serve_model_version_info", "the served version (label)", ["version"], registry=r
        )
        self.lag = Gauge(
            "dimstream_serve_model_lag_seconds", "seconds since the served version was published", registry=r
        )
        self.reloads = Counter("dimstream_serve_reloads", "versions loaded, by kind", ["kind"], registry=r)
        self.reload_errors = Counter("dimstream_serve_reload_errors", "versions that failed to load", registry=r)
        self.published_at = None
        self.lag.set_function(lambda: time.time() - self.published_at if self.published_at else float("nan"))

    def loaded(self, model, kind: str) -> None:
        self.version.clear()
        self.version.labels(model.version).set(1)
        self.window.set(int(model.version.rsplit("-", 1)[-1]))
        self.published_at = model.published_at
        self.reloads.labels(kind).inc()


# --- the ASGI app ---


class App:
    def __init__(self, served: Served, metrics: ServeMetrics, max_body: int, threads: int):
        self.served, self.metrics, self.max_body = served, metrics, max_body
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="score")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if path == "/predict" and method == "POST":
            return await self.predict(scope, receive, send)
        if method != "GET":
            return await _send(send, 405, b"use GET (POST for /predict)\n")
        if path == "/metrics":
            return await _send(send, 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return await _send(send, 200, b"ok\n")
        if path == "/readyz":
            ok = self.served.model is not None
            return await _send(send, 200 if ok else 503, b"ready\n" if ok else b"no model loaded\n")
        return await _send(send, 404, b"not found\n")

    async def predict(self, scope, receive, send):
        t0 = time.perf_counter()
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        try:
            body = await self._body(receive, headers)
            loop = asyncio.get_running_loop()
            probs, version = await loop.run_in_executor(
                self.pool, score, self.served, body, headers.get("content-type", "application/json")
            )
            code, out = 200, json.dumps({"predictions": probs.tolist(), "model_version": version}).encode()
            self.metrics.rows.inc(len(probs))
        except BadRequest as e:
            code, out = e.code, json.dumps({"error": str(e)}).encode()
        except Exception as e:  # a bug must not take the server down; say so, 500
            log.exception("predict failed")
            code, out = 500, json.dumps({"error": f"internal error: {e}"}).encode()
        await _send(send, code, out, "application/json")
        self.metrics.latency.labels(str(code)).observe(time.perf_counter() - t0)

    async def _body(self, receive, headers) -> bytes:
        too_big = BadRequest(f"body over {self.max_body} bytes (--max-body-bytes)", 413)
        declared = int(headers.get("content-length", 0) or 0)
        if declared > self.max_body:
            await self._drain(receive, declared)
            raise too_big
        parts, size = [], 0
        while True:
            msg = await receive()
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._drain(receive, declared, msg)
                raise too_big
            parts.append(chunk)
            if not msg.get("more_body"):
                return b"".join(parts)

    async def _drain(self, receive, declared: int, msg: dict | None = None) -> None:
        """Read the rest of an oversized body and drop it, so the client, still sending, reads
        the 413 instead of a broken pipe (the server closes a connection whose body it left
        unread). Up to DRAIN_FACTOR x --max-body-bytes, nothing kept; a larger body is cut off."""
        if declared > DRAIN_FACTOR * self.max_body:
            return
        seen = 0
        while msg is None or msg.get("more_body"):
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > DRAIN_FACTOR * self.max_body or msg["type"] == "http.disconnect":
                return


async def _send(send, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8"):
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def cmd_serve(args) -> int:
    import torch
    import uvicorn

    # one request's kernels are small (a batch of rows): intra-op threads only spin against
    # each other and the other requests' (a 256-row request took 10x longer with 2 on 2 loaded cores)
    torch.set_num_threads(max(1, args.torch_threads))
    host, port = parse_addr(args.addr)
    if not args.export_dir.is_dir():
        raise ConfigError(f"export dir {args.export_dir} does not exist")
    metrics = ServeMetrics()
    served = Served(args.export_dir, metrics)
    stop = threading.Event()
    threading.Thread(target=served.watch, args=(args.poll_seconds, stop), name="reload", daemon=True).start()
    app = App(served, metrics, args.max_body_bytes, args.threads)
    http = "httptools" if _has("httptools") else "h11"
    try:
        uvicorn.run(app, host=host, port=port, http=http, log_level="warning", lifespan="on")
    finally:
        stop.set()
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
