"""Publish a dataset to Kafka in event-time order (how a newcomer, the tests and the benchmarks
fill a broker). Every message carries the dataset's schema in its Arrow schema metadata
(`dimstream.schema.v1`), so a consumer without a declared [schema] adopts it.

Partitions: without a key, messages go round-robin over the topic's partitions; with
`key=COLUMN`, each source batch's rows are grouped by a stable hash of that column into one run
per partition (vectorised: one stable argsort per batch), so every row of a given key value
lands in the same partition, in event-time order, and each message is keyed by its partition's
hash bucket (header `key` names the column).
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from dimstream.stream.hashing import hash_ids
from dimstream.stream.kafka.wire import encode_arrow


def parse_kafka_url(url: str) -> tuple[str, str]:
    u = urlparse(url)
    if u.scheme != "kafka" or not u.hostname or not u.port or not u.path.strip("/"):
        raise ValueError(f"bad Kafka URL {url!r}: use kafka://HOST:PORT/TOPIC")
    return f"{u.hostname}:{u.port}", u.path.strip("/")


def ensure_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="dimstream-replay")
    try:
        if topic not in admin.list_topics():
            admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def key_partitions(column, partitions: int) -> np.ndarray:
    """The partition of every row: a stable hash of the key column (ints or strings), the same
    in every process."""
    return hash_ids(column, "dimstream-replay-key", partitions)


def split_by_key(rb: pa.RecordBatch, key: str, partitions: int) -> list[tuple[int, pa.RecordBatch]]:
    """`rb`'s rows grouped into one batch per partition of their key, each in the original
    (event-time) order."""
    part = key_partitions(rb.column(key), partitions)
    order = np.argsort(part, kind="stable")
    present, counts = np.unique(part[order], return_counts=True)
    grouped = rb.take(pa.array(order))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [(int(p), grouped.slice(int(lo), int(hi - lo))) for p, lo, hi in zip(present, bounds[:-1], bounds[1:])]


def replay(
    source,
    url: str,
    rows_per_message: int = 1000,
    speed: float | None = None,
    partitions: int = 1,
    max_rows: int | None = None,
    progress: bool = True,
    key: str | None = None,
) -> dict:
    """Send `source`'s rows as Arrow messages; speed None = as fast as possible, X = X times
    the event-time rate; key None = round-robin over partitions, else rows are partitioned by
    that column. Returns {"rows", "messages", "partitions"}."""
    from kafka import KafkaProducer

    bootstrap, topic = parse_kafka_url(url)
    ensure_topic(bootstrap, topic, partitions)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_request_size=64 << 20)
    n_parts = len(producer.partitions_for(topic) or ()) or partitions  # an existing topic keeps its count
    version = source.schema.fingerprint()
    rows = messages = 0
    t_wall, t_event = time.monotonic(), None
    bar = tqdm(unit="row", unit_scale=True, desc=f"replay -> {topic}", disable=not progress)
    try:
        for sb in source.read(None):
            if sb.batch is None:
                continue
            if key is None:
                runs = [(None, sb.batch)]
            else:
                if key not in sb.batch.schema.names:
                    raise ValueError(
                        f"--key {key!r} is not a column of the source (columns: {', '.join(sb.batch.schema.names)})"
                    )
                runs = split_by_key(sb.batch, key, n_parts)
            for part, run in runs:
                for start in range(0, run.num_rows, rows_per_message):
                    n = rows_per_message if max_rows is None else min(rows_per_message, max_rows - rows)
                    rb = run.slice(start, n)
                    if speed:
                        t0 = int(rb.column(source.schema.event_time)[0].as_py())
                        t_event = t_event if t_event is not None else t0
                        wait = (t0 - t_event) / speed - (time.monotonic() - t_wall)
                        if wait > 0:
                            time.sleep(wait)
                    value, headers = encode_arrow(rb, version, source.schema)  # the stream carries its schema
                    if part is None:  # round-robin
                        producer.send(topic, value=value, headers=headers, partition=messages % n_parts)
                    else:
                        producer.send(
                            topic,
                            value=value,
                            headers=headers + [("key", key.encode())],
                            key=str(part).encode(),
                            partition=part,
                        )
                    rows += rb.num_rows
                    messages += 1
                    bar.update(rb.num_rows)
                    if max_rows is not None and rows >= max_rows:
                        return {"rows": rows, "messages": messages, "partitions": n_parts}
    finally:
        producer.flush()
        producer.close()
        bar.close()
    return {"rows": rows, "messages": messages, "partitions": n_parts}
