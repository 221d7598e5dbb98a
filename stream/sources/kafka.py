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
"""
from __future__ import annotations

import logging
import time
from typing import Iterator
from urllib.parse import parse_qs, urlparse

import pyarrow as pa

from stream.kafka.wire import WireError, decode_message
from stream.schema import Schema
from stream.sources.base import SourceBatch

log = logging.getLogger(__name__)
METADATA_AGE_MS = 5000  # metadata refresh period: also the broker liveness probe


class KafkaSource:
    default_window_seconds = None

    def __init__(self, bootstrap: str, topic: str, schema: Schema, group: str = "dimstream",
                 poll_timeout_ms: int = 500, security: dict | None = None, auto_offset_reset: str = "earliest",
                 dlq: bool = True):
        self.bootstrap, self.topic, self.schema, self.group = bootstrap, topic, schema, group
        self.name = f"kafka://{bootstrap}/{topic}"
        self.poll_timeout_ms, self.security = poll_timeout_ms, dict(security or {})
        self.auto_offset_reset, self.dlq = auto_offset_reset, dlq
        self.kafka_up = False
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
        while True:
            try:
                if self._consumer is None:
                    self._connect(position)
                records = self._consumer.poll(timeout_ms=self.poll_timeout_ms)
                self.kafka_up, backoff = bool(records) or self._broker_connected(), 0.5
            except Exception as e:  # broker down or hanging: stay up, back off, keep heart-beating
                if self.kafka_up or backoff == 0.5:
                    log.warning("Kafka %s unreachable (%s); retrying", self.bootstrap, e)
                self.kafka_up = False
                self._drop_consumer()
                yield SourceBatch(None, here, here)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self._update_lag()
            if not records:
                yield SourceBatch(None, here, here)  # heartbeat: lets the loop close idle windows
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

    def _broker_connected(self) -> bool:
        """kafka-python does not raise while a broker is down or hangs: ask its connections, and
        whether metadata (refreshed every METADATA_AGE_MS) still arrives."""
        try:
            client = self._consumer._client
            fresh = time.monotonic() * 1000 - client.cluster._last_successful_refresh_ms < 2.5 * METADATA_AGE_MS
            return fresh and any(client.connected(getattr(b, "node_id", getattr(b, "nodeId", None)))
                                 for b in client.cluster.brokers())
        except Exception:
            return True  # unknown: poll itself did not fail

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
        self._drop_consumer()
        if self._producer is not None:
            self._producer.close()
            self._producer = None
