"""`dimstream replay` against a real Kafka-protocol broker (tansu), read back with kafka-python."""
import numpy as np
import pyarrow as pa
import pytest

from ops.replay import replay
from stream.kafka.wire import WireError, decode_message, encode_arrow
from stream.sources.movielens import MovieLensSource
from tests.helpers import ML100K
from tests.kafka_broker import Broker


@pytest.fixture(scope="module")
def broker():
    b = Broker()
    yield b
    b.stop()


def _consume(bootstrap, topic, expected_messages, version):
    from kafka import KafkaConsumer
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                      consumer_timeout_ms=10_000, group_id=None)
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
