"""`dimstream replay` against a real Kafka-protocol broker (tansu), read back with kafka-python."""

import numpy as np
import pyarrow as pa
import pytest

from dimstream.ops.replay import replay
from dimstream.stream.kafka.wire import WireError, decode_message, encode_arrow
from dimstream.stream.sources.movielens import MovieLensSource
from tests.helpers import ML100K


def _consume(bootstrap, topic, expected_messages, version):
    from kafka import KafkaConsumer

    c = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=10_000,
        group_id=None,
    )
    batches = []
    for msg in c:
        batches.append(decode_message(msg.value, msg.headers, version))
        if len(batches) == expected_messages:
            break
    c.close()
    return pa.Table.from_batches(batches)


def test_wire_refuses_garbage_and_other_schemas():
    value, headers = encode_arrow(pa.record_batch({"x": [1]}), "v1")
    with pytest.raises(WireError) as e:
        decode_message(value, headers, "v2")
    assert e.value.reason == "unknown_schema"
    with pytest.raises(WireError) as e:
        decode_message(b"not arrow at all", headers, "v1")
    assert e.value.reason == "corrupt_input"


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason=f"MovieLens-100k not at {ML100K}")
def test_replay_of_ml100k_arrives_whole_and_in_event_time_order(broker):
    src = MovieLensSource(ML100K)
    done = replay(src, f"kafka://{broker.bootstrap}/ml100k", rows_per_message=1000, progress=False)
    assert done["rows"] == 100_000 and 100 <= done["messages"] <= 113  # 1000-row chunks of 8192-row batches
    got = _consume(broker.bootstrap, "ml100k", done["messages"], src.schema.fingerprint())
    assert got.num_rows == 100_000
    t = got.column("event_time").to_numpy()
    assert (np.diff(t) >= 0).all()
    assert got.column("label").to_numpy().sum() == src.table.column("label").to_numpy().sum()
    assert got.column("genres").to_pylist()[:50] == src.table.column("genres").to_pylist()[:50]


def _by_partition(bootstrap, topic, partitions, rows):
    """Every message of `topic` read back, as {partition: [(key, RecordBatch), ...]}."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    c = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=10_000,
        group_id=None,
    )
    c.assign([TopicPartition(topic, p) for p in range(partitions)])
    got, n = {p: [] for p in range(partitions)}, 0
    for msg in c:
        rb = decode_message(msg.value, msg.headers, None)
        got[msg.partition].append((msg.key, dict(msg.headers), rb))
        n += rb.num_rows
        if n >= rows:
            break
    c.close()
    return got


def test_replay_by_key_puts_every_row_of_a_key_value_in_one_partition(broker, capsys):
    from dimstream.ops.cli import main

    url = f"kafka://{broker.bootstrap}/bykey"
    assert (
        main(
            [
                "replay",
                "--source",
                "synthetic",
                "--to",
                url,
                "--partitions",
                "3",
                "--key",
                "user_id",
                "--rows-per-message",
                "100",
                "--max-rows",
                "6000",
            ]
        )
        == 0
    )
    assert "6,000 rows" in capsys.readouterr().out
    got = _by_partition(broker.bootstrap, "bykey", 3, 6000)
    users = {p: np.concatenate([rb.column("user_id").to_numpy() for _, _, rb in got[p]]) for p in got}
    assert sum(len(u) for u in users.values()) == 6000  # row count preserved
    assert all(len(u) > 500 for u in users.values())  # the hash spreads keys over all 3 partitions
    seen = {}
    for p, u in users.items():
        for v in np.unique(u):
            assert seen.setdefault(int(v), p) == p, f"user {v} in partitions {seen[int(v)]} and {p}"
    # a message holds rows of one partition's keys only, keyed by that partition's hash bucket
    from dimstream.ops.replay import key_partitions

    for p, msgs in got.items():
        for key, headers, rb in msgs:
            assert key == str(p).encode() and headers["key"] == b"user_id"
            assert (key_partitions(rb.column("user_id"), 3) == p).all()
            t = rb.column("event_time").to_numpy()
            assert (np.diff(t) >= 0).all()  # event-time order kept inside a partition's run


def test_replay_without_key_is_round_robin(broker):
    from dimstream.stream.synthetic import SyntheticSource

    done = replay(
        SyntheticSource(seed=1, rows_per_window=2000, window_seconds=3600),
        f"kafka://{broker.bootstrap}/rr",
        rows_per_message=100,
        partitions=3,
        max_rows=3000,
        progress=False,
    )
    assert done == {"rows": 3000, "messages": 30, "partitions": 3}
    got = _by_partition(broker.bootstrap, "rr", 3, 3000)
    assert [len(got[p]) for p in range(3)] == [10, 10, 10]
    assert all(key is None for p in got for key, _, _ in got[p])


def test_replay_refuses_a_key_that_is_not_a_column(broker, capsys):
    from dimstream.ops.cli import main

    assert (
        main(
            [
                "replay",
                "--source",
                "synthetic",
                "--to",
                f"kafka://{broker.bootstrap}/nokey",
                "--key",
                "no_such_column",
                "--max-rows",
                "10",
            ]
        )
        == 2
    )
    assert "no_such_column" in capsys.readouterr().err
