"""Issue 12: the stream carries its schema, and topics written by other producers.

Unit tests of sniffing and of the bulk JSON decode (stream/kafka/formats.py), then, on a real
broker (tansu): a newcomer's replay consumed without [schema], another dataset's batches in the
same topic (schema_mismatch), JSON events produced by confluent-kafka (librdkafka) one per
message without headers, and formats dimstream does not read (unsupported_format)."""

import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pytest

from dimstream.ops.config import ConfigError
from dimstream.ops.daemon import Runner
from dimstream.ops.history import read_log
from dimstream.ops.replay import ensure_topic
from dimstream.stream.kafka import formats
from dimstream.stream.kafka.formats import decode_values, sniff
from dimstream.stream.kafka.wire import WireError, decode_message, encode_arrow
from dimstream.stream.schema import METADATA_KEY, FieldSpec, Schema
from dimstream.stream.sources.kafka import KafkaSource
from tests.helpers import ML100K, kafka_run_config, run_collecting, tiny_batch, tiny_schema

needs_ml100k = pytest.mark.skipif(not (ML100K / "u.data").exists(), reason=f"MovieLens-100k not at {ML100K}")

AVRO = b"Obj\x01\x04\x14avro.codec\x08null\x00"
CONFLUENT = b"\x00\x00\x00\x00\x2a\x02\x06abc"  # magic 0, schema id 42, an Avro body
PROTOBUF = b"\x08\x96\x01\x12\x03abc"


# --- unit: sniffing and bulk JSON ------------------------------------------------------------


def test_sniff_recognises_arrow_json_and_the_formats_dimstream_does_not_read():
    arrow, _ = encode_arrow(tiny_batch(3), "v")
    assert sniff(arrow) == "arrow"
    assert sniff(b'{"a": 1}') == sniff(b'\n  {"a": 1}\n{"a": 2}') == "json"
    assert sniff(AVRO) == "avro"
    assert sniff(CONFLUENT) == "confluent"
    assert sniff(PROTOBUF) == "unknown"
    assert sniff(PROTOBUF, {"content-type": b"application/x-protobuf"}) == "protobuf"
    # dimstream's format header wins; a declared format decides for headerless messages
    assert formats.message_format(b"{}", {"format": b"arrow"}) == "arrow"
    assert formats.message_format(arrow, {}, "json") == "json"
    assert formats.message_format(b"x", {"format": b"avro"}) == "avro"


def test_unsupported_formats_are_unsupported_format_naming_the_format():
    for value, headers, named in [
        (AVRO, None, "Avro"),
        (CONFLUENT, None, "schema-registry"),
        (PROTOBUF, [("content-type", b"application/x-protobuf")], "Protobuf"),
        (PROTOBUF, None, "no format dimstream reads"),
    ]:
        with pytest.raises(WireError) as e:
            decode_message(value, headers, None)
        assert e.value.reason == "unsupported_format" and named in e.value.detail, e.value


def test_json_of_one_poll_is_decoded_in_one_call_and_bad_messages_are_found_by_halving(monkeypatch):
    calls = []
    real = formats.pajson.read_json
    monkeypatch.setattr(formats.pajson, "read_json", lambda *a, **k: calls.append(1) or real(*a, **k))
    values = [json.dumps({"user": i, "label": i % 2, "event_time": 100 + i}).encode() for i in range(1000)]
    (piece,) = decode_values(values)
    assert len(calls) == 1  # one read_json for 1000 messages
    assert (piece.lo, piece.hi, piece.rb.num_rows) == (0, 1000, 1000)
    assert piece.rb.column("user").to_pylist() == list(range(1000))
    calls.clear()
    values[617] = b'{"user": 617, "label": '  # cut short
    pieces = decode_values(values)
    assert len(calls) <= 2 * 10 + 2  # halving: O(log n) calls, not one per message
    bad = [p for p in pieces if p.error is not None]
    assert [(p.lo, p.error.reason) for p in bad] == [(617, "corrupt_input")]
    good = [p for p in pieces if p.error is None]
    assert sum(p.rb.num_rows for p in good) == 999
    # the pieces cover every message once, in order
    assert [p.lo for p in pieces] == sorted(p.lo for p in pieces)
    assert sum(p.hi - p.lo for p in pieces) == 1000 and pieces[-1].hi == 1000


def _one_block(values) -> pa.Table:
    buf = b"\n".join(values)
    return pajson.read_json(pa.BufferReader(buf), read_options=pajson.ReadOptions(block_size=len(buf) + 1))


def test_json_parsed_in_blocks_has_one_column_order_whatever_the_threads(monkeypatch):
    """A poll parsed in many blocks on every core, with columns first met in a late block (one
    of them a struct whose fields come in two orders): every parse gives the canonical order
    (the declared columns as declared, then the others by name, struct fields by name) and the
    values of a one-block parse."""
    monkeypatch.setattr(formats, "_MIN_BLOCK", 512)
    monkeypatch.setattr(formats, "_BLOCKS_PER_CORE", 16)  # at least 16 blocks of this 27 kB poll
    blocks = []
    real = formats.pajson.read_json
    monkeypatch.setattr(
        formats.pajson,
        "read_json",
        lambda src, read_options: blocks.append(read_options.block_size) or real(src, read_options=read_options),
    )
    early = [b'{"zz": %d, "event_time": %d, "user": %d, "label": 0}' % (i, 100 + i, i) for i in range(200)]
    late = [
        b'{"m": {"b": %d, "a": "x"}, "event_time": 1, "label": 1, "user": %d, "extra": [1, 2], "zz": 0.5}' % (i, i)
        for i in range(100)
    ] + [b'{"user": 7, "m": {"a": "y", "c": true}, "label": 0, "event_time": 2}'] * 100
    values = early + late
    columns = formats.declared_columns(Schema([FieldSpec("user", "categorical", 50)]))
    assert columns == ("user", "label", "event_time")
    one = _one_block(values)
    assert one.column_names[:3] == ["zz", "event_time", "user"]  # pyarrow's order: as first met
    order = ["user", "label", "event_time", "extra", "m", "zz"]
    for _ in range(30):
        blocks.clear()
        (piece,) = decode_values(values, columns=columns)
        assert len(blocks) == 1 and blocks[0] <= len(b"\n".join(values)) // 16 + 1  # one call, many blocks
        assert piece.rb.schema.names == order
        assert [f.name for f in piece.rb.schema.field("m").type] == ["a", "b", "c"]
        for name in order:
            assert piece.rb.column(name).to_pylist() == one.column(name).to_pylist(), name
    assert one.schema.field("zz").type == pa.float64() == piece.rb.schema.field("zz").type  # int, then float
    # without a schema: every column by name; a JSON-lines message alone is put in the same order
    (piece,) = decode_values(values[:5])
    assert piece.rb.schema.names == ["event_time", "label", "user", "zz"]
    assert formats.decode_json(b"\n".join(values[:5]), columns).schema.names == ["user", "label", "event_time", "zz"]


def test_json_lines_pretty_printed_objects_and_type_changes_decode():
    values = [
        b'{"x": 1, "label": 0}',
        b'{"x": 2, "label": 1}\n\n{"x": 3, "label": 0}\n',  # JSON lines: decoded alone
        json.dumps({"x": 4, "label": 1}, indent=2).encode(),  # one object over several lines
        b'{"x": "five", "label": 0}',  # another type than the first message: a piece of its own
        b"[1, 2]",  # JSON, but no object
        None,  # a tombstone
        b"  \n ",
    ]
    pieces = decode_values(values)
    rows = [(p.lo, p.rb.column("x").to_pylist()) for p in pieces if p.error is None]
    assert rows == [(0, [1]), (1, [2, 3]), (2, [4]), (3, ["five"])]
    errors = [(p.lo, p.error.reason) for p in pieces if p.error is not None]
    assert errors == [(4, "corrupt_input"), (5, "empty_message"), (6, "empty_message")]


def test_arrow_messages_carry_the_schema_in_their_metadata():
    schema = tiny_schema()
    value, headers = encode_arrow(tiny_batch(5), schema.fingerprint(), schema)
    (piece,) = decode_values([value], [headers])
    assert piece.schema == schema and piece.rb.num_rows == 5
    md = pa.ipc.open_stream(value).schema.metadata
    assert json.loads(md[METADATA_KEY]) == schema.to_dict()  # the contract: JSON under dimstream.schema.v1
    broken = tiny_batch(2).replace_schema_metadata({METADATA_KEY: b'{"fields": "nope"}'})
    with pytest.raises(WireError) as e:
        decode_message(encode_arrow(broken, "v")[0], None, None)
    assert e.value.reason == "schema_mismatch"


def test_from_url_without_schema_adopts_instead_of_assuming_one():
    src = KafkaSource.from_url("kafka://127.0.0.1:9/t?group=g&format=json")
    assert src.adopting and src._schema is None and src.format == "json"
    schema = tiny_schema()
    assert src.adopt_schema({"offsets": {}, "schema": schema.to_dict()}) == schema  # from a checkpoint
    assert src.resume_position([], None, None)["schema"] == schema.to_dict()
    with pytest.raises(ValueError, match="format must be one of"):
        KafkaSource.from_url("kafka://127.0.0.1:9/t?format=avro")


def test_rows_handed_over_are_skipped_per_message_in_a_bulk_decoded_run():
    """After a rebalance, rows an earlier owner trained (older than its watermark, in messages
    before its read_upto) are skipped; in a run of one-row JSON messages each row has its own
    message offset."""
    values = [json.dumps({"user": i, "label": 0, "event_time": t}).encode() for i, t in enumerate([5, 50, 7, 60, 8, 9])]
    (piece,) = decode_values(values)
    src = KafkaSource("127.0.0.1:9", "t", tiny_schema())
    src._skip["0"] = [[13, 40]]  # messages before offset 13: rows older than 40 were trained
    out, kept = src._handed_over("0", np.arange(10, 16), piece.rb)  # offsets 10..15
    assert out.column("user").to_pylist() == [1, 3, 4, 5]  # offsets 10 and 12 (t 5, 7) skipped
    assert kept.tolist() == [False, True, False, True, True, True]
    assert src.handed_over_rows == 2
    src._handed_over("0", np.arange(16, 18), piece.rb.slice(0, 2))
    assert "0" not in src._skip  # no rule applies past its read_upto


def test_a_poll_says_each_message_s_offset_and_rows_so_replay_is_judged_per_message():
    """A poll's run of messages becomes one batch; it says, per message, the rows it gave (0 for a
    message whose rows were all handed over) and its offset, and `messages_before` a read_upto
    inside the run marks only the messages before it."""
    from kafka.consumer.fetcher import ConsumerRecord

    def record(offset, value):
        return ConsumerRecord("t", 0, None, offset, 0, 0, None, value, [], None, -1, len(value), -1)

    values = [json.dumps({"user": i, "label": 0, "event_time": t}).encode() for i, t in enumerate([5, 50, 7, 60])]
    src = KafkaSource("127.0.0.1:9", "t", tiny_schema())
    src._skip["0"] = [[23, 40]]  # messages before offset 23: rows older than 40 were trained
    (sb,) = src._batches("0", [record(20 + i * 2, v) for i, v in enumerate(values)])  # offsets 20, 22, 24, 26
    assert sb.batch.column("user").to_pylist() == [1, 2, 3]
    assert sb.message_rows.tolist() == [0, 1, 1, 1] and sb.message_offsets.tolist() == [20, 22, 24, 26]
    assert src.messages_before(sb, {"offsets": {"0": 24}}).tolist() == [True, True, False, False]
    assert src.messages_before(sb, {"offsets": {"0": 24}, "resets": {"0": 1}}).tolist() == [False] * 4


# --- on a real broker ------------------------------------------------------------------------


def _scrape(port: int) -> dict:
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:  # a busy machine: the next scrape answers
        return {}
    lines = [ln.rsplit(" ", 1) for ln in text.splitlines() if ln.startswith("dimstream_")]
    return {k: float(v) for k, v in lines}


def _dlq_reasons(bootstrap: str, topic: str, n: int) -> list[bytes]:
    from kafka import KafkaConsumer

    c = KafkaConsumer(
        f"{topic}.dlq", bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=10_000
    )
    reasons = [dict(m.headers).get("reason") for _, m in zip(range(n), c)]
    c.close()
    return reasons


@needs_ml100k
def test_replayed_ml100k_consumed_without_schema_windows_equal_the_dataset_run(broker, tmp_path, caplog):
    import logging

    from dimstream.ops.replay import replay
    from dimstream.stream.sources.movielens import MovieLensSource, movielens_schema

    windows = 12
    Runner.from_config(kafka_run_config(f"ml-100k:{ML100K}", tmp_path / "files", windows)).run()
    files = [w["rows"] for w in read_log(tmp_path / "files")]
    replay(MovieLensSource(ML100K), f"kafka://{broker.bootstrap}/newcomer", progress=False)
    url = f"kafka://{broker.bootstrap}/newcomer?group=n"
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO):
        runner = Runner.from_config(kafka_run_config(url, tmp_path / "kafka", windows // 2))  # no [schema]
        assert runner.schema == movielens_schema()
        assert "adopted the schema the stream newcomer carries" in caplog.text
        runner.run()
    assert time.monotonic() - t0 < 60  # windows close within a minute
    meta = json.loads((tmp_path / "kafka" / "checkpoints" / "ckpt-000005" / "meta.json").read_text())
    assert meta["position"]["schema"] == movielens_schema().to_dict()  # checkpointed with the position
    caplog.clear()
    with caplog.at_level(logging.INFO):
        # resumes with the checkpointed one
        Runner.from_config(kafka_run_config(url, tmp_path / "kafka", windows)).run()
    assert "restored from the checkpoint" in caplog.text
    got = read_log(tmp_path / "kafka")
    assert [w["index"] for w in got] == list(range(windows))
    assert [w["rows"] for w in got] == files


@needs_ml100k
def test_another_datasets_batches_in_the_topic_are_schema_mismatch_while_training_goes_on(broker, tmp_path):
    from kafka import KafkaProducer

    from dimstream.stream.sources.movielens import MovieLensSource
    from dimstream.stream.synthetic import SyntheticSource

    windows = 8
    Runner.from_config(kafka_run_config(f"ml-100k:{ML100K}", tmp_path / "files", windows)).run()
    files = [w["rows"] for w in read_log(tmp_path / "files")]
    ml, other = MovieLensSource(ML100K), SyntheticSource(rows_per_window=600, batch_rows=300)
    strangers = [sb.batch for _, sb in zip(range(4), other.read(None))]
    ensure_topic(broker.bootstrap, "mixed", 1)  # one partition: the rows stay in event-time order
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=64 << 20)
    sent = 0
    for sb in ml.read(None):
        for s in range(0, sb.batch.num_rows, 1000):
            value, headers = encode_arrow(sb.batch.slice(s, 1000), ml.schema.fingerprint(), ml.schema)
            p.send("mixed", value=value, headers=headers)
            sent += 1
            if sent in (1, 2, 3, 5):  # another producer writes into the same topic meanwhile
                value, headers = encode_arrow(strangers.pop(), other.schema.fingerprint(), other.schema)
                p.send("mixed", value=value, headers=headers)
    p.flush()
    p.close()
    cfg = kafka_run_config(f"kafka://{broker.bootstrap}/mixed?group=m", tmp_path / "kafka", windows, linger_seconds=20)
    runner = Runner.from_config(cfg)
    errors = []
    thread = threading.Thread(target=lambda: errors.append(runner.run() and None))
    t0 = time.monotonic()
    thread.start()
    seen = 0.0
    while seen < 4 and time.monotonic() - t0 < 60:  # within seconds of the run's start, model build included
        time.sleep(0.2)
        port = getattr(runner, "metrics_port", None)
        seen = _scrape(port).get('dimstream_rows_rejected_total{reason="schema_mismatch"}', 0.0) if port else 0.0
    assert seen == 4, (seen, time.monotonic() - t0)
    while len(runner.history) < windows and thread.is_alive():  # training goes on meanwhile
        time.sleep(0.2)
    runner.stop_requested = True  # ends the linger
    thread.join(timeout=120)
    assert not thread.is_alive() and errors == [None]
    assert sorted(_dlq_reasons(broker.bootstrap, "mixed", 4)).count(b"schema_mismatch") >= 4
    assert [w["rows"] for w in read_log(tmp_path / "kafka")] == files  # training went on, every ml row


def test_a_topic_of_json_without_schema_is_said_at_once_and_exits_2(broker, tmp_path, capsys):
    from kafka import KafkaProducer

    from dimstream.ops.cli import main

    ensure_topic(broker.bootstrap, "foreign", 1)  # one partition: rows in the order sent
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    p.send("foreign", value=b'{"user": 1, "label": 0, "event_time": 5}')
    p.flush()
    p.close()
    url = f"kafka://{broker.bootstrap}/foreign"
    with pytest.raises(ConfigError, match=r"is JSON, which carries no schema: declare the fields in the \[schema\]"):
        Runner.from_config(kafka_run_config(url, tmp_path / "a", 1))
    code = main(["run", "--source", url, "--state-dir", str(tmp_path / "b"), "--metrics-addr", "127.0.0.1:0"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dimstream: error")]
    assert code == 2 and len(err) == 1 and "[schema]" in err[0] and "foreign partition 0 offset 0" in err[0]


def _json_events(n: int, t_lo: int, span: int) -> list[bytes]:
    t = t_lo + np.linspace(0, span - 1, n).astype(np.int64)
    return [
        json.dumps(
            {"rid": i, "user": i % 30, "item": str(i % 25), "tags": [i % 9, 1], "price": 0.5 + i % 7, "label": i % 2}
            | {"event_time": int(t[i])}
        ).encode()
        for i in range(n)
    ]


def test_confluent_kafka_json_events_one_per_message_train_every_row_once_and_close_on_idle(broker, tmp_path):
    from confluent_kafka import Producer

    n, windows = 3000, 3
    ensure_topic(broker.bootstrap, "events", 1)  # one partition: rows in the order sent
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    events = _json_events(n, 6000, 180)  # three 60 s windows; no later row closes the last
    for value in events:
        p.produce("events", value=value)  # no headers, no key: the usual event topic
    assert p.flush(30) == 0
    del p  # librdkafka's threads end with it, before the broker does
    cfg = kafka_run_config(
        f"kafka://{broker.bootstrap}/events?group=e",
        tmp_path / "state",
        windows,
        window_seconds=60,
        schema=tiny_schema().to_dict(),
        idle_timeout=3,
    )
    t0 = time.monotonic()
    trained = run_collecting(cfg, "rid")
    assert time.monotonic() - t0 < 90
    rids = np.sort(np.concatenate(trained))
    assert len(trained) == windows and np.array_equal(rids, np.arange(n))  # every row, exactly once
    per_window = np.bincount((np.array([json.loads(v)["event_time"] for v in events]) - 6000) // 60).tolist()
    assert [w["rows"] for w in read_log(tmp_path / "state")] == per_window  # the last closed on the idle timeout


def test_unsupported_formats_on_the_broker_are_dead_lettered_with_one_line_each(broker, caplog):
    import logging

    from kafka import KafkaProducer

    ensure_topic(broker.bootstrap, "mixedfmt", 1)  # one partition: rows in the order sent
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    events = _json_events(6, 0, 60)
    for value in [events[0], AVRO, AVRO, events[1], CONFLUENT, events[2], PROTOBUF, events[3]]:
        p.send("mixedfmt", value=value)
    p.flush()
    p.close()
    src = KafkaSource(broker.bootstrap, "mixedfmt", tiny_schema(), group="u")
    rows, errors = 0, []
    with caplog.at_level(logging.ERROR, logger="dimstream.stream.sources.kafka"):
        for sb in src.read(None):
            rows += sb.batch.num_rows if sb.batch is not None else 0
            errors += [sb.detail] if sb.error == "unsupported_format" else []
            if rows == 4 and len(errors) == 4:
                break
    src.close()
    lines = [r.getMessage() for r in caplog.records if "unsupported_format" in r.getMessage()]
    assert len(lines) == 3  # Avro once (two messages), schema-registry framing once, unknown once
    assert any("Avro" in ln for ln in lines) and any("schema-registry" in ln for ln in lines)
    assert sorted(_dlq_reasons(broker.bootstrap, "mixedfmt", 4)) == [b"unsupported_format"] * 4


def test_declared_schema_checks_every_message_that_carries_one(broker):
    from kafka import KafkaProducer

    schema = tiny_schema()
    other = Schema(schema.fields[:3])
    ensure_topic(broker.bootstrap, "checked", 1)  # one partition: rows in the order sent
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for s in (schema, other, schema):
        value, headers = encode_arrow(tiny_batch(10, t0=0), s.fingerprint(), s)
        p.send("checked", value=value, headers=[h for h in headers if h[0] != "schema_version"])
    p.flush()
    p.close()
    src = KafkaSource(broker.bootstrap, "checked", schema, group="c")
    rows, errors = 0, []
    for sb in src.read(None):
        rows += sb.batch.num_rows if sb.batch is not None else 0
        errors += [(sb.error, sb.detail)] if sb.error else []
        if rows == 20 and errors:
            break
    src.close()
    assert [e for e, _ in errors] == ["schema_mismatch"] and "field 'price' only in this schema" in errors[0][1]


def test_read_upto_covers_only_the_batches_the_window_loop_was_given(broker):
    """A poll's run of Arrow messages of different types (label int8 / int64) cannot be joined and
    is yielded as one batch per message. A window closed after the first of them checkpoints
    read_upto at that batch's end, not the run's: the rows after it are not handled yet (it was
    the run's end, and a restart skipped a late row of a later message as handed over, neither
    trained nor dead-lettered: benchmarks/soak.py --source kafka)."""
    from kafka import KafkaProducer

    ensure_topic(broker.bootstrap, "splitrun", 1)  # one partition: rows in the order sent
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for label_type in (pa.int8(), pa.int64(), pa.int8()):
        b = tiny_batch(10, t0=0)
        b = b.set_column(b.schema.get_field_index("label"), "label", b.column("label").cast(label_type))
        p.send("splitrun", value=encode_arrow(b, "v")[0])
    p.flush()
    p.close()
    src = KafkaSource(broker.bootstrap, "splitrun", tiny_schema(), group="s")
    seen = []
    for sb in src.read(None):
        if sb.batch is not None:
            seen.append((sb.next_position["offsets"]["0"], src.read_upto_position(sb, None)["offsets"]["0"]))
        if len(seen) == 3:
            break
    src.close()
    assert seen == [(1, 1), (2, 2), (3, 3)]
