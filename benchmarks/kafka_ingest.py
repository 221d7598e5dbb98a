"""Kafka ingest: rows/s from a real broker (tansu) through Arrow decoding into KeyedJaggedTensors,
without training, for the Criteo-shaped stream at 1, 1000 and 8192 rows per message; the same
rows as JSON, one event per message and no headers (a foreign producer's event topic, written by
confluent-kafka), its record batches unpacked in bulk (stream/kafka/bulk.py) and its JSON decoded
in bulk across each poll (best of 3 runs), with where a JSON row's time goes; and the ratios to
the training rate of benchmarks/results/training.json.

Writes benchmarks/results/kafka_ingest.json.  Run: .venv/bin/python benchmarks/kafka_ingest.py
(`--json-only`: only the JSON figures, keeping the Arrow ones of the last full run).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from training import criteo_source  # a sibling script (sys.path[0] is benchmarks/)  # isort: skip

from dimstream.ops.replay import replay
from dimstream.stream.decode import Decoder
from dimstream.stream.kafka.formats import declared_columns, decode_values
from dimstream.stream.kafka.tansu import Broker
from dimstream.stream.sources.kafka import KafkaSource

ROOT = Path(__file__).resolve().parents[1]

ROWS = {1: 20_000, 1000: 200_000, 8192: 200_000}
JSON_ROWS = 20_000  # one JSON event per message
DEFAULT_ROWS_PER_MESSAGE = 1000  # dimstream replay's default
RUNS = 3  # JSON figures: the best of 3 runs (the machine is shared: the best is the least disturbed)


class _Capped:
    """The first `n` rows of a source (the synthetic stream is endless)."""

    def __init__(self, src, n):
        self.src, self.n, self.schema = src, n, src.schema

    def read(self, position):
        sent = 0
        for sb in self.src.read(position):
            if sent >= self.n:
                return
            sb.batch = sb.batch.slice(0, self.n - sent)
            sent += sb.batch.num_rows
            yield sb


def ingest(broker: Broker, rows_per_message: int, rows: int) -> float:
    topic = f"ingest{rows_per_message}"
    src = criteo_source()
    replay(_Capped(src, rows), f"kafka://{broker.bootstrap}/{topic}", rows_per_message=rows_per_message, progress=False)
    return consume(broker, topic, src.schema, rows)


def json_events(rows: int) -> tuple[list[bytes], object]:
    """Criteo-shaped rows as JSON values, one event each, and their schema."""
    src = criteo_source()
    return [json.dumps(r).encode() for sb in _Capped(src, rows).read(None) for r in sb.batch.to_pylist()], src.schema


def ingest_json(broker: Broker, rows: int, runs: int = RUNS) -> float:
    """One JSON object per message, no headers, produced by librdkafka (confluent-kafka); the
    best of `runs` reads of the topic (each by a consumer group of its own)."""
    from confluent_kafka import Producer

    values, schema = json_events(rows)
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
    for value in values:
        p.produce("ingest-json", value=value)
        p.poll(0)
    assert p.flush(60) == 0
    del p
    return max(consume(broker, "ingest-json", schema, rows, group=f"bench-ingest-json-{r}") for r in range(runs))


def json_per_message(rows: int) -> float:
    """For comparison: one read_json call per message (what bulk decoding avoids)."""
    from dimstream.stream.kafka.formats import decode_json

    values, _ = json_events(rows)
    t0 = time.perf_counter()
    for v in values:
        decode_json(v)
    return rows / (time.perf_counter() - t0)


def json_decode_only(rows: int, poll: int = 10_000) -> tuple[float, dict]:
    """dimstream's own share of JSON ingest, without the broker and the consumer: polls of
    `poll` values (kafka-python's max_poll_records) through formats.decode_values, the Decoder
    and KeyedJaggedTensors; and the time of each stage (us a row)."""
    values, schema = json_events(rows)
    dec = Decoder(schema)
    columns = declared_columns(schema)  # as the source passes them: the canonical column order
    split = dict.fromkeys(("decode_values", "decoder", "to_kjt"), 0.0)
    t0 = time.perf_counter()
    for start in range(0, rows, poll):
        t = time.perf_counter()
        pieces = decode_values(values[start : start + poll], columns=columns)
        split["decode_values"] += time.perf_counter() - t
        for piece in pieces:
            t = time.perf_counter()
            batch = dec.decode(piece.rb).batch
            split["decoder"] += time.perf_counter() - t
            t = time.perf_counter()
            for s in range(0, len(batch), 2048):
                batch.slice(s, min(s + 2048, len(batch))).to_kjt()
            split["to_kjt"] += time.perf_counter() - t
    rate = rows / (time.perf_counter() - t0)
    return rate, {k: v * 1e6 / rows for k, v in split.items()}


def record_batches_us_per_record(rows: int, per_batch: int = 1500) -> dict:
    """Unpacking the JSON events' Kafka record batches (uncompressed, ~1 MB each, as librdkafka
    sends them) into ConsumerRecords: kafka-python's own path and stream/kafka/bulk.py's."""
    from kafka.consumer.fetcher import Fetcher
    from kafka.record import MemoryRecords, MemoryRecordsBuilder
    from kafka.structs import TopicPartition

    from dimstream.stream.kafka.bulk import BulkPartitionRecords

    values, _ = json_events(rows)
    buf = b""
    for lo in range(0, rows, per_batch):
        b = MemoryRecordsBuilder(2, 0, 1 << 24)
        for i, v in enumerate(values[lo : lo + per_batch]):
            b.append(timestamp=1_700_000_000_000 + i, key=None, value=v, headers=[])
        b.close()
        buf += b.buffer()  # base offsets all 0: neither path checks their order
    out = {}
    for name, cls in (("kafka_python", Fetcher.PartitionRecords), ("bulk", BulkPartitionRecords)):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            part = cls(0, TopicPartition("t", 0), MemoryRecords(buf), check_crcs=True)
            assert len(part.take()) == rows
            best = min(best, time.perf_counter() - t0)
        out[name] = best * 1e6 / rows
    return out


def consume(broker: Broker, topic: str, schema, rows: int, group: str | None = None) -> float:
    kafka = KafkaSource(broker.bootstrap, topic, schema, group=group or f"bench-{topic}")
    dec = Decoder(schema)
    got, t0 = 0, None
    for sb in kafka.read(None):
        if sb.batch is None:
            continue
        t0 = t0 or time.perf_counter()  # from the first message: group join is not ingest
        batch = dec.decode(sb.batch).batch
        for s in range(0, len(batch), 2048):
            batch.slice(s, min(s + 2048, len(batch))).to_kjt()
        got += len(batch)
        if got >= rows:
            break
    kafka.close()
    return got / (time.perf_counter() - t0)


def main() -> None:
    """All figures; with --json-only, only the JSON ones, the Arrow ones kept from the last run."""
    json_only = "--json-only" in sys.argv[1:]
    out = ROOT / "benchmarks" / "results" / "kafka_ingest.json"
    broker = Broker()
    try:
        if json_only:
            rates = {int(k): v for k, v in json.loads(out.read_text())["rows_per_s_by_rows_per_message"].items()}
        else:
            rates = {n: ingest(broker, n, rows) for n, rows in ROWS.items()}
        load_arrow = os.getloadavg()[0]
        json_rate = ingest_json(broker, JSON_ROWS)
    finally:
        broker.stop()
    decode_rate, split = max((json_decode_only(JSON_ROWS) for _ in range(RUNS)), key=lambda r: r[0])
    unpack = record_batches_us_per_record(JSON_ROWS)
    per_message_rate = json_per_message(JSON_ROWS // 4)
    training = ROOT / "benchmarks" / "results" / "training.json"
    train_rate = json.loads(training.read_text())["bare_train_rows_per_s"] if training.exists() else None
    result = {
        "what": "Criteo-shaped rows from tansu through Arrow decoding to KeyedJaggedTensors (batch 2048), no training",
        "rows_per_s_by_rows_per_message": {str(k): v for k, v in rates.items()},
        "json_one_event_per_message_rows_per_s": json_rate,
        "json_decode_only_rows_per_s": decode_rate,
        "json_read_json_per_message_rows_per_s": per_message_rate,  # parsing alone, one call per message
        # where a JSON row's time goes (us a row, no broker): the consumer's unpacking of record
        # batches, by kafka-python's own path and by stream/kafka/bulk.py's (the one used), then
        # decode_values (pyarrow.json), the Decoder and KeyedJaggedTensors
        "json_us_per_row": {"record_batches": unpack, **split},
        # the end-to-end time a row not in those stages: fetch round trips to the broker, kafka-python's
        # network thread, the source's own per-poll work
        "json_us_per_row_outside_those_stages": 1e6 / json_rate - unpack["bulk"] - sum(split.values()),
        "bare_train_rows_per_s": train_rate,
        # the machine is shared: a load above its cores depresses these rates (training's was measured apart)
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"json": os.getloadavg()[0]},
    }
    previous = json.loads(out.read_text()) if out.exists() else {}
    result["load_average_1min"]["arrow"] = (
        previous.get("load_average_1min", {}).get("arrow") if json_only else load_arrow
    )
    if train_rate:
        ratio = rates[DEFAULT_ROWS_PER_MESSAGE] / train_rate
        result["ingest_over_training_at_default_message_size"] = ratio
        result["json_one_event_per_message_over_training"] = json_rate / train_rate
        result["json_decode_only_over_training"] = decode_rate / train_rate
        result["checks"] = {
            "ingest_at_least_5x_training": ratio >= 5,
            "json_one_event_per_message_at_least_5x_training": json_rate / train_rate >= 5,
        }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
