"""Issue 12: Kafka record batches unpacked in bulk (stream/kafka/bulk.py) hand over exactly the
records kafka-python's own path does, with the same next_fetch_offset after every take, and
leave to that path what they do not cover; on a real broker (tansu), a topic of one JSON event
per message is read through them."""

import json
import random
import struct

import numpy as np
import pytest
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record import MemoryRecords, MemoryRecordsBuilder
from kafka.structs import TopicPartition

from dimstream.ops.replay import ensure_topic
from dimstream.stream.kafka import bulk, formats
from dimstream.stream.kafka.bulk import BulkPartitionRecords
from dimstream.stream.sources.kafka import KafkaSource
from tests.helpers import tiny_schema


def _batch(values, base=0, keys=None, headers=None, compression=0) -> bytes:
    b = MemoryRecordsBuilder(2, compression, 1 << 24)
    for i, v in enumerate(values):
        key = keys[i] if keys else None
        b.append(timestamp=1_700_000_000_000 + 7 * i, key=key, value=v, headers=(headers[i] if headers else []))
    b.close()
    buf = bytearray(b.buffer())
    struct.pack_into(">q", buf, 0, base)  # the batch's base offset (the CRC does not cover it)
    return bytes(buf)


def _read(cls, buf: bytes, fetch_offset: int = 0, take: int | None = None, check_crcs: bool = True):
    """Every record, and next_fetch_offset after each take, as the fetcher sees them."""
    part = cls(fetch_offset, TopicPartition("t", 3), MemoryRecords(buf), check_crcs=check_crcs)
    records, positions = [], []
    while part:
        got = part.take(take)
        if not got:
            break
        records += got
        positions.append(part.next_fetch_offset)
    return records, positions, part.next_fetch_offset


def _same_as_kafka_python(buf: bytes, **kw):
    ours = _read(BulkPartitionRecords, buf, **kw)
    assert ours == _read(Fetcher.PartitionRecords, buf, **kw)
    return ours


def test_batches_of_json_events_hand_over_the_same_records_and_positions():
    rng = random.Random(5)
    events = [json.dumps({"user": rng.randrange(10 ** rng.randrange(1, 12)), "x": rng.random()}) for _ in range(3000)]
    events = [e.encode() for e in events]
    sizes = [1000, 1, 1499, 500]
    bounds = np.cumsum([0] + sizes)
    buf = b"".join(_batch(events[lo:hi], base=lo) for lo, hi in zip(bounds[:-1], bounds[1:]))
    before = sum(bulk.FALLBACKS.values())
    for take in (None, 10_000, 333, 1):
        for fetch_offset in (0, 7, 1001, 2999):  # mid-batch: kafka-python skips the records before it
            records, positions, end = _same_as_kafka_python(buf, fetch_offset=fetch_offset, take=take)
            assert [r.offset for r in records] == list(range(fetch_offset, 3000)) and end == 3000
            assert [r.value for r in records] == events[fetch_offset:]
    assert sum(bulk.FALLBACKS.values()) == before  # all of it read in bulk


@pytest.mark.parametrize(
    "values",
    [
        [None if i % 7 == 0 else b"x" * i for i in range(300)],  # tombstones; 1- and 2-byte lengths
        [b""] * 40,
        [b"\x00" * (i % 300) for i in range(400)],  # zero bytes everywhere: candidate record starts
        [bytes(random.Random(i).randrange(256) for _ in range(i % 500)) for i in range(400)],
        [b"v" * 200_000, b"w" * 3, b"u" * 70_000],  # 3-byte lengths
    ],
    ids=["tombstones", "empty", "zeros", "binary", "large"],
)
def test_any_values_and_keys_are_read_as_kafka_python_reads_them(values):
    keys = [None if i % 3 else b"k%d" % i for i in range(len(values))]
    for take in (None, 17):
        records, _, _ = _same_as_kafka_python(_batch(values, keys=keys), take=take)
        assert [r.value for r in records] == values and [r.key for r in records] == keys


def test_headers_and_compressed_batches_go_to_kafka_pythons_path_for_the_rest_of_the_fetch():
    plain = _batch([b'{"a": 1}'] * 5)
    with_headers = _batch([b"a", b"b"], base=5, headers=[[("format", b"jsonl")], []])
    gzip = _batch([b"c" * 100, b"d"], base=7, compression=1)
    before = dict(bulk.FALLBACKS)
    records, _, end = _same_as_kafka_python(plain + with_headers + gzip + _batch([b"{}"] * 5, base=9))
    assert [r.offset for r in records] == list(range(14)) and end == 14
    assert records[5].headers == [("format", b"jsonl")] and records[8].value == b"d"
    assert bulk.FALLBACKS["headers"] == before.get("headers", 0) + 1


def test_a_corrupt_batch_raises_what_kafka_python_raises(caplog):
    buf = bytearray(_batch([b'{"a": 1}', b'{"a": 2}']))
    buf[-3] ^= 0xFF  # a value byte: the CRC no longer matches
    for cls in (Fetcher.PartitionRecords, BulkPartitionRecords):
        with pytest.raises(CorruptRecordError, match="crc"):
            _read(cls, bytes(buf))
    buf = bytearray(_batch([b'{"a": 1}', b'{"a": 2}']))
    buf[61] += 2  # the first record's length: the records no longer add up (CRC not checked)
    errors = []
    for cls in (Fetcher.PartitionRecords, BulkPartitionRecords):
        with pytest.raises(CorruptRecordError) as e:
            _read(cls, bytes(buf), check_crcs=False)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert bulk.FALLBACKS["unexpected"] >= 1 and "read by kafka-python's own path" in caplog.text


def test_an_error_after_good_batches_comes_on_the_next_take_as_kafka_pythons():
    """take hands a batch read in bulk over by slices; an error met after some records is
    raised by the next take, after those records, as kafka-python's record iterator does."""
    good = _batch([b'{"a": %d}' % i for i in range(50)])
    bad = bytearray(_batch([b'{"a": 1}', b'{"a": 2}'], base=50))
    bad[-3] ^= 0xFF  # the CRC no longer matches
    seen = []
    for cls in (Fetcher.PartitionRecords, BulkPartitionRecords):
        part = cls(0, TopicPartition("t", 3), MemoryRecords(good + bytes(bad)), check_crcs=True)
        first = part.take(20)
        positions = [part.next_fetch_offset]
        rest = part.take()
        positions.append(part.next_fetch_offset)
        with pytest.raises(CorruptRecordError, match="crc"):
            part.take()
        seen.append(([r.offset for r in first + rest], positions))
    assert seen[0] == seen[1] == (list(range(50)), [20, 50])


def test_a_kafka_source_reads_a_json_event_topic_in_bulk(broker):
    from confluent_kafka import Producer

    ensure_topic(broker.bootstrap, "bulk-events", 1)
    n = 2000
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    for i in range(n):
        event = {"user": i % 50, "item": i, "label": i % 2, "event_time": 100 + i}
        p.produce("bulk-events", value=json.dumps(event).encode())
    assert p.flush(30) == 0
    del p
    src = KafkaSource(broker.bootstrap, "bulk-events", tiny_schema(), group="bulk")
    before, got, last = sum(bulk.FALLBACKS.values()), [], None
    for sb in src.read(None):
        if sb.batch is not None:
            got += sb.batch.column("item").to_pylist()
            last = sb.next_position
        if len(got) >= n:
            break
    assert isinstance(src._consumer._fetcher.PartitionRecords, type)
    assert src._consumer._fetcher.PartitionRecords is BulkPartitionRecords
    src.close()
    assert got == list(range(n)) and last["offsets"] == {"0": n}
    assert sum(bulk.FALLBACKS.values()) == before


# --- the JSON of one poll, parsed in blocks on every core (stream/kafka/formats.py) ----------


def test_only_headerless_single_line_objects_take_the_one_call_path():
    ok = [b'{"a": 1}', b'{"a": 2}']
    assert formats._one_event_each(ok, [[], None]) == (b'{"a": 1}\n{"a": 2}', 8)  # and the longest
    for values, headers in [
        (ok, [[("format", b"jsonl")], []]),  # a header: per message
        ([b'{"a": 1}', b'{"a": 2}\n{"a": 3}'], [None, None]),  # JSON lines in one message
        ([b'{"a": 1}', b""], [None, None]),  # an empty value
        ([b'{"a": 1}', None], [None, None]),  # a tombstone
        ([b'{"a": 1}', b'["a"]'], [None, None]),  # not an object
    ]:
        assert formats._one_event_each(values, headers) is None
    pieces = formats.decode_values([b'{"a": 1}', b"", b'{"a": 2}'])
    assert [(p.lo, p.hi, p.error.reason if p.error else p.rb.num_rows) for p in pieces] == [
        (0, 1, 1),
        (1, 2, "empty_message"),
        (2, 3, 1),
    ]
