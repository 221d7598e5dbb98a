"""The Kafka source against a real broker: same windows and AUC as the file source, dead
letters, commits tied to checkpoints."""

import time

import numpy as np
import pytest

from dimstream.models.config import ModelConfig
from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner
from dimstream.ops.history import read_log
from dimstream.ops.replay import replay
from dimstream.stream.sources.kafka import KafkaSource
from dimstream.stream.sources.movielens import MovieLensSource, movielens_schema
from tests.helpers import ML100K, kafka_run_config

needs_ml100k = pytest.mark.skipif(not (ML100K / "u.data").exists(), reason=f"MovieLens-100k not at {ML100K}")


@needs_ml100k
def test_kafka_run_equals_the_file_run_window_by_window(broker, tmp_path):
    Runner.from_config(kafka_run_config(f"ml-100k:{ML100K}", tmp_path / "files", 40)).run()
    files = read_log(tmp_path / "files")
    src = MovieLensSource(ML100K)
    replay(src, f"kafka://{broker.bootstrap}/ml", rows_per_message=700, progress=False)
    cfg = kafka_run_config(
        f"kafka://{broker.bootstrap}/ml?group=eq",
        tmp_path / "kafka",
        40,
        schema=movielens_schema().to_dict(),
        idle_timeout=5,
    )
    runner = Runner.from_config(cfg)
    runner.run()
    kafka = read_log(tmp_path / "kafka")
    assert len(kafka) == 40
    assert [w["rows"] for w in kafka] == [w["rows"] for w in files]
    a = np.array([w["arms"]["control"]["auc"] for w in kafka], float)
    b = np.array([w["arms"]["control"]["auc"] for w in files], float)
    assert np.allclose(a, b, atol=1e-6, equal_nan=True)
    # the group's committed offset is what the last checkpoint covers
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="eq", enable_auto_commit=False)
    committed = c.committed(TopicPartition("ml", 0))
    c.close()
    import json

    meta = json.loads((tmp_path / "kafka" / "checkpoints" / "ckpt-000039" / "meta.json").read_text())
    assert committed == meta["position"]["offsets"]["0"]
    lag = runner.source.lag  # measured at most 10 s before the end of the run
    assert set(lag) == {"0"} and 0 <= lag["0"] <= 143


def test_undecodable_messages_are_dead_lettered_and_the_run_goes_on(broker, tmp_path):
    from kafka import KafkaConsumer, KafkaProducer

    from dimstream.stream.kafka.wire import encode_arrow
    from tests.helpers import tiny_batch, tiny_schema

    schema = tiny_schema()
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    good, headers = encode_arrow(tiny_batch(50, 0, t0=0), schema.fingerprint())
    p.send("bad", value=good, headers=headers)
    p.send("bad", value=b"garbage", headers=headers)
    p.send("bad", value=good, headers=[("format", b"arrow"), ("schema_version", b"someone-else")])
    p.send("bad", value=good, headers=headers)
    p.flush()
    src = KafkaSource(broker.bootstrap, "bad", schema, group="dl")
    seen, errors = 0, []
    for sb in src.read(None):
        if sb.batch is not None:
            seen += sb.batch.num_rows
        elif sb.error:
            errors.append(sb.error)
        if seen == 100 and len(errors) == 2:
            break
    src.close()
    assert sorted(errors) == ["corrupt_input", "unknown_schema"]
    c = KafkaConsumer(
        "bad.dlq", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=10_000
    )
    reasons = [dict(m.headers)["reason"] for _, m in zip(range(2), c)]
    c.close()
    assert sorted(reasons) == [b"corrupt_input", b"unknown_schema"]  # the .dlq topic may have several partitions


def test_jsonl_messages_are_decoded_in_bulk(broker):
    from kafka import KafkaProducer

    from dimstream.stream.kafka.wire import encode_jsonl
    from tests.helpers import tiny_schema

    schema = tiny_schema()
    rows = [
        {"user": i, "item": str(i % 7), "tags": [i % 3, 4], "price": 1.5 * i, "label": i % 2, "event_time": 100 + i}
        for i in range(40)
    ]
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    value, headers = encode_jsonl(rows, schema.fingerprint())
    p.send("jsonl", value=value, headers=headers)
    p.flush()
    src = KafkaSource(broker.bootstrap, "jsonl", schema, group="j")
    from dimstream.stream.decode import Decoder

    for sb in src.read(None):
        if sb.batch is not None:
            r = Decoder(schema).decode(sb.batch)
            break
    src.close()
    assert len(r.batch) == 40 and not r.rejected_counts
    assert r.batch.labels.sum() == 20


def test_two_consumers_in_one_group_split_the_partitions(broker):
    import threading

    from kafka import KafkaProducer

    from dimstream.ops.replay import ensure_topic
    from dimstream.stream.kafka.wire import encode_arrow
    from tests.helpers import tiny_batch, tiny_schema

    schema = tiny_schema()
    ensure_topic(broker.bootstrap, "split", 2)
    seen = {0: [], 1: []}
    done = threading.Event()

    def consume(k):
        src = KafkaSource(broker.bootstrap, "split", schema, group="pair")
        deadline = time.time() + 90
        for sb in src.read(None):
            if sb.batch is not None:
                seen[k].append((next(iter(sb.position["offsets"])), sb.batch.num_rows))
            if done.is_set() or time.time() > deadline:
                break
        src.close()

    threads = [threading.Thread(target=consume, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    time.sleep(10)  # both members joined and the group rebalanced (session 6 s, heartbeat 1 s)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for i in range(20):
        value, headers = encode_arrow(tiny_batch(10, i, t0=i * 60), schema.fingerprint())
        p.send("split", value=value, headers=headers, partition=i % 2)
    p.flush()
    deadline = time.time() + 60
    while sum(n for k in seen for _, n in seen[k]) < 200 and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    done.set()
    for t in threads:
        t.join(timeout=30)
    parts = {k: {p for p, _ in seen[k]} for k in seen}
    assert sum(n for k in seen for _, n in seen[k]) == 200  # everything, nothing twice
    assert parts[0] and parts[1] and not parts[0] & parts[1]  # one partition each
    assert parts[0] | parts[1] == {"0", "1"}


def _toml(schema: dict, **keys) -> str:
    value = lambda v: f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)  # noqa
    lines = [f"{k} = {value(v)}" for k, v in keys.items()]
    lines += ["[schema]", f'label = "{schema["label"]}"', f'event_time = "{schema["event_time"]}"', "fields = ["]
    lines += [
        f'  {{name = "{f["name"]}", kind = "{f["kind"]}", num_embeddings = {f["num_embeddings"]}}},'
        for f in schema["fields"]
    ]
    return "\n".join(lines + ["]"]) + "\n"


@needs_ml100k
def test_sigkill_of_a_kafka_fed_daemon_then_restart_trains_every_row_once(broker, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers import REPO

    src = MovieLensSource(ML100K)
    replay(src, f"kafka://{broker.bootstrap}/killed", rows_per_message=300, progress=False)
    windows = 60
    Runner.from_config(kafka_run_config(f"ml-100k:{ML100K}", tmp_path / "files", windows)).run()
    files = read_log(tmp_path / "files")
    state = tmp_path / "kafka"
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        _toml(
            movielens_schema().to_dict(),
            source=f"kafka://{broker.bootstrap}/killed?group=k",
            window="1d",
            windows=windows,
            idle_timeout=5.0,
            model="fm",
            state_dir=str(state),
            metrics_addr="127.0.0.1:0",
            progress=False,
        )
    )
    cmd = [sys.executable, "-m", "dimstream.ops.cli", "run", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log1", "w"))
    deadline = time.time() + 300
    while not (state / "checkpoints" / "ckpt-000020").exists():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "log1").read_text()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = read_log(state)  # every window, once: the record of the killed window did not survive
    assert [w["index"] for w in got] == list(range(windows))
    assert [w["rows"] for w in got] == [w["rows"] for w in files]  # every produced row trained once


def test_broker_paused_mid_read_then_resumed_reads_everything_once(broker):
    import os
    import signal

    from kafka import KafkaProducer

    from dimstream.ops.replay import ensure_topic
    from dimstream.stream.kafka.wire import encode_arrow
    from tests.helpers import tiny_batch, tiny_schema

    schema = tiny_schema()
    ensure_topic(broker.bootstrap, "pause", 1)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for i in range(10):
        value, headers = encode_arrow(tiny_batch(10, i, t0=i * 60), schema.fingerprint())
        p.send("pause", value=value, headers=headers)
    p.flush()
    src = KafkaSource(broker.bootstrap, "pause", schema, group="pause")
    offsets, ups, paused_at, resumed = [], [], None, False
    deadline = time.time() + 120
    for sb in src.read(None):
        assert time.time() < deadline
        if sb.batch is not None:
            offsets.append((sb.position["offsets"]["0"], sb.next_position["offsets"]["0"]))
        if paused_at is None and offsets:
            os.kill(broker.proc.pid, signal.SIGSTOP)  # the broker hangs mid-read
            paused_at = time.time()
            p.send("pause", value=value, headers=headers)  # buffered by the producer meanwhile
        elif paused_at and not resumed:
            ups.append(src.kafka_up)
            if time.time() - paused_at > 25:
                os.kill(broker.proc.pid, signal.SIGCONT)
                resumed = True
        elif resumed and sum(b - a for a, b in offsets) >= 11:
            break
    src.close()
    p.flush()
    p.close()
    covered = sorted(o for a, b in offsets for o in range(a, b))
    assert covered == list(range(11))  # every message once, none twice
    assert ups and len(ups) > 5  # heartbeats kept coming while the broker hung (the daemon stays up)
    # the liveness probe (ApiVersions with its own 2 s timeout) notices the hang within seconds
    # and, before that, the broker was up: kafka_up went 1 -> 0 while the broker was stopped
    assert ups[0] is True and ups.count(False) >= 5, ups


def _rows(n: int, first_rid: int, t_lo: int, t_hi: int):
    """n rows of the tiny schema with event times spread over [t_lo, t_hi) and ids first_rid.."""
    import pyarrow as pa

    from tests.helpers import tiny_batch

    rb = tiny_batch(n, first_rid, t0=0)
    t = pa.array(np.linspace(t_lo, t_hi - 1, n).astype(np.int64))
    rb = rb.set_column(rb.schema.get_field_index("event_time"), "event_time", t)
    return rb.append_column("rid", pa.array(np.arange(first_rid, first_rid + n, dtype=np.int64)))


def _scrape(port: int) -> dict:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("dimstream_") and " " in line
    }


def _kafka_runner(broker, topic, group, state, windows, **kw):
    from tests.helpers import tiny_schema

    cfg = RunConfig(
        source=f"kafka://{broker.bootstrap}/{topic}?group={group}",
        window_seconds=60,
        windows=windows,
        state_dir=state,
        seed=0,
        metrics_addr="127.0.0.1:0",
        progress=False,
        model=ModelConfig("fm"),
        schema=tiny_schema().to_dict(),
        **({"arms": ("control",)} | kw),
    )
    runner = Runner.from_config(cfg)
    trained = []  # (window start, row ids) of every window this daemon trained
    runner.observers.append(lambda r, w, rec: trained.append((w.start, w.table.column("rid").to_numpy())))
    return runner, trained


def test_daemon_survives_a_hung_broker_mid_window_exports_kafka_up_0_and_trains_every_row_once(broker, tmp_path):
    """The broker is SIGSTOPped while a window is open (rows of it buffered, earlier windows
    trained): /metrics keeps answering, kafka_up goes to 0 and the time since the last message
    grows; after SIGCONT the run finishes and every produced row is trained exactly once."""
    import os
    import signal
    import threading

    from kafka import KafkaProducer

    from dimstream.ops.replay import ensure_topic
    from dimstream.stream.kafka.wire import encode_arrow
    from tests.helpers import tiny_schema

    version = tiny_schema().fingerprint()
    ensure_topic(broker.bootstrap, "hung", 1)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    msgs = [encode_arrow(_rows(20, 20 * k, 20 * k, 20 * k + 20), version) for k in range(21)]  # 3 per 60 s window
    for value, headers in msgs[:14]:  # windows 0-3, and 2 of window 4's 3 messages
        p.send("hung", value=value, headers=headers)
    p.flush()
    # idle timeout above the probe's detection time (1 s period + 2 s timeout): an outage is not idleness
    runner, trained = _kafka_runner(broker, "hung", "hung", tmp_path / "state", 7, idle_timeout=8.0, linger_seconds=60)
    out = {}
    thread = threading.Thread(target=lambda: out.update(runner.run()))
    thread.start()
    stopped = False
    try:
        deadline = time.time() + 60
        while len(runner.history) < 4 or runner.source._next.get("0") != 14:
            assert thread.is_alive() and time.time() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        port = runner.metrics_port
        before = _scrape(port)
        assert before["dimstream_kafka_up"] == 1.0
        os.kill(broker.proc.pid, signal.SIGSTOP)  # window 4 is open, 40 of its rows buffered
        stopped, paused_at = True, time.time()
        for value, headers in msgs[14:]:
            p.send("hung", value=value, headers=headers)  # buffered by the producer meanwhile
        down = None
        while time.time() - paused_at < 15:
            m = _scrape(port)  # the daemon keeps serving metrics while the broker hangs
            if m["dimstream_kafka_up"] == 0.0 and down is None:
                down = time.time() - paused_at
                since = m["dimstream_seconds_since_last_message"]
            time.sleep(0.25)
        assert down is not None and down < 6, "kafka_up never fell to 0 while the broker was stopped"
        assert since >= down - 1.5  # no message since the pause (exported every second)
        assert len(runner.history) == 4  # nothing was closed or trained while the broker hung
        os.kill(broker.proc.pid, signal.SIGCONT)
        stopped = False
        p.flush()
        deadline = time.time() + 60
        while len(runner.history) < 7:
            assert thread.is_alive() and time.time() < deadline, "the run did not resume"
            time.sleep(0.2)
        time.sleep(1.5)
        assert _scrape(port)["dimstream_kafka_up"] == 1.0  # the broker answers again
    finally:
        if stopped:
            os.kill(broker.proc.pid, signal.SIGCONT)
        runner.stop_requested = True  # ends the linger
        thread.join(timeout=30)
        p.close()
    windows = out["windows"]
    assert [w["rows"] for w in windows] == [60] * 7 and [w["rejected_rows"] for w in windows] == [0] * 7
    starts = [s for s, _ in trained]
    assert starts == [60 * i for i in range(7)]
    rids = np.sort(np.concatenate([r for _, r in trained]))
    assert np.array_equal(rids, np.arange(420))  # every produced row trained, none twice


def test_rebalance_mid_window_gives_partitions_up_at_the_last_checkpoint_and_trains_every_row_once(broker, tmp_path):
    """Daemon A trains a 2-partition topic alone; daemon B joins its group while A has rows of an
    open window buffered. A gives both partitions up at its last checkpoint (eager rebalance),
    keeps one, B takes the other from A's committed offset. Summed over both daemons every
    window has exactly the rows produced, and every (partition, offset, row) is trained once.
    Messages end at window boundaries (20 s of event time each, 60 s windows)."""
    _rebalance_two_daemons(broker, tmp_path, "rebal", "rg", span=20)


def test_rebalance_with_messages_split_across_window_boundaries_trains_every_row_once(broker, tmp_path):
    """As above, but every message holds 25 s of event time, so window boundaries fall inside
    messages: the partition B takes over starts at a message whose first rows A already trained.
    B learns how far A got from A's record on the positions side topic (tansu drops commit
    metadata), skips those rows, and every row is still trained exactly once across the group."""
    a, b = _rebalance_two_daemons(broker, tmp_path, "rebals", "rgs", span=25)
    # the handover really went through a split message: B skipped rows A had trained
    handed = a.source.handed_over_rows + b.source.handed_over_rows
    assert handed > 0
    # ... and each daemon's registry counts its own, read from the source at scrape time
    for runner in (a, b):
        got = runner.metrics.registry.get_sample_value("dimstream_kafka_rows_handed_over_total")
        assert got == runner.source.handed_over_rows


def _rebalance_two_daemons(broker, tmp_path, topic: str, group: str, span: int):
    import threading

    from kafka import KafkaProducer

    from dimstream.ops.replay import ensure_topic
    from dimstream.stream.kafka.wire import encode_arrow
    from tests.helpers import tiny_schema

    version = tiny_schema().fingerprint()
    ensure_topic(broker.bootstrap, topic, 2)
    messages, per_message = 36, 20  # per partition; `span` s of event time per message
    total = 2 * messages * per_message
    producing = threading.Event()

    def produce():
        p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)
        for k in range(messages):
            for part in (0, 1):  # row id = partition * 100000 + offset * 20 + row
                value, headers = encode_arrow(
                    _rows(per_message, part * 100_000 + k * per_message, span * k, span * k + span), version
                )
                p.send(topic, value=value, headers=headers, partition=part)
            p.flush()
            time.sleep(0.6)  # about 22 s in all: the rebalance lands while messages keep coming
        p.close()
        producing.set()

    kw = dict(idle_timeout=4.0, allowed_lateness=40, linger_seconds=120)
    a, trained_a = _kafka_runner(broker, topic, group, tmp_path / "a", 1000, **kw)
    b, trained_b = _kafka_runner(broker, topic, group, tmp_path / "b", 1000, **kw)
    out_a, out_b = {}, {}
    ta = threading.Thread(target=lambda: out_a.update(a.run()))
    tb = threading.Thread(target=lambda: out_b.update(b.run()))
    producer = threading.Thread(target=produce)
    ta.start()
    try:
        deadline = time.time() + 60
        while a.source.rebalances == 0:  # A joined the group and was assigned both partitions
            assert ta.is_alive() and time.time() < deadline
            time.sleep(0.1)
        producer.start()
        while len(a.history) < 2:  # A has trained windows 0 and 1 on its own
            assert ta.is_alive() and time.time() < deadline
            time.sleep(0.1)
        tb.start()  # B joins: the group rebalances (first assignment after ~3 s)
        deadline = time.time() + 90
        done = lambda: len(np.unique(np.concatenate([r for _, r in trained_a + trained_b])))  # noqa: E731
        while done() < total:  # every row id trained (at least once)
            assert ta.is_alive() and tb.is_alive() and time.time() < deadline, (done(), total)
            time.sleep(0.2)
        time.sleep(2)  # anything trained twice would show up by now
    finally:
        a.stop_requested = b.stop_requested = True
        for t in (ta, tb, producer):
            if t.ident is not None:
                t.join(timeout=60)
    assert producing.is_set()
    # the rebalance happened mid-window: A had read rows it had not trained when it gave them up
    assert a.source.rebalances >= 2 and a.source.revoked_unfinished >= 1
    assert a.source._assigned and b.source._assigned and not a.source._assigned & b.source._assigned
    rids = np.concatenate([r for _, r in trained_a + trained_b])
    assert len(rids) == total and np.array_equal(np.sort(rids), np.sort(np.unique(rids)))  # none twice
    expect = np.sort(np.concatenate([part * 100_000 + np.arange(messages * per_message) for part in (0, 1)]))
    assert np.array_equal(np.sort(rids), expect)  # none lost
    per_window: dict[str, int] = {}
    for w in out_a["windows"] + out_b["windows"]:
        per_window[w["start"]] = per_window.get(w["start"], 0) + w["rows"]
        assert w["rejected_rows"] == 0
    t = np.concatenate(
        [_rows(per_message, 0, span * k, span * k + span).column("event_time").to_numpy() for k in range(messages)]
    )
    starts, counts = np.unique(t // 60 * 60, return_counts=True)
    from dimstream.ops.daemon import _iso

    assert per_window == {_iso(s): 2 * int(c) for s, c in zip(starts, counts)}  # what was produced, per window
    return a, b


class _Crash(Exception):
    pass


def test_daemon_dying_between_checkpoint_and_commit_then_restarting_as_another_joins_trains_every_row_once(
    broker, tmp_path
):
    """Daemon A dies right after writing window 2's checkpoint, before anything of it reached
    Kafka (no positions record, no commit). It restarts from that checkpoint and daemon B joins
    the group before A closes another window. A publishes the checkpoint's positions before
    rejoining, so whichever partition B takes starts where A's checkpoint says, skipping the
    rows of the split message that A trained: every row is trained once across A, its
    restart and B, and per-window row counts are what was produced."""
    import threading

    from kafka import KafkaProducer

    from dimstream.ops.replay import ensure_topic
    from dimstream.stream.kafka.wire import encode_arrow
    from tests.helpers import tiny_schema

    version = tiny_schema().fingerprint()
    topic, group = "crashc", "cg"
    ensure_topic(broker.bootstrap, topic, 2)
    messages, per_message, span = 24, 20, 25  # 25 s messages: window boundaries fall inside them
    total = 2 * messages * per_message
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)

    def produce(ks, pause=0.0):
        for k in ks:
            for part in (0, 1):
                value, headers = encode_arrow(
                    _rows(per_message, part * 100_000 + k * per_message, span * k, span * k + span), version
                )
                p.send(topic, value=value, headers=headers, partition=part)
            p.flush()
            time.sleep(pause)  # paced: both partitions are read as they come, none runs ahead

    kw = dict(idle_timeout=12.0, allowed_lateness=40, linger_seconds=120)
    a, trained_a = _kafka_runner(broker, topic, group, tmp_path / "a", 1000, **kw)
    commit = a.source.commit

    def dies_before_window_2_reaches_kafka(position, watermark=None, read_upto=None, window=None):
        if window == 2:
            raise _Crash()  # window 2's checkpoint is on disk; its record and commit never happen
        commit(position, watermark, read_upto, window)

    a.source.commit = dies_before_window_2_reaches_kafka
    crashed = []

    def run_a():
        try:
            a.run()
        except _Crash:
            crashed.append(True)

    ta = threading.Thread(target=run_a)
    ta.start()
    deadline = time.time() + 30
    while a.source.rebalances == 0:  # A joined the group and was assigned both partitions
        assert ta.is_alive() and time.time() < deadline
        time.sleep(0.1)
    produce(range(10), pause=0.5)  # event time 0-250: A can close windows 0-2 (lateness 40), not 3
    ta.join(timeout=45)
    assert crashed and (tmp_path / "a" / "checkpoints" / "ckpt-000002").exists()
    a2, trained_a2 = _kafka_runner(broker, topic, group, tmp_path / "a", 1000, **kw)
    b, trained_b = _kafka_runner(broker, topic, group, tmp_path / "b", 1000, **kw)
    out_a2, out_b = {}, {}
    ta2 = threading.Thread(target=lambda: out_a2.update(a2.run()))
    tb = threading.Thread(target=lambda: out_b.update(b.run()))
    ta2.start()
    everything = lambda: trained_a + trained_a2 + trained_b  # noqa: E731
    try:
        deadline = time.time() + 30
        while a2.source.rebalances == 0:  # the restarted A owns both partitions again
            assert ta2.is_alive() and time.time() < deadline
            time.sleep(0.1)
        tb.start()  # B joins before A has closed another window
        while b.source.rebalances == 0 or a2.source.rebalances < 2:
            assert ta2.is_alive() and tb.is_alive() and time.time() < deadline
            time.sleep(0.1)
        assert len(a2.history) == 3  # nothing closed since the restart: A's only record is window 1's
        produce(range(10, messages))
        deadline = time.time() + 60
        while len(np.unique(np.concatenate([r for _, r in everything()]))) < total:
            counts = [[(s, len(r)) for s, r in x] for x in (trained_a, trained_a2, trained_b)]
            done = len(np.unique(np.concatenate([r for _, r in everything()])))
            assert ta2.is_alive() and tb.is_alive() and time.time() < deadline, (
                f"{done} of {total} rows trained; A {counts[0]}, A restarted {counts[1]}, B {counts[2]}"
            )
            time.sleep(0.2)
        time.sleep(2)  # anything trained twice would show up by now
    finally:
        a2.stop_requested = b.stop_requested = True
        for t in (ta2, tb):
            if t.ident is not None:
                t.join(timeout=60)
        p.close()
    assert a2.source._assigned and b.source._assigned and not a2.source._assigned & b.source._assigned
    rids = np.concatenate([r for _, r in everything()])
    assert len(rids) == total, f"{len(rids) - len(np.unique(rids))} rows trained twice"
    expect = np.sort(np.concatenate([part * 100_000 + np.arange(messages * per_message) for part in (0, 1)]))
    assert np.array_equal(np.sort(rids), expect)  # none lost, none twice
    per_window: dict[str, int] = {}
    for w in out_a2["windows"] + [w for w in out_b["windows"]]:  # A2's summary includes A's windows 0-2
        per_window[w["start"]] = per_window.get(w["start"], 0) + w["rows"]
        assert w["rejected_rows"] == 0
    t = np.concatenate(
        [_rows(per_message, 0, span * k, span * k + span).column("event_time").to_numpy() for k in range(messages)]
    )
    starts, counts = np.unique(t // 60 * 60, return_counts=True)
    from dimstream.ops.daemon import _iso

    assert per_window == {_iso(s): 2 * int(c) for s, c in zip(starts, counts)}


def test_a_kafka_source_under_torchrun_reads_the_partitions_of_its_rank(broker, tmp_path, monkeypatch):
    """Under torchrun each rank is assigned partitions p mod N by hand (no consumer group:
    tests/test_kafka_ranks.py runs it); one process keeps the group."""
    from dimstream.ops.daemon import open_source

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    cfg = kafka_run_config(f"kafka://{broker.bootstrap}/ranks", tmp_path / "s", 1)
    src = open_source(cfg)
    assert src.assignment == (1, 2) and [p for p in range(4) if src.owns(p)] == [1, 3]
    src.close()
    monkeypatch.setenv("WORLD_SIZE", "1")
    src = open_source(cfg)
    assert src.assignment is None  # one rank: the group assigns
    src.close()
