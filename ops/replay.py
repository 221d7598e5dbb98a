"""Publish a dataset to Kafka in event-time order (how a newcomer, the tests and the benchmarks
fill a broker)."""
from __future__ import annotations

import time
from urllib.parse import urlparse

from tqdm import tqdm

from stream.kafka.wire import encode_arrow


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


def replay(source, url: str, rows_per_message: int = 1000, speed: float | None = None,
           partitions: int = 1, max_rows: int | None = None, progress: bool = True) -> dict:
    """Send `source`'s rows as Arrow messages; speed None = as fast as possible, X = X times
    the event-time rate. Returns {"rows", "messages"}."""
    from kafka import KafkaProducer
    bootstrap, topic = parse_kafka_url(url)
    ensure_topic(bootstrap, topic, partitions)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_request_size=64 << 20)
    version = source.schema.fingerprint()
    rows = messages = 0
    t_wall, t_event = time.monotonic(), None
    bar = tqdm(unit="row", unit_scale=True, desc=f"replay -> {topic}", disable=not progress)
    try:
        for sb in source.read(None):
            if sb.batch is None:
                continue
            for start in range(0, sb.batch.num_rows, rows_per_message):
                rb = sb.batch.slice(start, rows_per_message)
                if speed:
                    t0 = int(rb.column(source.schema.event_time)[0].as_py())
                    t_event = t_event if t_event is not None else t0
                    wait = (t0 - t_event) / speed - (time.monotonic() - t_wall)
                    if wait > 0:
                        time.sleep(wait)
                value, headers = encode_arrow(rb, version)
                producer.send(topic, value=value, headers=headers)
                rows += rb.num_rows
                messages += 1
                bar.update(rb.num_rows)
                if max_rows is not None and rows >= max_rows:
                    return {"rows": rows, "messages": messages}
    finally:
        producer.flush()
        producer.close()
        bar.close()
    return {"rows": rows, "messages": messages}
