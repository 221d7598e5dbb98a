"""Lateness on a real broker (tansu): a late message that arrives in one poll with the messages
that passed its window is dead-lettered as "late", as it would be in a later poll, not trained
in its window (stream/window.py judges lateness per message, SourceBatch.message_rows)."""

import json

import numpy as np
import pyarrow as pa

from dimstream.ops.replay import ensure_topic
from dimstream.stream.deadletter import read as read_deadletters
from dimstream.stream.decode import Decoder
from dimstream.stream.kafka.wire import encode_arrow
from dimstream.stream.sources.kafka import KafkaSource
from dimstream.stream.window import Windower
from tests.helpers import kafka_run_config, run_collecting, tiny_batch, tiny_schema

# (first rid, event times) per message, 60 s windows: the third message's first row belongs to
# window 0, which the second message has passed; the last message passes window 1
MESSAGES = [(0, [0, 10, 20, 30]), (4, [60, 65, 70]), (7, [5, 75]), (9, [80, 90]), (11, [130, 140])]
LATE = 7
ROWS = sum(len(t) for _, t in MESSAGES)


def _rows(rid: int, times: list[int]) -> pa.RecordBatch:
    b = tiny_batch(len(times), seed=rid, ids=np.arange(rid, rid + len(times)))
    return b.set_column(b.schema.get_field_index("event_time"), "event_time", pa.array(np.array(times, np.int64)))


def _produce_arrow(bootstrap: str, topic: str) -> None:
    from kafka import KafkaProducer

    schema = tiny_schema()
    ensure_topic(bootstrap, topic, 1)  # one partition: messages in the order sent
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for rid, times in MESSAGES:
        value, headers = encode_arrow(_rows(rid, times), schema.fingerprint(), schema)
        p.send(topic, value=value, headers=headers, partition=0)
    p.flush()
    p.close()


def _produce_json(bootstrap: str, topic: str) -> None:
    """One JSON event per message, no headers: the bulk JSON path (one row per message)."""
    from kafka import KafkaProducer

    ensure_topic(bootstrap, topic, 1)
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for rid, times in MESSAGES:
        for row in _rows(rid, times).to_pylist():
            row["rid"] = row.pop("row_id")
            p.send(topic, value=json.dumps(row).encode(), partition=0)
    p.flush()
    p.close()


class RecordingKafkaSource(KafkaSource):
    """The Kafka source, remembering how many messages each data batch was made of."""

    def read(self, position):
        self.batches = []
        for sb in super().read(position):
            if sb.batch is not None:
                self.batches.append(sb.message_rows.tolist() if sb.message_rows is not None else [sb.batch.num_rows])
            yield sb


def _window_loop(bootstrap: str, topic: str, id_column: str):
    src = RecordingKafkaSource(bootstrap, topic, tiny_schema(), group=f"{topic}-g", dlq=False)
    trained, late, details = [], [], []
    try:
        for w in Windower(src, Decoder(src.schema), 60, idle_timeout=2.0).windows():
            trained += w.table.column(id_column).to_pylist() if w.table is not None else []
            for rej in w.rejected:
                if rej.reason == "late":
                    late += rej.rows.column(id_column).to_pylist()
                    details.append(rej.detail)
            if len(trained) + len(late) == ROWS:
                break
    finally:
        src.close()
    return src.batches, sorted(trained), late, details


def test_a_late_arrow_message_in_one_poll_with_the_messages_that_passed_it_is_late(broker):
    _produce_arrow(broker.bootstrap, "late-arrow")
    batches, trained, late, details = _window_loop(broker.bootstrap, "late-arrow", "row_id")
    assert batches == [[len(t) for _, t in MESSAGES]]  # one poll: every message in one batch
    assert late == [LATE] and trained == [r for r in range(ROWS) if r != LATE]
    assert details == ["window [0, 60) already passed by the watermark 70 of earlier messages"]


def test_a_late_json_event_in_one_poll_with_the_events_that_passed_it_is_late(broker):
    _produce_json(broker.bootstrap, "late-json")
    batches, trained, late, _ = _window_loop(broker.bootstrap, "late-json", "rid")
    assert batches == [[1] * ROWS]  # one poll, one row per message, decoded in bulk
    assert late == [LATE] and trained == [r for r in range(ROWS) if r != LATE]


def test_the_daemon_dead_letters_the_late_row_and_trains_the_rest_once(broker, tmp_path):
    _produce_arrow(broker.bootstrap, "late-run")
    cfg = kafka_run_config(
        f"kafka://{broker.bootstrap}/late-run?group=lr",
        tmp_path / "state",
        3,
        window_seconds=60,
        schema=tiny_schema().to_dict(),
        idle_timeout=3,
    )
    trained = np.concatenate(run_collecting(cfg, "row_id")).tolist()
    assert sorted(trained) == [r for r in range(ROWS) if r != LATE]
    letters = [read_deadletters(p) for p in sorted((tmp_path / "state" / "deadletter").glob("window-*.arrow"))]
    rows = [
        (reason, json.loads(row)["row_id"])
        for t in letters
        for reason, row in zip(t.column("reason").to_pylist(), t.column("row").to_pylist(), strict=True)
    ]
    assert rows == [("late", LATE)]
