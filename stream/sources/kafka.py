"""Kafka as a source of the window loop, with offsets tied to checkpoints.

The consumer never auto-commits. A position is `{"offsets": {"<partition>": offset}}`: per
partition, the first message not yet fully trained. The daemon checkpoints it at each window's
close and only then calls `commit`; on start the source seeks every assigned partition to the
checkpointed offset (else the group's committed offset, else `auto_offset_reset`). Rows of a
message that were trained before a crash are skipped by the window loop (they are older than
the checkpointed watermark), so a message holding rows of two windows is handled exactly once.

Undecodable messages become error batches (dead-lettered by the loop) and are copied to
`TOPIC.dlq` with headers reason, partition and offset. A broker that is down or hangs never
raises out of `read`: the source backs off, reports `kafka_up = False` and keeps yielding
heartbeats so the daemon keeps serving metrics.

Liveness: kafka-python neither raises nor drops its connections while a broker hangs (a
stopped process still accepts TCP connections in the kernel), so `kafka_up` comes from a probe
of its own: a thread sends an ApiVersions request to the bootstrap brokers every
PROBE_INTERVAL_S and calls the broker up only if an answer arrives within PROBE_TIMEOUT_S.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Iterator
from urllib.parse import parse_qs, urlparse

import pyarrow as pa

from stream.kafka.wire import WireError, decode_message
from stream.schema import Schema
from stream.sources.base import SourceBatch

log = logging.getLogger(__name__)
METADATA_AGE_MS = 5000  # metadata refresh period
PROBE_INTERVAL_S = 1.0  # liveness probe period
PROBE_TIMEOUT_S = 2.0   # a broker that has not answered the probe within this is down


def probe_broker(host: str, port: int, timeout: float = PROBE_TIMEOUT_S, ssl_context=None) -> bool:
    """True if the broker answers an ApiVersions (v0) request within `timeout` seconds.
    ApiVersions needs no authentication (SASL allows it before the handshake)."""
    client_id = b"dimstream-probe"
    request = struct.pack(">hhih", 18, 0, 0x5EED, len(client_id)) + client_id
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            conn = ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context is not None else raw
            conn.sendall(struct.pack(">i", len(request)) + request)
            header = b""
            while len(header) < 8:  # response size, correlation id
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = conn.recv(8 - len(header))
                if not chunk:
                    return False
                header += chunk
            return struct.unpack(">ii", header)[1] == 0x5EED
    except (OSError, ValueError):
        return False


class Liveness(threading.Thread):
    """Probes the bootstrap brokers every `interval` seconds; `up` is the last probe's answer."""

    def __init__(self, bootstrap: str, security: dict, interval: float = PROBE_INTERVAL_S,
                 timeout: float = PROBE_TIMEOUT_S):
        super().__init__(name="dimstream-kafka-liveness", daemon=True)
        self.targets = []
        for hp in bootstrap.split(","):
            host, _, port = hp.strip().rpartition(":")
            self.targets.append((host.strip("[]"), int(port)))
        self.interval, self.timeout = interval, timeout
        self.ssl_context = _ssl_context(security)
        self.up: bool | None = None  # None until the first probe
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self.up = any(probe_broker(h, p, self.timeout, self.ssl_context) for h, p in self.targets)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()


def _ssl_context(security: dict):
    if "SSL" not in str(security.get("security_protocol", "PLAINTEXT")).upper():
        return None
    import ssl
    ctx = ssl.create_default_context(cafile=security.get("ssl_cafile"))
    if security.get("ssl_certfile"):
        ctx.load_cert_chain(security["ssl_certfile"], security.get("ssl_keyfile"), security.get("ssl_password"))
    ctx.check_hostname = bool(security.get("ssl_check_hostname", True))
    return ctx


class KafkaSource:
    default_window_seconds = None

    def __init__(self, bootstrap: str, topic: str, schema: Schema, group: str = "dimstream",
                 poll_timeout_ms: int = 500, security: dict | None = None, auto_offset_reset: str = "earliest",
                 dlq: bool = True):
        self.bootstrap, self.topic, self.schema, self.group = bootstrap, topic, schema, group
        self.name = f"kafka://{bootstrap}/{topic}"
        self.poll_timeout_ms, self.security = poll_timeout_ms, dict(security or {})
        self.auto_offset_reset, self.dlq = auto_offset_reset, dlq
        self._poll_ok = False
        self._liveness: Liveness | None = None
        self.last_message_time: float | None = None
        self.lag: dict[str, int] = {}
        self._next: dict[str, int] = {}   # per partition: offset after the last message read
        self._consumer = self._producer = None

    @classmethod
    def from_url(cls, url: str, schema_config: dict | None = None, **kw) -> "KafkaSource":
        u = urlparse(url)
        if u.scheme != "kafka" or not u.hostname or not u.port or not u.path.strip("/"):
            raise ValueError(f"bad Kafka URL {url!r}: use kafka://HOST:PORT/TOPIC[?group=NAME]")
        if schema_config is None:
            from stream.synthetic import default_schema
            schema = default_schema()
        else:
            from stream.sources.files import schema_from_config
            schema = schema_from_config(schema_config)
        group = parse_qs(u.query).get("group", ["dimstream"])[0]
        return cls(f"{u.hostname}:{u.port}", u.path.strip("/"), schema, group=group, **kw)

    @property
    def kafka_up(self) -> bool:
        """The last poll did not fail and the broker answered the last liveness probe."""
        probe = self._liveness.up if self._liveness is not None else None
        return self._poll_ok and probe is not False

    # --- reading ---
    def _connect(self, position: dict | None):
        from kafka import KafkaConsumer
        from kafka.consumer.subscription_state import ConsumerRebalanceListener

        source = self
        wanted = {int(p): int(o) for p, o in ((position or {}).get("offsets") or {}).items()}

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                pass  # nothing is committed beyond the last durable checkpoint

            def on_partitions_assigned(self, assigned):
                for tp in assigned:
                    if tp.partition in wanted:
                        source._consumer.seek(tp, wanted[tp.partition])

        self._consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset, session_timeout_ms=6000, heartbeat_interval_ms=1000,
            request_timeout_ms=15000, max_partition_fetch_bytes=64 << 20, fetch_max_bytes=128 << 20,
            max_poll_records=10_000, metadata_max_age_ms=METADATA_AGE_MS, **self.security)
        self._consumer.subscribe([self.topic], listener=Listener())

    def read(self, position: dict | None) -> Iterator[SourceBatch]:
        backoff = 0.5
        here = {"offsets": dict((position or {}).get("offsets") or {})}
        if self._liveness is None:
            self._liveness = Liveness(self.bootstrap, self.security)
            self._liveness.start()
        was_up = None
        while True:
            try:
                if self._consumer is None:
                    self._connect(position)
                records = self._consumer.poll(timeout_ms=self.poll_timeout_ms)
                self._poll_ok, backoff = True, 0.5
            except Exception as e:  # broker down or hanging: stay up, back off, keep heart-beating
                if self.kafka_up or backoff == 0.5:
                    log.warning("Kafka %s unreachable (%s); retrying", self.bootstrap, e)
                self._poll_ok = was_up = False
                self._drop_consumer()
                yield SourceBatch(None, here, here, source_down=True)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if self.kafka_up != was_up:
                if was_up is not None:
                    log.warning("Kafka %s is %s", self.bootstrap, "answering again" if self.kafka_up else
                                f"not answering (no reply to a probe within {PROBE_TIMEOUT_S:.0f}s)")
                was_up = self.kafka_up
            self._update_lag()
            if not records:
                # heartbeat: lets the loop close idle windows, unless the broker is not answering
                yield SourceBatch(None, here, here, source_down=not self.kafka_up)
                continue
            for tp, messages in records.items():
                yield from self._batches(str(tp.partition), messages)

    def _batches(self, p: str, messages) -> Iterator[SourceBatch]:
        """One SourceBatch per run of decodable messages of a partition (small messages are
        concatenated: per-message overhead would dominate), one error batch per bad message."""
        run, first = [], None

        def flush():
            if not run:
                return None
            try:
                rb = pa.Table.from_batches(run).combine_chunks().to_batches()[0] if len(run) > 1 else run[0]
            except pa.ArrowInvalid:  # messages of different Arrow schemas: keep them apart
                return [SourceBatch(b, {"offsets": {p: first + i}}, {"offsets": {p: first + i + 1}})
                        for i, b in enumerate(run)]
            return [SourceBatch(rb, {"offsets": {p: first}}, {"offsets": {p: first + len(run)}})]

        for msg in messages:
            self._next[p] = msg.offset + 1
            self.last_message_time = time.time()
            try:
                rb = decode_message(msg.value, msg.headers, self.schema.fingerprint())
            except WireError as e:
                yield from flush() or []
                run, first = [], None
                self._dead_letter(msg, e.reason)
                yield SourceBatch(None, {"offsets": {p: msg.offset}}, {"offsets": {p: msg.offset + 1}},
                                  error=e.reason, detail=f"partition {p} offset {msg.offset}: {e.detail}")
                continue
            if first is not None and msg.offset != first + len(run):  # a gap (compaction): new run
                yield from flush() or []
                run, first = [], None
            first = msg.offset if first is None else first
            run.append(rb)
        yield from flush() or []

    def _update_lag(self, every_seconds: float = 10.0) -> None:
        """Messages behind the end of each assigned partition (a broker round trip, so throttled)."""
        now = time.monotonic()
        if now - getattr(self, "_lag_at", 0.0) < every_seconds:
            return
        try:
            parts = list(self._consumer.assignment())
            if not parts:
                return  # not assigned yet: try again at the next poll
            self._lag_at = now
            ends = self._consumer.end_offsets(parts)
            self.lag = {str(tp.partition): max(0, int(end) - int(self._consumer.position(tp)))
                        for tp, end in ends.items()}
        except Exception as e:
            log.debug("lag unavailable: %s", e)

    def _dlq_send(self, value: bytes, key, headers: list) -> None:
        if not self.dlq:
            return
        try:
            if self._producer is None:
                from kafka import KafkaProducer
                self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, **self.security)
            self._producer.send(f"{self.topic}.dlq", value=value, key=key, headers=headers)
        except Exception as e:  # the window's dead-letter file still holds it
            log.warning("could not write to %s.dlq: %s", self.topic, e)

    def _dead_letter(self, msg, reason: str) -> None:
        self._dlq_send(msg.value, msg.key, [("reason", reason.encode()), ("partition", str(msg.partition).encode()),
                                             ("offset", str(msg.offset).encode())])

    def dead_letter_rows(self, table: pa.Table) -> None:
        """Rows the window loop rejected (late, bad label, ...): one Arrow message per reason."""
        from stream.kafka.wire import encode_arrow
        import pyarrow.compute as pc
        for reason in pc.unique(table.column("reason")).to_pylist():
            part = table.filter(pc.equal(table.column("reason"), reason))
            value, _ = encode_arrow(part.combine_chunks().to_batches()[0], self.schema.fingerprint())
            self._dlq_send(value, None, [("reason", str(reason).encode()), ("format", b"arrow-deadletter")])

    # --- positions and commits ---
    def resume_position(self, unfinished: list[SourceBatch], last: SourceBatch | None, start: dict | None) -> dict:
        offsets = dict((start or {}).get("offsets") or {})
        offsets.update(self._next)
        first: dict[str, int] = {}
        for sb in unfinished:
            for p, o in sb.position.get("offsets", {}).items():
                first[p] = min(first.get(p, o), o)
        offsets.update(first)
        return {"offsets": offsets}

    def commit(self, position: dict) -> None:
        """Commit `position` to the group: called only once the checkpoint holding it is durable."""
        if self._consumer is None:
            return
        from kafka.structs import OffsetAndMetadata, TopicPartition
        offsets = {TopicPartition(self.topic, int(p)): OffsetAndMetadata(int(o), "", -1)
                   for p, o in position.get("offsets", {}).items()}
        try:
            self._consumer.commit(offsets)
        except Exception as e:  # the checkpoint still holds the position; the next commit catches up
            log.warning("offset commit failed: %s", e)

    def _drop_consumer(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            except Exception:
                pass
            self._consumer = None

    def close(self) -> None:
        if self._liveness is not None:
            self._liveness.stop()
            self._liveness = None
        self._drop_consumer()
        if self._producer is not None:
            self._producer.close()
            self._producer = None
