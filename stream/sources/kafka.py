"""Kafka as a source of the window loop, with offsets tied to checkpoints.

The consumer never auto-commits. A position is `{"offsets": {"<partition>": offset}}`: per
partition, the first message not yet fully trained. The daemon checkpoints it at each window's
close and only then calls `commit`; on start the source seeks every assigned partition to the
checkpointed offset (else the group's committed offset, else `auto_offset_reset`). Rows of a
message that were trained before a crash are skipped by the window loop (they are older than
the checkpointed watermark), so a message holding rows of two windows is handled exactly once.

Rebalances give partitions up at the last window boundary. Every window's close is
checkpointed, then recorded on the positions side topic (`TOPIC.positions`, see PositionsTopic:
per partition the offset, how far reading had got, the checkpoint's watermark and the skip rules
carried over from earlier owners) and only once the broker has acknowledged that record
committed (with the same facts as commit metadata, which some brokers, tansu among them, drop).
When the group rebalances, the revoke callback commits that durable position again for the
partitions being given up (writing its record first if that had failed), before they go; after
the assignment every assigned partition is sought to the furthest of this daemon's durable
offset, the partition's latest record and the group's committed offset, the records of that
poll are dropped, and the source yields a `rewind` heartbeat: the window loop drops what it
buffered of open windows and re-reads it from there. Rows of split messages that an earlier
owner already trained (older than its watermark, in messages it had read) are skipped here. No
row is lost and none is trained twice across the group. A daemon restarting from a checkpoint
whose record never reached the side topic (it died in between) publishes it before rejoining
(`recover`).

Ranks (torchrun): `assign_ranks(rank, N)` replaces the group's assignment by a manual one,
partition p to rank p mod N, so no rebalance ever moves a partition mid-window (a lost rank
restarts the whole world anyway). Each rank's positions cover its partitions; the daemon merges
them (`merge_positions`) into the checkpoint, and rank 0 writes the positions records and the
commit for all of them. `event_time_floor` bounds the rank's event time in the ranks' window
agreement by its partitions still being read.

The schema: declared (`[schema]`), or adopted from the stream when none is (`adopt_schema`: the
`dimstream.schema.v1` metadata of the first message, checkpointed with the position). Every
message that carries a schema is checked against the source's (`schema_mismatch`). Messages are
decoded per poll by stream/kafka/formats.py: Arrow or JSON by header, declared `?format=` or
content, JSON in bulk across messages; other formats are `unsupported_format`.

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

import json
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from operator import attrgetter
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa

from dimstream.stream.kafka.formats import FORMATS, UNSUPPORTED, declared_columns, decode_values
from dimstream.stream.kafka.wire import WireError
from dimstream.stream.schema import METADATA_KEY, Schema, SchemaError
from dimstream.stream.sources.base import LiveSource, SourceBatch, SourceOptions, SourceStatus

log = logging.getLogger(__name__)
METADATA_AGE_MS = 5000  # metadata refresh period
PROBE_INTERVAL_S = 1.0  # liveness probe period
PROBE_TIMEOUT_S = 2.0  # a broker that has not answered the probe within this is down
_OFFSET, _VALUE, _HEADERS = attrgetter("offset"), attrgetter("value"), attrgetter("headers")
HOLD = -(2**63)  # event_time_floor: a partition that holds every window open
DLQ_MESSAGE_BYTES = 512 << 10  # rejected rows are sent to TOPIC.dlq in Arrow messages of about this size


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

    def __init__(
        self, bootstrap: str, security: dict, interval: float = PROBE_INTERVAL_S, timeout: float = PROBE_TIMEOUT_S
    ):
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


def skip_rules(meta: dict | None) -> list[list[int]]:
    """The rows a position record (or commit metadata) says were handled in messages at or after
    its offset: a list of [read_upto, watermark] rules, each meaning "rows older than watermark in
    messages before read_upto". Its own rule first, then the rules it carried over from earlier
    owners of the partition. Anything unparsable means nothing to skip."""
    if not meta:
        return []
    try:
        rules = [[int(meta["read_upto"]), int(meta["watermark"])]] if "read_upto" in meta else []
        rules += [[int(u), int(w)] for u, w in meta.get("skips") or []]
        return rules
    except (KeyError, TypeError, ValueError):
        return []


class PositionsTopic:
    """The positions side topic (`TOPIC.positions`): after each durable checkpoint and before the
    offsets are committed, one record per owned partition, keyed `GROUP/PARTITION`, saying where
    the group stands on it and which rows past that offset were already trained (the skip rules
    above). A member that is assigned a partition reads the latest record of its key: unlike
    commit metadata (which some brokers, tansu among them, drop) it always survives, and since it
    is written before the commit it is never older than the committed offset. One partition,
    compacted where the broker supports it; read incrementally from where the last read stopped."""

    def __init__(self, bootstrap: str, topic: str, group: str, security: dict):
        self.bootstrap, self.name, self.group, self.security = bootstrap, f"{topic}.positions", group, security
        self.latest: dict[str, dict] = {}  # partition -> the latest record of this group
        self._reader = self._producer = None
        self._created = False

    def _ensure(self) -> None:
        if self._created:
            return
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000, **self.security)
        try:
            if self.name not in admin.list_topics():
                try:
                    admin.create_topics([NewTopic(self.name, 1, 1, topic_configs={"cleanup.policy": "compact"})])
                except TopicAlreadyExistsError:
                    pass
                except Exception as e:  # a broker without compaction: a plain topic (it stays small)
                    log.info("creating %s compacted failed (%s); creating it plain", self.name, e)
                    try:
                        admin.create_topics([NewTopic(self.name, 1, 1)])
                    except TopicAlreadyExistsError:
                        pass
            self._created = True
        finally:
            admin.close()

    def write(self, records: list[dict], timeout: float = 10.0) -> bool:
        """Write the records and wait for the broker to acknowledge all of them."""
        if not records:
            return True
        try:
            self._ensure()
            if self._producer is None:
                from kafka import KafkaProducer

                # not idempotent: a record written twice is harmless (the latest per key wins), while an
                # idempotent producer whose broker came back empty retries UnknownProducerId forever
                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap, acks="all", linger_ms=0, enable_idempotence=False, **self.security
                )
            futures = [
                self._producer.send(
                    self.name,
                    key=f"{self.group}/{r['partition']}".encode(),
                    value=json.dumps(r, sort_keys=True).encode(),
                )
                for r in records
            ]
            self._producer.flush(timeout=timeout)
            for f in futures:
                f.get(timeout=timeout)
            return True
        except Exception as e:
            log.warning("could not write positions to %s: %s", self.name, e)
            self._drop("_producer")  # a producer in a fatal state never recovers: a new one next time
            self._created = False  # the broker may have come back without the topic
            return False

    def forget(self) -> None:
        """The broker came back empty: new clients, the topic created again (one partition, compacted)
        before anything is written to it, and no record of the old broker kept."""
        self._drop("_producer")
        self._drop("_reader")
        self._created, self.latest = False, {}

    def _drop(self, attr: str) -> None:
        client = getattr(self, attr)
        setattr(self, attr, None)
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def refresh(self, timeout: float = 10.0) -> dict[str, dict]:
        """Read the side topic up to its current end and return, per partition, the latest record
        of this group. Raises if the end cannot be reached within `timeout` seconds."""
        try:
            return self._refresh(timeout)
        except Exception:
            self._drop("_reader")  # rebuilt, and the topic read again from its start, next time
            self.latest = {}
            raise

    def _refresh(self, timeout: float) -> dict[str, dict]:
        from kafka import KafkaConsumer
        from kafka.structs import TopicPartition

        if self._reader is None:
            self.latest = {}
            self._reader = KafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                request_timeout_ms=15000,
                **self.security,
            )
        parts = self._reader.partitions_for_topic(self.name)
        if not parts:
            return self.latest  # nothing written yet
        tps = [TopicPartition(self.name, q) for q in sorted(parts)]
        if set(tps) != set(self._reader.assignment()):
            self._reader.assign(tps)
        ends = self._reader.end_offsets(tps)
        if any(self._reader.position(tp) > ends[tp] for tp in tps):  # the broker came back empty
            log.warning("%s went back (end %s); reading it again from its start", self.name, ends)
            self.latest = {}
            self._reader.seek_to_beginning(*tps)
        prefix = f"{self.group}/".encode()
        deadline = time.monotonic() + timeout
        while any(self._reader.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not read to its end within {timeout:.0f}s")
            for msgs in self._reader.poll(timeout_ms=200).values():
                for m in msgs:
                    if m.key is None or not m.key.startswith(prefix) or m.value is None:
                        continue
                    try:
                        rec = json.loads(m.value)
                        self.latest[str(int(rec["partition"]))] = rec
                    except (ValueError, KeyError, TypeError):
                        log.warning("unreadable record at %s offset %d", self.name, m.offset)
        return self.latest

    def close(self) -> None:
        for c in (self._reader, self._producer):
            if c is not None:
                try:
                    c.close()
                except Exception:
                    pass
        self._reader = self._producer = None


def _limit_in(position: dict, limit: dict | None, p: str) -> int:
    """The offset `limit` (a read_upto) names in partition `p`, -1 when it names none there or
    names another incarnation of it (the topic was re-created: see KafkaSource._reset)."""
    upto = (limit or {}).get("offsets") or {}
    mine, theirs = position.get("resets") or {}, (limit or {}).get("resets") or {}
    if int(mine.get(p, 0)) != int(theirs.get(p, 0)):
        return -1
    return int(upto.get(p, -1))


class KafkaSource(LiveSource):
    """A topic of Arrow (or JSON-lines) messages, read by a consumer group (module docstring)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        schema: Schema | None,
        group: str = "dimstream",
        poll_timeout_ms: int = 500,
        security: dict | None = None,
        auto_offset_reset: str = "earliest",
        dlq: bool = True,
        positions: bool = True,
        format: str = "auto",
        assignment: tuple[int, int] | None = None,
    ):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        self.bootstrap, self.topic, self.group, self.format = bootstrap, topic, group, format
        # None: no [schema] declared, the schema is adopted from the stream (adopt_schema)
        self._schema, self.adopting = schema, schema is None
        self._said: set[str] = set()  # what was logged once: formats found, schemas refused
        self._ok_schema: Schema | None = None  # the last schema a message carried that matched
        self._keys: tuple | None = None  # (schema, its fingerprint, its declared columns): _schema_keys
        self.name = f"kafka://{bootstrap}/{topic}"
        self.poll_timeout_ms, self.security = poll_timeout_ms, dict(security or {})
        self.auto_offset_reset, self.dlq = auto_offset_reset, dlq
        self._poll_ok = False
        self._liveness: Liveness | None = None
        self.last_message_time: float | None = None
        self.lag: dict[str, int] = {}  # replaced whole, never changed in place (status() reads it)
        self._lag_at = -float("inf")  # when lag was last measured (monotonic)
        self._next: dict[str, int] = {}  # per partition: offset after the last message read
        self._consumer = self._producer = None
        self._durable: dict[str, int] = {}  # per partition: offset of the last durable checkpoint
        self._durable_meta: dict[str, str] = {}  # per partition: commit metadata of that checkpoint
        self._durable_rec: dict[str, dict] = {}  # per partition: its positions record
        self._side_ok: set[str] = set()  # partitions whose durable record is on the side topic
        self._assigned: set[int] | None = None  # partitions this member owns (None: not yet known)
        self._rebalanced = False  # set by the listener, handled after poll returns
        # partitions given up and the new assignment not yet handled: no message can arrive, so
        # the time without data is not idleness (heartbeats say source_down, as in an outage)
        self._rejoining = False
        # per partition, [read_upto, watermark] rules of rows handled by earlier owners: `_skip` is
        # applied to messages as they are read, `_carry` goes into positions until passed
        self._skip: dict[str, list[list[int]]] = {}
        self._carry: dict[str, list[list[int]]] = {}
        self._read_base: dict[str, int] = {}  # partitions taken over: nothing read before this
        self._positions = PositionsTopic(bootstrap, topic, group, self.security) if positions else None
        self.member = uuid.uuid4().hex[:12]
        self.rebalances = 0  # assignments received
        self.revoked_unfinished = 0  # revocations that found read-but-untrained messages
        self.handed_over_rows = 0  # rows skipped as trained by a partition's previous owner
        self.offset_resets = 0  # partitions restarted because their offsets went back (see _reset)
        # per partition, how many times it was reset: kept in positions ("resets"), since offsets
        # of one incarnation of a topic say nothing about another's
        self._resets: dict[str, int] = {}
        self._topic_id: str | None = None  # the topic's id (KIP-516) as last seen, if the broker has ids
        # partitions reset while not assigned (between losing the group and rejoining it): they
        # restart from their earliest offset when assigned again, whatever auto_offset_reset says
        self._restart_earliest: set[str] = set()
        # (rank, world size): partition p is read by rank p mod N, assigned by hand (no group
        # membership, no rebalance); None: the consumer group assigns partitions
        self.assignment: tuple[int, int] | None = None
        self._assign_at = -float("inf")  # when the topic's partitions were last looked up (monotonic)
        self._max_event: dict[str, int] = {}  # ranks: per partition, the newest event time handed on
        self._pending: set[str] = set()  # ranks: partitions of the last poll not yet all handed on
        if assignment is not None:
            self.assign_ranks(*assignment)

    def assign_ranks(self, rank: int, world_size: int) -> None:
        """Read partition p on rank p mod `world_size` only, by manual assignment: no consumer group
        membership, so no rebalance ever moves a partition to another rank mid-window (a lost rank
        makes torchrun restart every rank anyway). The group's name still keys the committed
        offsets and the positions records, which rank 0 alone writes for every partition (the
        daemon hands it the position of all ranks: `merge_positions`). Call before `read`.

        >>> from dimstream.stream.synthetic import default_schema
        >>> src = KafkaSource("localhost:9092", "t", default_schema(), assignment=(1, 2))
        >>> [p for p in range(5) if src.owns(p)]
        [1, 3]
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if self._consumer is not None:
            raise RuntimeError("assign_ranks must come before read")
        self.assignment = (int(rank), int(world_size))
        # a rank caught up on its partitions answers the ranks' window agreement at this pace
        self.poll_timeout_ms = min(self.poll_timeout_ms, 100)

    def owns(self, partition) -> bool:
        """This source reads `partition`: by the rank rule, else by the group's last assignment
        (every partition until the first one)."""
        if self.assignment is not None:
            return int(partition) % self.assignment[1] == self.assignment[0]
        return self._assigned is None or int(partition) in self._assigned

    @staticmethod
    def merge_positions(positions: list[dict | None]) -> dict | None:
        """One position of the whole topic from the positions of readers of disjoint partitions
        (the ranks, in rank order): per-partition tables united, the rest (member, schema) the
        first reader's. The checkpoint holds it, so a restart at any world size resumes every
        partition.

        >>> KafkaSource.merge_positions([{"offsets": {"0": 5, "2": 1}, "member": "a"}, {"offsets": {"1": 7}}])
        {'offsets': {'0': 5, '2': 1, '1': 7}, 'member': 'a'}
        """
        known = [p for p in positions if p is not None]
        if not known:
            return None
        out = {k: v for k, v in known[0].items() if not isinstance(v, dict)}
        for pos in known:
            for key, table in pos.items():
                if isinstance(table, dict) and key != "schema":
                    out.setdefault(key, {}).update(table)
        if "schema" in known[0]:
            out["schema"] = known[0]["schema"]
        return {"offsets": out.pop("offsets", {})} | out

    @classmethod
    def from_url(cls, url: str, schema_config: dict | None = None, **kw) -> KafkaSource:
        """`kafka://HOST:PORT/TOPIC[?group=NAME][&format=auto|arrow|json]`; no `schema_config`:
        the schema is adopted from the stream (`adopt_schema`), never assumed."""
        u = urlparse(url)
        if u.scheme != "kafka" or not u.hostname or not u.port or not u.path.strip("/"):
            raise ValueError(f"bad Kafka URL {url!r}: use kafka://HOST:PORT/TOPIC[?group=NAME][&format=json]")
        schema = None
        if schema_config is not None:
            from dimstream.stream.sources.files import schema_from_config

            schema = schema_from_config(schema_config)
        query = parse_qs(u.query)
        group = query.get("group", ["dimstream"])[0]
        fmt = query.get("format", ["auto"])[0]
        return cls(f"{u.hostname}:{u.port}", u.path.strip("/"), schema, group=group, format=fmt, **kw)

    @classmethod
    def from_spec(cls, arg: str, options: SourceOptions) -> KafkaSource:
        """`kafka://HOST:PORT/TOPIC[?group=G][&format=F]` (`arg` is the whole URL), with the declared
        schema (none: adopted from the stream) and the [kafka] security options."""
        return cls.from_url(arg, schema_config=options.schema_config, security=options.kafka or None)

    # --- the schema: declared, or adopted from the stream ---
    @property
    def schema(self) -> Schema:
        if self._schema is None:
            self.adopt_schema(None)
        return self._schema

    def adopt_schema(self, position: dict | None, timeout: float | None = None) -> Schema:
        """With no declared schema: the one a checkpointed `position` holds (resuming), else the
        one the stream carries (its first message, from the group's position). SchemaError (one
        line saying what to declare and where) when that message carries none: a model cannot be
        built without a schema, so a daemon that has never trained stops there (exit 2)."""
        if not self.adopting or (self._schema is not None and position is None):
            return self._schema
        held = (position or {}).get("schema")
        if held is not None:
            self._schema = Schema.from_dict(held)
            log.info("schema adopted from the stream, restored from the checkpoint: %s", self._schema.describe())
            return self._schema
        self._schema = self._discover(timeout)
        log.info(
            "no [schema] declared: adopted the schema the stream %s carries (%s): %s",
            self.topic,
            METADATA_KEY.decode(),
            self._schema.describe(),
        )
        return self._schema

    def _discover(self, timeout: float | None) -> Schema:
        """The schema of the first message from the group's position (else auto_offset_reset).
        Waits for one (a line every 30 s says so), through a broker that is not answering."""
        start, said, consumer = time.monotonic(), -float("inf"), None
        try:
            while timeout is None or time.monotonic() - start < timeout:
                if time.monotonic() - said >= 30:
                    log.info("no [schema] declared: waiting for a first message on %s to adopt its schema", self.topic)
                    said = time.monotonic()
                try:
                    consumer = consumer or self._peek_consumer()
                    for m in self._peek(consumer):
                        schema = self._schema_of_first(m)
                        if schema is not None:
                            return schema
                except SchemaError:
                    raise
                except Exception as e:  # the broker is down or hangs: retry, as read() does
                    if time.monotonic() - said < 1:
                        log.warning("Kafka %s unreachable (%s); retrying", self.bootstrap, e)
                    time.sleep(1.0)
            raise SchemaError(f"no message on {self.topic} within {timeout:.0f}s to adopt a schema from")
        finally:
            if consumer is not None:
                consumer.close(autocommit=False)

    def _peek_consumer(self):
        from kafka import KafkaConsumer

        return KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,  # for its committed offsets only: assign() joins no group
            enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset,
            request_timeout_ms=15000,
            **self.security,
        )

    def _peek(self, consumer) -> list:
        """One poll's messages, every partition assigned at the group's committed offset."""
        from kafka.structs import TopicPartition

        parts = consumer.partitions_for_topic(self.topic)
        if not parts:
            time.sleep(0.5)
            return []
        tps = [TopicPartition(self.topic, q) for q in sorted(parts)]
        if set(tps) != set(consumer.assignment()):
            consumer.assign(tps)
            for tp in tps:
                committed = consumer.committed(tp)
                if committed is not None and committed >= 0:
                    consumer.seek(tp, committed)
        return [m for msgs in consumer.poll(timeout_ms=500).values() for m in msgs]

    def _schema_of_first(self, m) -> Schema | None:
        """The schema message `m` carries; None for a message without content (skipped)."""
        (piece,) = decode_values([m.value], [m.headers], None, self.format)
        where = f"{self.topic} partition {m.partition} offset {m.offset}"
        declare = (
            "declare the fields in the [schema] table of the run's config (--config FILE; README, Kafka), "
            f"or produce with `dimstream replay`, which puts the schema in every message ({METADATA_KEY.decode()})"
        )
        if piece.error is not None:
            if piece.error.reason == "empty_message":
                return None
            raise SchemaError(f"no [schema] declared and message {where} cannot be read ({piece.error}): {declare}")
        if piece.schema is None:
            kind = "JSON" if piece.fmt == "json" else "an Arrow message without schema metadata"
            raise SchemaError(f"no [schema] declared and message {where} is {kind}, which carries no schema: {declare}")
        return piece.schema

    @property
    def kafka_up(self) -> bool:
        """The last poll did not fail and the broker answered the last liveness probe."""
        liveness = self._liveness  # read once: close() may clear it from another thread
        probe = liveness.up if liveness is not None else None
        return self._poll_ok and probe is not False

    def status(self) -> SourceStatus:
        """Up, lag, last message time and rows handed over, as of now. Called from the scrape
        thread while `read` runs: every attribute it reads is replaced whole, never changed in
        place (`lag` is a new dict each time), so one read of each needs no lock."""
        return SourceStatus(
            up=self.kafka_up,
            lag=dict(self.lag),
            last_message_time=self.last_message_time,
            handed_over_rows=self.handed_over_rows,
            offset_resets=self.offset_resets,
        )

    # --- reading ---
    def _connect(self):
        from kafka import KafkaConsumer
        from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener

        source = self
        if self.assignment is not None:
            self._consumer = KafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=self.group,  # for committed offsets and commits only: assign() joins no group
                enable_auto_commit=False,
                auto_offset_reset=self.auto_offset_reset,
                request_timeout_ms=15000,
                max_partition_fetch_bytes=64 << 20,
                fetch_max_bytes=128 << 20,
                max_poll_records=10_000,
                metadata_max_age_ms=METADATA_AGE_MS,
                **self.security,
            )
            self._assign_at = -float("inf")
            self._assign_ranks()
            return

        class Listener(AsyncConsumerRebalanceListener):  # runs on kafka-python's IO thread
            async def on_partitions_revoked(self, revoked):
                await source._give_up(revoked, commit=True)

            async def on_partitions_lost(self, lost):  # evicted: the group no longer takes our commits
                await source._give_up(lost, commit=False)

            async def on_partitions_assigned(self, assigned):
                source._assigned = {tp.partition for tp in assigned}
                source._rebalanced = True  # seeks and the rewind happen after poll returns
                source._rejoining = False  # after _rebalanced: a heartbeat reading both sees one set

        self._consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset,
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            request_timeout_ms=15000,
            max_partition_fetch_bytes=64 << 20,
            fetch_max_bytes=128 << 20,
            max_poll_records=10_000,
            metadata_max_age_ms=METADATA_AGE_MS,
            **self.security,
        )
        self._consumer.subscribe([self.topic], listener=Listener())

    def read(self, position: dict | None) -> Iterator[SourceBatch]:
        backoff = 0.5
        here = {"offsets": dict((position or {}).get("offsets") or {})}
        if self._liveness is None:
            self._liveness = Liveness(self.bootstrap, self.security)
            self._liveness.start()
        was_up = None
        self._durable = {str(p): int(o) for p, o in here["offsets"].items()}
        self._carry = {
            str(p): [list(map(int, r)) for r in rules] for p, rules in ((position or {}).get("carry") or {}).items()
        }
        self.member = str((position or {}).get("member") or self.member)
        self._resets = {str(p): int(g) for p, g in ((position or {}).get("resets") or {}).items()}
        while True:
            try:
                if self._consumer is None:
                    self._connect()
                    from dimstream.stream.kafka import bulk, rejoin

                    bulk.install(self._consumer)  # record batches unpacked in bulk (stream/kafka/bulk.py)
                    if self.assignment is None:
                        rejoin.install(self._consumer)  # a rebalance kafka-python can lose (stream/kafka/rejoin.py)
                elif self.assignment is not None:
                    self._assign_ranks()
                if self.assignment is not None and not self._consumer.assignment():
                    time.sleep(self.poll_timeout_ms / 1000)  # the topic does not exist yet
                    records = {}
                else:
                    records = self._consumer.poll(timeout_ms=self.poll_timeout_ms)
                if self._rebalanced:  # records fetched before our seeks: read them again from there
                    self._rebalanced, records = False, {}
                    self._seek_assigned()
                    self._poll_ok = True
                    yield SourceBatch(None, here, here, rewind=True)
                    continue
                self._poll_ok, backoff = True, 0.5
                records = self._went_back(records)  # a broker that came back empty: see _reset
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
                    log.warning(
                        "Kafka %s is %s",
                        self.bootstrap,
                        "answering again"
                        if self.kafka_up
                        else f"not answering (no reply to a probe within {PROBE_TIMEOUT_S:.0f}s)",
                    )
                was_up = self.kafka_up
            self._update_lag()
            if not records:
                # heartbeat: lets the loop close idle windows, unless the broker is not answering or
                # the group is rejoining (the rest of an open window may come after it: not late);
                # _rebalanced: the assignment came since this poll returned, its rewind comes next
                rejoining = self._rejoining or self._rebalanced
                yield SourceBatch(None, here, here, source_down=not self.kafka_up or rejoining)
                continue
            self._pending = {str(tp.partition) for tp in records}
            for tp, messages in records.items():
                p = str(tp.partition)
                for sb in self._batches(p, messages):
                    # read up to here once the loop has this batch: not at the end of its run, which
                    # may be split into several batches (a checkpoint's read_upto between them)
                    self._next[p] = sb.next_position["offsets"][p]
                    if self._resets.get(p):  # offsets of this incarnation of the partition
                        sb.position["resets"] = sb.next_position["resets"] = {p: self._resets[p]}
                    yield sb
                    if self.assignment is not None and sb.batch is not None:  # the loop has placed its rows
                        self._note_event_times(p, sb.batch)
                self._pending.discard(p)

    def _note_event_times(self, p: str, rb: pa.RecordBatch) -> None:
        from dimstream.stream.decode import event_seconds

        t = self.schema.event_time
        if t not in rb.schema.names or rb.num_rows == 0:
            return
        col = rb.column(t)
        seconds, bad, unparsable = event_seconds(col, self.schema.event_time_unit)
        ok = ~(bad | unparsable | np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool))
        if ok.any():
            self._max_event[p] = max(self._max_event.get(p, HOLD), int(seconds[ok].max()))

    def event_time_floor(self) -> int | None:
        """Ranks: the oldest, over this rank's partitions that still have messages the window loop
        has not placed, of the newest event time each has placed (HOLD for such a partition that
        has placed none, or while the broker is out of reach); None when every partition is caught
        up. The ranks' window agreement (stream/lockstep.py) takes it as this rank's event time:
        a partition read after another in one poll, or lagging behind it, holds the window open
        until its rows are placed, so none of them is late (the watermark is the minimum over
        partitions, as Flink's per-partition watermarks)."""
        if self._consumer is None:
            return HOLD
        floor = None
        try:
            for tp in self._consumer.assignment():
                high = self._consumer.highwater(tp)
                if high is None:
                    return HOLD  # not fetched yet
                p = str(tp.partition)
                if p not in self._pending and self._consumer.position(tp) >= high:
                    continue  # caught up: nothing of it is waiting
                t = self._max_event.get(p, HOLD)
                floor = t if floor is None else min(floor, t)
        except Exception:
            return HOLD
        return floor

    # --- a broker that comes back empty ---
    def _current_topic_id(self) -> str | None:
        try:
            tid = self._consumer._client.cluster.topic_id(self.topic)
        except Exception:
            return None
        return str(tid) if tid is not None and int(getattr(tid, "int", 1)) != 0 else None

    def _went_back(self, records: dict) -> dict:
        """Offsets going back (a broker restarted in memory, a topic deleted and re-created): the
        topic's id changed, or a partition delivers offsets below the next one expected. Such
        partitions restart from their earliest offset (`_reset`); their records of this poll are
        dropped (read again from there)."""
        tid = self._current_topic_id()
        if tid is not None and self._topic_id is not None and tid != self._topic_id:
            self._reset(sorted(self._assigned or ()), f"the topic's id changed from {self._topic_id} to {tid}")
            self._topic_id = tid
            return {}
        if tid is not None:
            self._topic_id = tid
        back = [tp for tp, ms in records.items() if ms and ms[0].offset < self._next.get(str(tp.partition), -1)]
        for tp in back:
            got, expected = records[tp][0].offset, self._next[str(tp.partition)]
            self._reset([tp.partition], f"offset {got} was delivered where {expected} was next")
        return {tp: ms for tp, ms in records.items() if tp not in back}

    def _reset(self, partitions, why: str, resume: dict | None = None) -> None:
        """The documented policy (README, Reliability): the partition restarts from its earliest
        offset; nothing is skipped and nothing is dead-lettered for the reset itself (rows of the
        new topic older than the watermark are late, as ever). One ERROR line and
        `offset_resets` per partition; the positions it had are dropped, and it is marked as a new
        incarnation (`resets` in positions) so that old offsets are never compared with new ones."""
        from kafka.structs import TopicPartition

        tps = [TopicPartition(self.topic, int(q)) for q in partitions]
        if not tps:
            return
        # a partition of the last assignment may not be assigned now (the group was lost when the
        # broker restarted, the rejoin is under way): it cannot be sought (kafka-python raises),
        # so it restarts from its earliest offset when assigned again (_seek_assigned)
        assigned = set(self._consumer.assignment())
        if seek := [tp for tp in tps if tp in assigned]:
            self._consumer.seek_to_beginning(*seek)
        self._restart_earliest |= {str(tp.partition) for tp in tps if tp not in assigned}
        try:
            first = self._consumer.beginning_offsets(tps)
        except Exception:
            first = {}
        for tp in tps:
            p = str(tp.partition)
            old = (resume or {}).get(p, self._next.get(p, self._durable.get(p)))
            log.error(
                "Kafka topic %s partition %s went back (%s; it was at offset %s): the broker came back "
                "empty or the topic was re-created; restarting the partition from its earliest offset %s%s",
                self.topic,
                p,
                why,
                old,
                first.get(tp, 0),
                "" if tp in assigned else " once the group, being rejoined, assigns it",
            )
            self.offset_resets += 1
            self._resets[p] = self._resets.get(p, 0) + 1
            kept = (self._durable, self._durable_meta, self._durable_rec, self._skip, self._carry, self._next)
            for d in (*kept, self._max_event):
                d.pop(p, None)
            self._side_ok.discard(p)
            self._read_base[p] = int(first.get(tp, 0))
        self.lag = {}
        if self._positions is not None:  # its topic went with the broker: clients and records of the old one go
            self._positions.forget()
        producer, self._producer = self._producer, None  # the DLQ producer too
        if producer is not None:
            try:
                producer.close(timeout=1)
            except Exception:
                pass

    async def _give_up(self, partitions, commit: bool) -> None:
        """Partitions are leaving this member: they go at the last durable checkpoint, whose
        position is committed (again) before they do; nothing read after it counts."""
        mine = {str(tp.partition) for tp in partitions}
        if mine:
            self._rejoining = True  # until the next assignment (on_partitions_assigned)
        if any(self._next.get(p, -1) > self._durable.get(p, -1) for p in mine):
            self.revoked_unfinished += 1
        log.info(
            "rebalance: giving up partitions %s at the last checkpoint %s",
            sorted(mine),
            {p: self._durable.get(p) for p in sorted(mine)},
        )
        if not commit or self._consumer is None:
            return
        from kafka.structs import OffsetAndMetadata, TopicPartition

        unwritten = [self._durable_rec[p] for p in sorted(mine) if p in self._durable_rec and p not in self._side_ok]
        if unwritten and self._positions is not None:  # the record goes first: never older than the commit
            if not self._positions.write(unwritten, timeout=3.0):
                mine = mine & self._side_ok  # the commit before it stands, with its record
            else:
                self._side_ok |= {r["partition"] for r in unwritten}
        offsets = {
            TopicPartition(self.topic, int(p)): OffsetAndMetadata(self._durable[p], self._durable_meta.get(p, ""), -1)
            for p in mine
            if p in self._durable
        }
        if not offsets:
            return
        try:  # async form: a blocking commit is refused on kafka-python's IO thread
            await self._consumer._coordinator._commit_offsets_sync_async(offsets, timeout_ms=5000)
        except Exception as e:  # the commit made after that checkpoint still stands
            log.warning("commit on revocation failed (%s); the last commit stands", e)

    def _assign_ranks(self) -> None:
        """Ranks: assign this rank's partitions of the topic (looked up every METADATA_AGE_MS, so a
        topic created or grown later is picked up). A partition new to the rank starts at its
        claims (`_seek_assigned`); one it was reading (a new consumer after an outage) goes on
        from the next message not yet read, so nothing buffered has to be read again."""
        from kafka.structs import TopicPartition

        now = time.monotonic()
        if now - self._assign_at < METADATA_AGE_MS / 1000:
            return
        self._assign_at = now
        parts = self._consumer.partitions_for_topic(self.topic)
        mine = {q for q in parts or () if self.owns(q)}
        tps = {TopicPartition(self.topic, q) for q in mine}
        if parts and not mine and "no-partition" not in self._said:
            self._said.add("no-partition")
            log.warning(
                "rank %d of %d owns no partition of %s (%d partitions): it holds the windows open until it "
                "is idle for --idle-timeout",
                *self.assignment,
                self.topic,
                len(parts),
            )
        if not mine or set(self._consumer.assignment()) == tps:
            return
        self._consumer.assign(sorted(tps))
        going_on = {q for q in mine if str(q) in self._next}
        for q in sorted(going_on):
            self._consumer.seek(TopicPartition(self.topic, q), self._next[str(q)])
        self._assigned = mine
        if mine - going_on:
            self._seek_assigned(mine - going_on)

    def _seek_assigned(self, only: set[int] | None = None) -> None:
        """After an assignment, every owned partition (or those of `only`: partitions new to a rank)
        restarts at the furthest of three claims, each
        made only once a checkpoint was durable: this member's own last checkpoint, the latest
        record of the positions side topic, and the group's committed offset. Rows past that
        offset that some owner already trained are skipped by the union of the claims' rules (each
        rule is true on its own); this member's own rule is applied by the window loop."""
        from kafka.structs import TopicPartition

        if only is None:
            self.rebalances += 1
            self._next, self.lag, self._skip, self._read_base = {}, {}, {}, {}
        else:
            for d in (self._next, self._skip, self._read_base):
                for q in only:
                    d.pop(str(q), None)
        records: dict[str, dict] = {}
        if self._positions is not None:
            try:
                records = dict(self._positions.refresh())
            except Exception as e:  # then the committed offset (and its metadata, if kept) decides
                log.warning("could not read %s (%s); using committed offsets only", self._positions.name, e)
        # a broker that came back empty, a topic re-created: its id changed, or the offsets claimed
        # lie beyond a partition's end (offsets went back); such partitions start again (_reset)
        tid, was = self._current_topic_id(), self._topic_id
        moved = tid is not None and was is not None and tid != was
        self._topic_id = tid if tid is not None else was
        seeking = sorted(self._assigned or ()) if only is None else sorted(only)
        assigned = [TopicPartition(self.topic, q) for q in seeking]
        try:
            ends = self._consumer.end_offsets(assigned) if assigned else {}
        except Exception as e:
            log.warning("end offsets of %s unavailable (%s)", self.topic, e)
            ends = {}
        for part in seeking:
            tp, p = TopicPartition(self.topic, part), str(part)
            claims = []  # (offset, rules, positions record, commit metadata, this member's own)
            if p in self._durable and moved:
                self._reset([part], f"the topic's id changed from {was} to {tid}", resume={p: self._durable[p]})
                continue
            if p in self._durable:
                claims.append(
                    (
                        self._durable[p],
                        self._carry.get(p, []),
                        self._durable_rec.get(p),
                        self._durable_meta.get(p, ""),
                        True,
                    )
                )
            rec = records.get(p)
            if rec is not None and rec.get("topic_id") not in (None, tid) and tid is not None:
                rec = None  # a record of an earlier incarnation of the topic
            if rec is not None and isinstance(rec.get("offset"), int) and rec["offset"] >= 0:
                claims.append((rec["offset"], skip_rules(rec), rec, _metadata(rec), False))
            committed = self._consumer.committed(tp, metadata=True)
            if committed is not None and committed.offset is not None and committed.offset >= 0:
                try:
                    meta = json.loads(committed.metadata or "{}")
                except ValueError:
                    meta = {}
                if isinstance(meta, dict) and meta.get("topic_id") not in (None, tid) and tid is not None:
                    committed = meta = None  # committed on an earlier incarnation of the topic
            if committed is not None and committed.offset is not None and committed.offset >= 0:
                claims.append(
                    (
                        committed.offset,
                        skip_rules(meta if isinstance(meta, dict) else {}),
                        None,
                        committed.metadata or "",
                        False,
                    )
                )
            if not claims:
                if self.auto_offset_reset == "latest" and p not in self._restart_earliest:
                    self._consumer.seek_to_end(tp)
                else:
                    self._consumer.seek_to_beginning(tp)
                self._durable.pop(p, None)
                self._carry.pop(p, None)
                continue
            start = max(c[0] for c in claims)
            if tp in ends and start > int(ends[tp]):
                self._reset([part], f"its end offset {ends[tp]} is below the resume offset", resume={p: start})
                continue
            rules = sorted({tuple(r) for c in claims for r in c[1] if r[0] > start})
            best = max((c for c in claims if c[0] == start), key=lambda c: (c[4], c[2] is not None))
            self._consumer.seek(tp, start)
            self._skip[p] = self._carry[p] = [list(r) for r in rules]
            if not self._skip[p]:
                del self._skip[p], self._carry[p]
            if not best[4]:  # taken over: the group's position, with its record
                self._durable[p], self._durable_meta[p] = start, best[3]
                self._read_base[p] = start
                if best[2] is not None:
                    self._durable_rec[p] = best[2]
                    self._side_ok.add(p)
                else:
                    self._durable_rec.pop(p, None)
        self._restart_earliest -= set(map(str, seeking))  # sought now, in this incarnation
        for p in list(self._carry):
            if int(p) not in (self._assigned or ()):
                del self._carry[p]
        log.info(
            "%s: assigned partitions %s; restarting %s at %s (skipping rows trained by earlier owners: %s)",
            "rebalance" if self.assignment is None else "rank {} of {}".format(*self.assignment),
            sorted(self._assigned or ()),
            "them" if only is None else f"{sorted(only)}",
            {
                p: self._consumer.position(TopicPartition(self.topic, int(p)))
                for p in map(str, sorted(self._assigned or ()))
            },
            self._skip or "none",
        )

    def _handed_over(self, p: str, offset, rb: pa.RecordBatch) -> tuple[pa.RecordBatch, np.ndarray]:
        """Drop the rows earlier owners of the partition trained: older than a rule's watermark, in
        a message before its read_upto (vectorised); the rows left, and which rows those are.
        `offset`: the message's, or one per row (rows of one-row messages decoded together).
        Event times are read as the decoder reads them; rows whose time is unreadable stay, for
        the decoder to dead-letter."""
        from dimstream.stream.decode import event_seconds

        everything = np.ones(rb.num_rows, bool)
        rules = [r for r in self._skip[p] if int(np.min(offset)) < r[0]]
        if not rules:
            del self._skip[p]  # messages come in offset order: no rule applies any more
            return rb, everything
        t = self.schema.event_time
        if t not in rb.schema.names or rb.num_rows == 0:
            return rb, everything
        per_row = np.broadcast_to(np.asarray(offset, np.int64), (rb.num_rows,))
        # per row, the widest watermark of the rules covering its message
        watermark = np.full(rb.num_rows, np.iinfo(np.int64).min, np.int64)
        for upto, w in rules:
            watermark = np.where(per_row < upto, np.maximum(watermark, w), watermark)
        col = rb.column(t)
        seconds, bad, unparsable = event_seconds(col, self.schema.event_time_unit)
        null = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        kept = (seconds >= watermark) | bad | unparsable | null
        out = rb.filter(pa.array(kept))
        self.handed_over_rows += rb.num_rows - out.num_rows
        return out, kept

    def _check_schema(self, piece) -> WireError | None:
        """The schema an Arrow message carries against the source's (declared or adopted): any
        difference is `schema_mismatch`, said once per schema met. Messages that carry none are
        checked column by column by the decoder."""
        theirs = piece.schema
        if theirs is None:
            if self.adopting and "no-metadata" not in self._said:
                self._said.add("no-metadata")
                log.info("%s: messages without schema metadata are read with the adopted schema", self.topic)
            return None
        if theirs is self._ok_schema:
            return None
        diff = self.schema.difference(theirs)
        if diff is None:
            self._ok_schema = theirs  # formats caches parsed metadata: the next message is the same object
            return None
        fp = theirs.fingerprint()
        whose = "adopted from the stream" if self.adopting else "declared in [schema]"
        if fp not in self._said:
            self._said.add(fp)
            log.warning(
                "%s: messages carrying schema %s, not this source's %s (%s): dead-lettered as schema_mismatch (%s)",
                self.topic,
                fp,
                self.schema.fingerprint(),
                whose,
                diff,
            )
        return WireError("schema_mismatch", f"the message carries schema {fp}, the source's ({whose}) differs: {diff}")

    def _schema_keys(self) -> tuple[str, tuple[str, ...]]:
        """The schema's fingerprint and declared columns (formats.declared_columns), worked out once
        per schema, not per poll."""
        schema = self.schema
        if self._keys is None or self._keys[0] is not schema:
            self._keys = (schema, schema.fingerprint(), declared_columns(schema))
        return self._keys[1], self._keys[2]

    def _say_unsupported(self, piece, where: str) -> None:
        if piece.fmt in UNSUPPORTED and piece.fmt not in self._said:
            self._said.add(piece.fmt)
            log.error(
                "%s %s: %s; dimstream reads Arrow IPC and JSON: dead-lettered as unsupported_format "
                "(said once; every such message is counted in dimstream_rows_rejected_total)",
                self.topic,
                where,
                UNSUPPORTED[piece.fmt],
            )

    def _batches(self, p: str, messages) -> Iterator[SourceBatch]:
        """One SourceBatch per run of decodable messages of a partition (small messages are
        concatenated, and JSON values decoded in bulk across them: per-message overhead would
        dominate), one error batch per bad message."""
        self.last_message_time = time.time()
        # the messages' fields by C-level maps: a Python loop over messages would cost ~0.1 us a row
        offsets = list(map(_OFFSET, messages))
        version, columns = self._schema_keys()
        pieces = decode_values(
            list(map(_VALUE, messages)), list(map(_HEADERS, messages)), version, self.format, columns
        )
        run = []  # (rows, offset of the first message, offset after the last, rows per message, offsets)

        def flush():
            if not run:
                return []
            try:
                rows = [r[0] for r in run]
                rb = pa.Table.from_batches(rows).combine_chunks().to_batches()[0] if len(rows) > 1 else rows[0]
            except pa.ArrowInvalid:  # messages of different Arrow schemas: keep them apart
                out = [
                    SourceBatch(b, {"offsets": {p: lo}}, {"offsets": {p: hi}}, message_rows=m, message_offsets=o)
                    for b, lo, hi, m, o in run
                ]
            else:
                # the window loop judges lateness and replay per message: a poll's grouping must not matter
                per_message, at = (np.concatenate([r[k] for r in run]) for k in (3, 4))
                out = [
                    SourceBatch(
                        rb,
                        {"offsets": {p: run[0][1]}},
                        {"offsets": {p: run[-1][2]}},
                        message_rows=per_message,
                        message_offsets=at,
                    )
                ]
            run.clear()
            return out

        for piece in pieces:
            lo, hi = offsets[piece.lo], offsets[piece.hi - 1] + 1
            error = piece.error or self._check_schema(piece)
            if error is None:
                # a piece of several messages holds one row per message (formats.decode_values)
                at = np.asarray(offsets[piece.lo : piece.hi], np.int64)
                rb, counts = piece.rb, np.full(len(at), piece.rb.num_rows if len(at) == 1 else 1, np.int64)
                if p in self._skip:
                    rb, kept = self._handed_over(p, lo if len(at) == 1 else at, rb)
                    counts = np.array([rb.num_rows]) if len(at) == 1 else kept.astype(np.int64)
                run.append((rb, lo, hi, counts, at))
                continue
            yield from flush()
            where = f"partition {p} offset {lo}"
            self._say_unsupported(piece, where)
            self._dead_letter(messages[piece.lo], error.reason)
            yield SourceBatch(
                None, {"offsets": {p: lo}}, {"offsets": {p: hi}}, error=error.reason, detail=f"{where}: {error.detail}"
            )
        yield from flush()

    def _update_lag(self, every_seconds: float = 10.0) -> None:
        """Messages behind the end of each assigned partition (a broker round trip, so throttled)."""
        now = time.monotonic()
        if now - self._lag_at < every_seconds:
            return
        try:
            parts = list(self._consumer.assignment())
            if not parts:
                return  # not assigned yet: try again at the next poll
            self._lag_at = now
            ends = self._consumer.end_offsets(parts)
            self.lag = {
                str(tp.partition): max(0, int(end) - int(self._consumer.position(tp))) for tp, end in ends.items()
            }
        except Exception as e:
            log.debug("lag unavailable: %s", e)

    def _dlq_send(self, value: bytes, key, headers: list) -> None:
        if not self.dlq:
            return
        try:
            if self._producer is None:
                from kafka import KafkaProducer

                # not idempotent, like the positions producer (PositionsTopic.write): no fatal state
                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap, enable_idempotence=False, **self.security
                )
            self._producer.send(f"{self.topic}.dlq", value=value, key=key, headers=headers)
        except Exception as e:  # the window's dead-letter file still holds it
            log.warning("could not write to %s.dlq: %s", self.topic, e)
            producer, self._producer = self._producer, None  # rebuilt next time: a fatal state is not left
            if producer is not None:
                try:
                    producer.close(timeout=1)
                except Exception:
                    pass

    def _dead_letter(self, msg, reason: str) -> None:
        self._dlq_send(
            msg.value,
            msg.key,
            [
                ("reason", reason.encode()),
                ("partition", str(msg.partition).encode()),
                ("offset", str(msg.offset).encode()),
            ],
        )

    def dead_letter_rows(self, table: pa.Table) -> None:
        """Rows the window loop rejected (late, bad label, ...): one Arrow message per reason."""
        import pyarrow.compute as pc

        from dimstream.stream.kafka.wire import encode_arrow

        for reason in pc.unique(table.column("reason")).to_pylist():
            part = table.filter(pc.equal(table.column("reason"), reason)).combine_chunks()
            # messages under the 1 MB a broker and a producer take by default: a window's rejected rows may be more
            step = max(1, part.num_rows * DLQ_MESSAGE_BYTES // max(1, part.nbytes))
            for start in range(0, part.num_rows, step):
                rb = part.slice(start, step).combine_chunks().to_batches()[0]
                value, _ = encode_arrow(rb, self.schema.fingerprint())
                self._dlq_send(value, None, [("reason", str(reason).encode()), ("format", b"arrow-deadletter")])

    # --- positions and commits ---
    def _owned(self, offsets: dict) -> dict:
        """Only partitions this member owns (`owns`)."""
        return {p: o for p, o in offsets.items() if self.owns(p)}

    def resume_position(self, unfinished: list[SourceBatch], last: SourceBatch | None, start: dict | None) -> dict:
        """Per owned partition, the first message not fully handled; `carry` keeps the rules of
        rows past it that earlier owners trained (so a restart, or the next owner, skips them)."""
        offsets = self._this_incarnation(start)
        offsets.update(self._read_base)  # taken over since `start`: the group's position
        offsets.update(self._next)
        first: dict[str, int] = {}
        for sb in unfinished:
            for p, o in self._this_incarnation(sb.position).items():
                first[p] = min(first.get(p, o), o)
        offsets.update(first)
        offsets = self._owned(offsets)
        position: dict = {"offsets": offsets, "member": self.member}
        if resets := self._owned({p: g for p, g in self._resets.items() if g}):
            position["resets"] = resets
        if self.adopting and self._schema is not None:  # checkpointed: a restart resumes with it
            position["schema"] = self._schema.to_dict()
        carry = {p: [r for r in self._carry.get(p, []) if r[0] > o] for p, o in offsets.items()}
        carry = {p: rules for p, rules in carry.items() if rules}
        if carry:
            position["carry"] = carry
        return position

    def read_upto_position(self, last: SourceBatch | None, previous: dict | None) -> dict:
        """Per owned partition, the offset after the last message read (the window loop's test for
        rows read, and handled, before a restart or a rebalance). `last` is not needed: the
        source tracks every partition's next offset itself (`last` holds only one partition)."""
        offsets = self._this_incarnation(previous)
        offsets.update(self._read_base)
        offsets.update(self._next)
        position: dict = {"offsets": self._owned(offsets)}
        if resets := self._owned({p: g for p, g in self._resets.items() if g}):
            position["resets"] = resets
        return position

    def _this_incarnation(self, position: dict | None) -> dict:
        """The offsets of `position` in partitions not reset since it was taken (see _reset)."""
        resets = (position or {}).get("resets") or {}
        return {
            p: o
            for p, o in ((position or {}).get("offsets") or {}).items()
            if int(resets.get(p, 0)) == self._resets.get(p, 0)
        }

    def is_before(self, position: dict, limit: dict | None) -> bool:
        """A batch was read before `limit` if, in any of its partitions, its offset lies before
        the limit's offset there (a partition the limit does not name was not read before).

        >>> from dimstream.stream.synthetic import default_schema
        >>> src = KafkaSource("localhost:9092", "t", default_schema())
        >>> src.is_before({"offsets": {"0": 4}}, {"offsets": {"0": 5, "1": 2}})
        True
        >>> src.is_before({"offsets": {"1": 2}}, {"offsets": {"0": 5, "1": 2}})
        False
        >>> src.is_before({"offsets": {"2": 0}}, {"offsets": {"0": 5}})
        False
        >>> src.is_before({"offsets": {"0": 4}, "resets": {"0": 1}}, {"offsets": {"0": 5}})  # a new topic
        False
        """
        return any(int(o) < _limit_in(position, limit, p) for p, o in position.get("offsets", {}).items())

    def messages_before(self, sb: SourceBatch, limit: dict | None) -> bool | np.ndarray:
        """Per message of a poll's batch (one partition), whether it lies before `limit`.

        >>> from dimstream.stream.synthetic import default_schema
        >>> src = KafkaSource("localhost:9092", "t", default_schema())
        >>> sb = SourceBatch(None, {"offsets": {"0": 3}}, {"offsets": {"0": 7}}, message_offsets=np.array([3, 4, 6]))
        >>> src.messages_before(sb, {"offsets": {"0": 5}}).tolist()
        [True, True, False]
        """
        if sb.message_offsets is None or len(sb.position.get("offsets", {})) != 1:
            return self.is_before(sb.position, limit)
        (p,) = sb.position["offsets"]
        return sb.message_offsets < _limit_in(sb.position, limit, p)

    def commit(
        self, position: dict, watermark: int | None = None, read_upto: dict | None = None, window: int | None = None
    ) -> None:
        """Publish `position`: called only once the checkpoint holding it is durable. First, per
        owned partition, a record on the positions side topic (offset, how far it was read, the
        checkpoint's watermark and window, and the rules carried over from earlier owners); only
        once the broker has acknowledged it, the offsets are committed to the group (with the
        same facts as commit metadata, for brokers that keep it). A member that takes the
        partition over skips what was trained."""
        self._set_durable(position, watermark, read_upto, window)
        if self._consumer is None:
            return
        if self._positions is not None:
            if not self._positions.write(list(self._durable_rec.values())):
                return  # no commit without its record: the checkpoint holds the position; the next one catches up
            self._side_ok = set(self._durable_rec)
        from kafka.structs import OffsetAndMetadata, TopicPartition

        offsets = {
            TopicPartition(self.topic, int(p)): OffsetAndMetadata(o, self._durable_meta.get(p, ""), -1)
            for p, o in self._durable.items()
        }
        try:
            self._consumer.commit(offsets)
        except Exception as e:  # the checkpoint still holds the position; the next commit catches up
            log.warning("offset commit failed: %s", e)

    def _set_durable(self, position: dict, watermark: int | None, read_upto: dict | None, window: int | None) -> None:
        """The durable position (a checkpoint's) and, per owned partition, its record."""
        upto = (read_upto or {}).get("offsets") or {}
        carry = position.get("carry") or {}
        offsets = position.get("offsets", {})
        # ranks: rank 0 publishes the position of every rank's partitions (merge_positions)
        mine = offsets if self.assignment is not None else self._owned(offsets)
        self._durable = {p: int(o) for p, o in mine.items()}
        self._durable_meta, self._durable_rec, self._side_ok = {}, {}, set()
        for p, o in self._durable.items():
            rec = {
                "group": self.group,
                "topic": self.topic,
                "partition": p,
                "offset": o,
                "member": self.member,
                "window": window,
                "written_at": time.time(),
            }
            if self._topic_id is not None:
                rec["topic_id"] = self._topic_id
            if watermark is not None and p in upto:
                rec |= {"read_upto": int(upto[p]), "watermark": int(watermark)}
            if carry.get(p):
                rec["skips"] = carry[p]
            self._durable_rec[p] = rec
            self._durable_meta[p] = _metadata(rec)

    def recover(
        self, position: dict, watermark: int | None = None, read_upto: dict | None = None, window: int | None = None
    ) -> None:
        """Called once at start, before reading, with the checkpoint the daemon resumed from. A
        daemon that died after writing that checkpoint but before its record reached the
        positions topic publishes the record now, before it rejoins the group: for each
        partition whose latest record is its own and older (or that has none), since then nobody
        else has checkpointed that partition. A member that owns the partition meanwhile takes
        it at this record at the rebalance this daemon's joining causes, and skips what it
        covers (unless it has already closed those windows itself)."""
        self.member = str(position.get("member") or self.member)
        self._set_durable(position, watermark, read_upto, window)
        if self._positions is None:
            return
        try:
            latest = self._positions.refresh()
        except Exception as e:
            log.warning("could not read %s at start (%s)", self._positions.name, e)
            return
        publish = []
        for p, rec in self._durable_rec.items():
            last = latest.get(p)
            if last is not None and last.get("member") != self.member:
                continue  # another member has checkpointed it since: its record stands
            if last is not None and (last.get("window") if last.get("window") is not None else -1) >= (
                window if window is not None else -1
            ):
                self._side_ok.add(p)  # published before the crash
                continue
            publish.append(rec)
        if publish and self._positions.write(publish):
            self._side_ok |= {r["partition"] for r in publish}
            log.info(
                "published the positions of checkpoint %s for partitions %s (not published before the restart)",
                window,
                [r["partition"] for r in publish],
            )

    def _drop_consumer(self) -> None:
        if self._consumer is not None:
            if self.assignment is None and self._assigned:
                self._rejoining = True  # a new consumer rejoins the group (see _give_up)
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
        if self._positions is not None:
            self._positions.close()
        if self._producer is not None:
            self._producer.close()
            self._producer = None


def _metadata(rec: dict) -> str:
    """Commit metadata for a positions record: the facts a new owner needs, compact (brokers cap
    metadata at a few kB)."""
    keep = {k: rec[k] for k in ("read_upto", "watermark", "skips", "topic_id") if k in rec}
    return json.dumps(keep, sort_keys=True, separators=(",", ":")) if keep else ""
