"""Kafka ingest: rows/s from a real broker (tansu) through Arrow decoding into KeyedJaggedTensors,
without training, for the Criteo-shaped stream at 1, 1000 and 8192 rows per message; and the
ratio to the training rate of benchmarks/results/training.json.

Writes benchmarks/results/kafka_ingest.json.  Run: .venv/bin/python benchmarks/kafka_ingest.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from training import criteo_source  # a sibling script (sys.path[0] is benchmarks/)  # isort: skip

from dimstream.ops.replay import replay
from dimstream.stream.decode import Decoder
from dimstream.stream.kafka.tansu import Broker
from dimstream.stream.sources.kafka import KafkaSource

ROOT = Path(__file__).resolve().parents[1]

ROWS = {1: 20_000, 1000: 200_000, 8192: 200_000}
DEFAULT_ROWS_PER_MESSAGE = 1000  # dimstream replay's default


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
    kafka = KafkaSource(broker.bootstrap, topic, src.schema, group=f"bench{rows_per_message}")
    dec = Decoder(src.schema)
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
    broker = Broker()
    try:
        rates = {n: ingest(broker, n, rows) for n, rows in ROWS.items()}
    finally:
        broker.stop()
    training = ROOT / "benchmarks" / "results" / "training.json"
    train_rate = json.loads(training.read_text())["bare_train_rows_per_s"] if training.exists() else None
    result = {
        "what": "Criteo-shaped rows from tansu through Arrow decoding to KeyedJaggedTensors (batch 2048), no training",
        "rows_per_s_by_rows_per_message": {str(k): v for k, v in rates.items()},
        "bare_train_rows_per_s": train_rate,
    }
    if train_rate:
        ratio = rates[DEFAULT_ROWS_PER_MESSAGE] / train_rate
        result["ingest_over_training_at_default_message_size"] = ratio
        result["checks"] = {"ingest_at_least_5x_training": ratio >= 5}
    out = ROOT / "benchmarks" / "results" / "kafka_ingest.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
