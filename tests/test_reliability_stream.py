"""Bad input found by probing the daemon: it becomes dead letters with a reason, never an
exception that stops the window loop (real Arrow, real sources; no mocks)."""

import logging
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dimstream.stream.decode import REASONS, Decoder
from dimstream.stream.hashing import hash_ids
from dimstream.stream.kafka.wire import WireError, decode_message, encode_arrow, encode_jsonl
from dimstream.stream.schema import FieldSpec, Schema, SchemaError
from dimstream.stream.sources.base import Source, SourceBatch, row_position
from dimstream.stream.sources.files import FilesSource, schema_from_config
from dimstream.stream.synthetic import SyntheticSource
from dimstream.stream.window import Windower, detached
from tests.helpers import ML100K, tiny_batch, tiny_schema

T0 = 1_700_000_000 // 3600 * 3600  # an hour boundary in 2023
YEAR_2100 = 4_102_444_800


class ListSource(Source):
    """A finite in-memory source of real Arrow batches."""

    name = "list"

    def __init__(self, batches, schema=None):
        self.batches, self.schema = batches, schema or tiny_schema()

    def read(self, position):
        start = position["row"] if position else 0
        for i in range(start, len(self.batches)):
            yield SourceBatch(self.batches[i], row_position(i), row_position(i + 1))


def _with(rb: pa.RecordBatch, **columns) -> pa.RecordBatch:
    for name, arr in columns.items():
        rb = rb.set_column(rb.schema.get_field_index(name), name, arr)
    return rb


def _timed(n, seed, t0, step=10):
    b = tiny_batch(n, seed=seed)
    return _with(b, event_time=pa.array(t0 + np.arange(n, dtype=np.int64) * step))


def _counts(ws):
    out = {}
    for w in ws:
        for k, v in w.rejected_counts.items():
            out[k] = out.get(k, 0) + v
    return out


# --- 1. batches of one window with different Arrow types concatenate --------------------------


def test_window_concatenates_batches_whose_arrow_types_differ():
    a = _timed(40, 0, T0)  # label int8, user int64, price float64
    b = _timed(40, 1, T0 + 600)
    b = _with(
        b,
        label=b.column("label").cast(pa.int64()),
        user=b.column("user").cast(pa.int32()),
        price=pa.array([str(x) for x in b.column("price").to_pylist()[:-1]] + ["not a number"]),
    )
    c = _timed(30, 2, T0 + 1200)
    rows = [{k: v for k, v in r.items() if k != "tags"} | {"tags": r["tags"]} for r in c.to_pylist()]
    value, headers = encode_jsonl(rows, "v")  # a JSON-lines message among Arrow ones
    c = decode_message(value, headers, "v")
    assert c.schema.field("label").type == pa.int64()
    ws = list(Windower(ListSource([a, b, c]), Decoder(tiny_schema()), 3600).windows())
    assert len(ws) == 1
    w = ws[0]
    assert len(w.batch) == w.table.num_rows == 40 + 39 + 30
    assert w.rejected_counts == {"wrong_type": 1}
    assert w.rejected[0].rows.column("price").to_pylist() == ["not a number"]  # dead letter: raw value
    assert w.table.schema.field("label").type == pa.int8()
    assert w.table.schema.field("event_time").type == pa.int64()
    assert w.table.schema.field("price").type == pa.float64()
    assert "wrong_type" in REASONS


def test_numeric_strings_decode_like_numbers():
    b = _timed(20, 3, T0)
    s = _with(
        b,
        label=pa.array([str(v) for v in b.column("label").to_pylist()]),
        price=pa.array([str(v) for v in b.column("price").to_pylist()]),
        event_time=pa.array([str(v) for v in b.column("event_time").to_pylist()]),
    )
    d = Decoder(tiny_schema())
    x, y = d.decode(b), d.decode(s)
    assert len(y.batch) == 20 and y.rejected_counts == {}
    for k in x.batch.keys:
        assert x.batch.values[k].tolist() == y.batch.values[k].tolist()
    assert x.batch.labels.tolist() == y.batch.labels.tolist()
    assert x.batch.event_time.tolist() == y.batch.event_time.tolist()
    assert x.table.schema == y.table.schema


def test_extra_columns_of_different_types_still_concatenate():
    a = _timed(10, 0, T0).append_column("p_true", pa.array(np.full(10, 0.5, np.float32)))
    b = _timed(10, 1, T0 + 200).append_column("p_true", pa.array(["x"] * 10))
    ws = list(Windower(ListSource([a, b]), Decoder(tiny_schema()), 3600).windows())
    assert len(ws) == 1 and ws[0].table.num_rows == 20


# --- 2. single bad messages or rows ------------------------------------------------------------


def test_tombstone_and_blank_messages_are_empty_message():
    for value, fmt in [(None, b"arrow"), (None, b"jsonl"), (b"\n\n  \n", b"jsonl"), (b"", b"arrow")]:
        with pytest.raises(WireError) as e:
            decode_message(value, [("format", fmt), ("schema_version", b"v")], "v")
        assert e.value.reason == "empty_message", (value, fmt)
    assert "empty_message" in REASONS
    value, headers = encode_arrow(tiny_batch(3), "v")  # good messages still decode
    assert decode_message(value, headers, "v").num_rows == 3


def test_event_time_beyond_2_53_and_milliseconds_are_bad_event_time():
    d = Decoder(tiny_schema())
    b = _timed(6, 0, T0)
    times = [T0, 2**53 + 1, 2**62, T0 * 1000, -5, T0 + 1]
    for col in (pa.array(times, pa.int64()), pa.array([float(t) for t in times]), pa.array([str(t) for t in times])):
        r = d.decode(_with(b, event_time=col))
        assert r.rejected_counts == {"bad_event_time": 4}, col.type
        assert r.batch.event_time.tolist() == [T0, T0 + 1]
    ts = pa.array(np.array([T0, 2**40], "datetime64[s]")).cast(pa.timestamp("s"))
    assert d.decode(_with(tiny_batch(2), event_time=ts)).rejected_counts == {"bad_event_time": 1}


def test_event_time_unit_converts_only_when_declared():
    ms = Schema(tiny_schema().fields, event_time_unit="ms")
    us = Schema(tiny_schema().fields, event_time_unit="us")
    b = _with(tiny_batch(3), event_time=pa.array([T0 * 1000, T0 * 1000 + 1500, T0 * 1000 + 999]))
    assert Decoder(tiny_schema()).decode(b).rejected_counts == {"bad_event_time": 3}
    r = Decoder(ms).decode(b)
    assert r.batch.event_time.tolist() == [T0, T0 + 1, T0]
    assert Decoder(ms).decode(r.table).batch.event_time.tolist() == [T0, T0 + 1, T0]  # recent rows decode again
    b_us = _with(tiny_batch(1), event_time=pa.array([T0 * 10**6 + 7]))
    assert Decoder(us).decode(b_us).batch.event_time.tolist() == [T0]
    # round trip, and the fingerprint of schemas that do not set it is the one from before
    assert Schema.from_dict(ms.to_dict()) == ms and Schema.from_dict(tiny_schema().to_dict()) == tiny_schema()
    # fingerprints computed with the schema module from before the option: unchanged
    assert tiny_schema().fingerprint() == "e40a84ea637ae91a"
    assert SyntheticSource(seed=0).schema.fingerprint() == "05ff4b0b8c9c341a"
    assert ms.fingerprint() != tiny_schema().fingerprint()
    assert schema_from_config(ms.to_dict()) == ms
    with pytest.raises(SchemaError):
        Schema(tiny_schema().fields, event_time_unit="ns")


def test_window_loop_survives_bad_event_times_and_formats_every_window_start():
    good = _timed(20, 0, T0)
    ms = _with(_timed(5, 1, T0), event_time=pa.array(np.arange(5, dtype=np.int64) + T0 * 1000))
    huge = _with(_timed(3, 2, T0), event_time=pa.array([2**60, 2**53 + 1, 2**62], pa.int64()))
    ws = list(Windower(ListSource([good, ms, huge, _timed(20, 3, T0 + 3600)]), Decoder(tiny_schema()), 3600).windows())
    for w in ws:
        datetime.fromtimestamp(w.start, tz=UTC).isoformat()  # raised "year 57971 is out of range"
    assert [len(w.batch) for w in ws] == [20, 20]
    assert _counts(ws) == {"bad_event_time": 8}


# --- 3. one future timestamp must not starve the later windows ---------------------------------


@pytest.mark.parametrize("bad_batch", [0, 1, 3])
def test_one_future_event_time_does_not_starve_later_windows(bad_batch):
    batches = []
    for w in range(4):
        for i in range(4):
            batches.append(_timed(25, 4 * w + i, T0 + 3600 * w + 900 * i, step=30))
    b = batches[bad_batch]
    t = b.column("event_time").to_numpy().copy()
    t[7] = YEAR_2100
    batches[bad_batch] = _with(b, event_time=pa.array(t))
    ws = list(Windower(ListSource(batches), Decoder(tiny_schema()), 3600).windows())
    assert [(w.start - T0, len(w.batch)) for w in ws] == [(0, 99), (3600, 100), (7200, 100), (10800, 100)]
    assert _counts(ws) == {"bad_event_time": 1}
    assert ws[0].rejected[0].rows.column("event_time").to_pylist() == [YEAR_2100]


def test_a_real_jump_and_gaps_in_sparse_data_are_kept():
    # a source down for three days: the whole next batch jumps, and is taken
    batches = [_timed(20, 0, T0), _timed(20, 1, T0 + 3 * 86400), _timed(20, 2, T0 + 3 * 86400 + 400)]
    ws = list(Windower(ListSource(batches), Decoder(tiny_schema()), 3600).windows())
    assert sum(len(w.batch) for w in ws) == 60 and _counts(ws) == {}
    # sparse data: a two-day gap near the end of a batch is joined by the next batch
    t = np.concatenate([T0 + np.arange(30) * 60, T0 + 2 * 86400 + np.arange(5) * 60])
    a = _with(tiny_batch(35, 4), event_time=pa.array(t))
    ws = list(Windower(ListSource([a, _timed(30, 5, T0 + 2 * 86400 + 600)]), Decoder(tiny_schema()), 3600).windows())
    assert sum(len(w.batch) for w in ws) == 65 and _counts(ws) == {}
    assert detached(np.array([1, 2, 10**6]), 0, 10).tolist() == [False, False, True]
    # the last batch of a finite source jumps: nothing follows to confirm it, it is most of its batch
    ws = list(
        Windower(ListSource([_timed(20, 0, T0), _timed(5, 1, T0 + 5 * 86400)]), Decoder(tiny_schema()), 3600).windows()
    )
    assert sum(len(w.batch) for w in ws) == 25 and _counts(ws) == {}


def test_a_future_row_alone_in_its_batch_does_not_move_the_watermark():
    # one-row batches (a JSON-lines producer sending a row per message): the bad one is held back
    rows = [_timed(1, i, T0 + 60 * i) for i in range(40)]
    rows.insert(5, _with(_timed(1, 99, T0), event_time=pa.array([YEAR_2100])))
    ws = list(Windower(ListSource(rows), Decoder(tiny_schema()), 3600).windows())
    assert [len(w.batch) for w in ws] == [40] and _counts(ws) == {"bad_event_time": 1}


def test_skew_bound_is_a_parameter():
    batches = [_timed(20, 0, T0), _with(_timed(3, 1, T0), event_time=pa.array([T0, T0 + 7200, T0 + 1]))]
    ws = list(Windower(ListSource(batches), Decoder(tiny_schema()), 3600, max_event_time_skew=3600).windows())
    assert _counts(ws) == {"bad_event_time": 1}
    ws = list(Windower(ListSource(batches), Decoder(tiny_schema()), 3600, max_event_time_skew=None).windows())
    assert _counts(ws) == {} and sum(len(w.batch) for w in ws) == 23


# --- 9. CSV and unsupported files in a files: directory ----------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _flat_schema():
    return Schema([FieldSpec("user", "categorical", 50), FieldSpec("price", "numeric", 16)])


def test_files_source_reads_csv_and_warns_once_about_unsupported_files(tmp_path):
    a = _timed(10, 0, T0).drop_columns(["tags", "item"])
    pq.write_table(pa.Table.from_batches([a]), tmp_path / "h00.parquet")
    b = _timed(10, 1, T0 + 3600).drop_columns(["tags", "item"])
    lines = ["user,price,label,event_time"] + [
        f"{r['user']},{r['price']},{r['label']},{r['event_time']}" for r in b.to_pylist()
    ]
    (tmp_path / "h01.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "h02.txt").write_text("what is this\n")
    (tmp_path / "h03.xlsx").write_bytes(b"PK")
    (tmp_path / ".hidden").write_text("")
    c = _timed(5, 2, T0 + 7200).drop_columns(["tags", "item"])
    (tmp_path / "h04.jsonl").write_bytes(encode_jsonl(c.to_pylist(), "v")[0])
    (tmp_path / "h05.csv").write_text("")  # an empty file holds no rows: no error
    handler = _Records()
    logger = logging.getLogger("dimstream.stream.sources.files")
    logger.addHandler(handler)
    try:
        src = FilesSource(tmp_path, _flat_schema())
        ws = list(Windower(src, Decoder(src.schema), 3600).windows())
        list(src.read(None))  # a second read: no second warning
    finally:
        logger.removeHandler(handler)
    assert [len(w.batch) for w in ws] == [10, 10, 5] and _counts(ws) == {}
    assert len(handler.records) == 1
    msg = handler.records[0].getMessage()
    assert "h02.txt" in msg and "h03.xlsx" in msg and ".hidden" not in msg


# --- 10. "123" and 123 in a categorical column -------------------------------------------------


@pytest.mark.parametrize("id_type", ["int", "str"])
def test_declared_id_type_hashes_ints_and_numeric_strings_alike(id_type):
    schema = Schema(
        [FieldSpec("user", "categorical", 1000, id_type=id_type), FieldSpec("tags", "multi", 50, id_type=id_type)]
    )
    ids = [0, 7, 123, 99999, 2**40]
    tags = pa.array([[1, 2], [], [3], [40, 5, 6], [123]])
    as_int = pa.record_batch({"user": ids, "tags": tags, "label": [0, 1, 0, 1, 0], "event_time": [T0] * 5})
    as_str = pa.record_batch(
        {
            "user": [str(i) for i in ids],
            "tags": pa.array([[str(v) for v in r] for r in tags.to_pylist()]),
            "label": [0, 1, 0, 1, 0],
            "event_time": [T0] * 5,
        }
    )
    d = Decoder(schema)
    x, y = d.decode(as_int), d.decode(as_str)
    assert x.rejected_counts == y.rejected_counts == {}
    assert x.batch.values["user"].tolist() == y.batch.values["user"].tolist()
    assert x.batch.values["tags"].tolist() == y.batch.values["tags"].tolist()
    assert x.table.schema == y.table.schema  # one window can hold both
    ws = list(Windower(ListSource([as_int, as_str], schema), d, 3600).windows())
    assert [len(w.batch) for w in ws] == [10]


def test_id_type_int_rejects_non_integer_strings_and_default_is_unchanged():
    schema = Schema([FieldSpec("user", "categorical", 1000, id_type="int")])
    rb = pa.record_batch(
        {"user": ["1", " 2 ", "abc", "99999999999999999999"], "label": [0] * 4, "event_time": [T0] * 4}
    )
    r = Decoder(schema).decode(rb)
    assert r.rejected_counts == {"wrong_type": 2} and len(r.batch) == 2
    # undeclared (today's behaviour, documented in FieldSpec): strings hash as strings
    plain = Schema([FieldSpec("user", "categorical", 1000)])
    s = Decoder(plain).decode(pa.record_batch({"user": ["123"], "label": [0], "event_time": [T0]}))
    i = Decoder(plain).decode(pa.record_batch({"user": [123], "label": [0], "event_time": [T0]}))
    assert s.batch.values["user"].tolist() == hash_ids(pa.array(["123"]), "user", 1000).tolist()
    assert i.batch.values["user"].tolist() == hash_ids(pa.array([123]), "user", 1000).tolist()
    assert (
        Schema([FieldSpec("u", "categorical", 10)]).fingerprint()
        != Schema([FieldSpec("u", "categorical", 10, id_type="int")]).fingerprint()
    )
    with pytest.raises(SchemaError):
        FieldSpec("p", "numeric", 10, id_type="int")


def test_ids_of_every_arrow_kind_decode_and_bad_bytes_are_wrong_type():
    t = [T0] * 3
    for id_type in (None, "int", "str"):
        schema = Schema([FieldSpec("u", "categorical", 100, id_type=id_type), FieldSpec("p", "numeric", 8)])
        for u in (pa.array(["1", "2", None]).dictionary_encode(), pa.array([2**64 - 1, 1, None], pa.uint64())):
            rb = pa.record_batch({"u": u, "p": pa.array([b"1.5", b"\xfe", b""]), "label": [0, 1, 1], "event_time": t})
            r = Decoder(schema).decode(rb)
            assert r.rejected_counts == {"wrong_type": 1} and len(r.batch) == 2, (id_type, u.type)


def test_rows_held_back_as_far_ahead_are_decided_when_a_live_source_goes_idle():
    """A live source whose last batch jumps more than the skew ahead (a gap in the data) and then
    goes quiet: no next batch will judge the held rows, so the idle timeout does. Before, the
    rows stayed held and their window never closed."""
    import threading
    import time

    from dimstream.stream.decode import Decoder
    from dimstream.stream.sources.base import Source, SourceBatch
    from dimstream.stream.window import Windower
    from tests.helpers import tiny_batch, tiny_schema

    class JumpThenQuiet(Source):
        name = "jump-then-quiet"
        schema = tiny_schema()
        done = threading.Event()

        def read(self, position):
            yield SourceBatch(tiny_batch(50, 0, t0=0), {"row": 0}, {"row": 1})
            yield SourceBatch(tiny_batch(50, 1, t0=3 * 86400), {"row": 1}, {"row": 2})  # 3 days later
            while not self.done.is_set():
                yield SourceBatch(None, {"row": 2}, {"row": 2})
                time.sleep(0.05)

    src = JumpThenQuiet()
    windows = Windower(src, Decoder(src.schema), 3600, idle_timeout=0.3).windows()
    got = [next(windows), next(windows)]
    src.done.set()
    assert [len(w.batch) for w in got] == [50, 50]
    assert got[1].start >= 3 * 86400


def _cut(table: pa.Table, cuts, name="cuts"):
    """A finite source over `table` read in batches ending at the rows `cuts` (a Kafka poll's
    boundaries: one poll may hold months of a replayed topic)."""

    class Cuts(Source):
        schema = None

        def read(self, position):
            row = position["row"] if position else 0
            for c in sorted({c for c in cuts if c > row} | {table.num_rows}):
                yield SourceBatch(
                    table.slice(row, c - row).combine_chunks().to_batches()[0], row_position(row), row_position(c)
                )
                row = c

    src = Cuts()
    src.name = name
    return src


def _restarted(table, schema, first_cuts, restart_cuts, kill_after, window=3600):
    """Windows of a run killed after `kill_after` windows and restarted from its last one."""
    src = _cut(table, first_cuts)
    src.schema = schema
    first = []
    for w in Windower(src, Decoder(schema), window).windows():
        first.append(w)
        if len(first) == kill_after:
            break
    last = first[-1]
    src = _cut(table, restart_cuts)
    src.schema = schema
    rest = list(
        Windower(
            src, Decoder(schema), window, start=last.resume, watermark=last.end, read_upto=last.read_upto
        ).windows()
    )
    return first + rest


def test_a_restart_re_reading_gappy_data_in_one_batch_rejects_nothing():
    """Sparse data with gaps longer than the skew, none of whose stretches is half of a
    batch, re-read after a restart in one large batch (as a Kafka poll returns it). Before, the
    stretches beyond the first gap were held back and then rejected as bad_event_time."""
    day = 86400
    t = np.concatenate([T0 + k * 2 * day + np.arange(100) * 60 for k in range(8)])  # 8 stretches, 2 days apart
    table = pa.Table.from_batches([_with(tiny_batch(len(t), 1), event_time=pa.array(t, pa.int64()))])
    one_pass = list(Windower(_cut(table, [], "one"), Decoder(tiny_schema()), 3600).windows())
    got = _restarted(table, tiny_schema(), range(50, len(t), 50), [len(t) - 1], kill_after=2)
    assert _counts(got) == {}
    assert [(w.start, len(w.batch)) for w in got] == [(w.start, len(w.batch)) for w in one_pass]
    assert sum(len(w.batch) for w in got) == len(t)


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason=f"MovieLens-100k not at {ML100K}")
def test_ml100k_restarted_into_one_large_poll_trains_every_row_once_with_the_skew_bound_on():
    """The Kafka SIGKILL-restart case (tests/test_kafka_source.py), without the broker: ml-100k
    killed after 21 daily windows and re-read in a batch that ends in January, across its gaps of
    25-49 h. Before, 40,276 rows were rejected as bad_event_time."""
    from dimstream.stream.sources.movielens import MovieLensSource

    src = MovieLensSource(ML100K)
    one_pass = list(Windower(src, Decoder(src.schema), 86400).windows())
    got = _restarted(src.table, src.schema, range(300, 100_000, 3000), [57_644], kill_after=21, window=86400)
    assert _counts(got) == {}
    assert [(w.start, len(w.batch)) for w in got] == [(w.start, len(w.batch)) for w in one_pass]
