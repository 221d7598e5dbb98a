"""Kafka partitions per rank under torchrun (gloo, CPU), against a real tansu broker.

A topic of 4 partitions with skewed rows (partitions 0 and 2, rank 0's, hold 3 times the rows of
1 and 3, rank 1's) is read by `torchrun --nproc_per_node 2 --no-python dimstream run`: each rank
its own partitions (p mod 2), the windows closed in lockstep. Every row produced is trained
exactly once: per window, the history log's rows are those produced and each rank's rows those
of its partitions; the checkpoint and rank 0's commit hold the offsets of all 4 partitions.
SIGKILL of rank 1 mid-run under `--max-restarts 1`: the world restarts from the last complete
checkpoint and still trains every row once."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time

import numpy as np
import pytest

from dimstream.ops.daemon import _iso
from tests.helpers import REPO, kill_rank_1_after_two_windows, tiny_batch, tiny_schema

BIN = REPO / ".venv" / "bin"
pytestmark = pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun not installed in .venv")
HOUR = 3600
ROWS = {0: 450, 1: 150, 2: 450, 3: 150}  # per partition and window: rank 0 900, rank 1 300 (3:1)
PER_MESSAGE = 75
RANK_LINE = re.compile(r"rank (\d) of 2: window \[(\S+) \.\. (\S+)\] rows (\d+) from partitions \[([\d, ]*)\]")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def produce(bootstrap: str, topic: str, windows: int, first: int = 0) -> dict[int, int]:
    """Hours `first` .. `first + windows - 1` of rows into 4 partitions (ROWS per partition and
    hour), the schema in every message; returns the messages per partition."""
    from kafka import KafkaProducer

    from dimstream.ops.replay import ensure_topic
    from dimstream.stream.kafka.wire import encode_arrow

    schema = tiny_schema()
    ensure_topic(bootstrap, topic, 4)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    messages = dict.fromkeys(ROWS, 0)
    for w in range(first, first + windows):
        for p, rows in ROWS.items():
            for m in range(rows // PER_MESSAGE):
                rb = tiny_batch(PER_MESSAGE, seed=1000 * w + 10 * p + m, t0=w * HOUR)
                value, headers = encode_arrow(rb, schema.fingerprint(), schema)
                producer.send(topic, value=value, headers=headers, partition=p)
                messages[p] += 1
    producer.flush()
    producer.close()
    return messages


def command(bootstrap: str, topic: str, state, windows: int, restarts: int = 0) -> list[str]:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_port())]
    cmd += ["--max-restarts", str(restarts), "--no-python", str(BIN / "dimstream"), "run"]
    cmd += ["--source", f"kafka://{bootstrap}/{topic}?group={topic}", "--windows", str(windows), "--window", "1h"]
    cmd += ["--idle-timeout", "3", "--arms", "control", "--model", "fm", "--seed", "0", "--search", "none"]
    return cmd + ["--metrics-addr", "127.0.0.1:0", "--no-progress", "--state-dir", str(state)]


ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO.parent)}


def history(state) -> list[dict]:
    return [json.loads(line) for line in (state / "history.jsonl").read_text().splitlines()]


def rank_lines(text: str) -> list[tuple]:
    """(rank, start, end, rows, partitions) of every rank's line per window closed."""
    found = RANK_LINE.findall(text)
    return [(int(r), s, e, int(n), [int(p) for p in ps.split(",") if p.strip()]) for r, s, e, n, ps in found]


def committed(bootstrap: str, group: str, topic: str) -> dict[str, int]:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {str(p): c.committed(TopicPartition(topic, p)) for p in ROWS}
    finally:
        c.close()


def check_every_row_once(state, bootstrap: str, topic: str, messages: dict[int, int], windows: int) -> list[dict]:
    log = history(state)
    assert [r["index"] for r in log] == list(range(windows))
    assert [r["start"] for r in log] == [_iso(w * HOUR) for w in range(windows)]  # contiguous, once each
    assert [r["rows"] for r in log] == [sum(ROWS.values())] * windows  # what was produced, per window
    assert all(r["rejected_rows"] == 0 for r in log)
    ckpt = state / "checkpoints" / (state / "checkpoints" / "LATEST").read_text().strip()
    meta = json.loads((ckpt / "meta.json").read_text())
    ends = {str(p): n for p, n in messages.items()}
    assert meta["position"]["offsets"] == ends  # every partition's position, whichever rank read it
    assert committed(bootstrap, topic, topic) == ends  # committed by rank 0 for all 4 partitions
    return log


def test_two_ranks_read_their_own_skewed_partitions_and_train_every_row_once(broker, tmp_path):
    topic, windows = "ranks", 3
    messages = produce(broker.bootstrap, topic, windows)
    state = tmp_path / "state"
    r = subprocess.run(
        command(broker.bootstrap, topic, state, windows), capture_output=True, text=True, timeout=240, env=ENV, cwd=REPO
    )
    assert r.returncode == 0, r.stderr[-6000:]
    log = check_every_row_once(state, broker.bootstrap, topic, messages, windows)
    lines = rank_lines(r.stderr)
    assert len(lines) == 2 * windows, r.stderr[-4000:]
    for w in range(windows):  # each rank closed the same window with its own partitions' rows
        mine = sorted(line for line in lines if line[1] == log[w]["start"])
        assert [(rk, e, n, ps) for rk, _, e, n, ps in mine] == [
            (0, log[w]["end"], ROWS[0] + ROWS[2], [0, 2]),
            (1, log[w]["end"], ROWS[1] + ROWS[3], [1, 3]),
        ]
    assert np.isfinite([w["arms"]["control"]["auc"] for w in log]).all()  # the union's AUC
    assert r.stderr.count("INFO dimstream: window 2 ") == 1  # one log line per window (rank 0)

    # 2 -> 1: a plain run on the state dir resumes all 4 partitions from the checkpoint (the group
    # assigns them to its one member) and trains two more hours, every row once. One process's
    # watermark is its newest row over all partitions, so a backlog read partition by partition
    # needs the lateness of a window to keep the rows of partitions read later
    from dimstream.ops.daemon import Runner
    from tests.helpers import kafka_run_config

    more = produce(broker.bootstrap, topic, 2, first=windows)
    cfg = kafka_run_config(
        f"kafka://{broker.bootstrap}/{topic}?group={topic}",
        state,
        windows + 2,
        window_seconds=HOUR,
        idle_timeout=3,
        allowed_lateness=HOUR,
    )
    Runner.from_config(cfg).run()
    total = {p: messages[p] + more[p] for p in ROWS}
    check_every_row_once(state, broker.bootstrap, topic, total, windows + 2)


def test_a_partition_with_messages_not_yet_placed_holds_the_ranks_event_time(broker):
    """The rank's event time in the window agreement is bounded by its partitions still being
    read: while one partition's rows are handed on after another's (in one poll, or lagging),
    the floor stays below them, so no window closes before they are placed; caught up: no bound."""
    from kafka import KafkaProducer

    from dimstream.ops.replay import ensure_topic
    from dimstream.stream.kafka.wire import encode_arrow
    from dimstream.stream.sources.kafka import HOLD, KafkaSource

    schema = tiny_schema()
    ensure_topic(broker.bootstrap, "floor", 2)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for p, hours in ((0, (0, 1, 2)), (1, (0,))):
        for h in hours:
            value, headers = encode_arrow(tiny_batch(20, seed=h, t0=h * HOUR), schema.fingerprint())
            producer.send("floor", value=value, headers=headers, partition=p)
    producer.flush()
    producer.close()
    src = KafkaSource(broker.bootstrap, "floor", schema, group="floor", assignment=(0, 1))
    seen, floors, deadline = [], [], time.monotonic() + 60
    try:
        for sb in src.read(None):
            floors.append(src.event_time_floor())  # as the window loop's round would see it
            if sb.batch is not None:
                seen.append(next(iter(sb.position["offsets"])))
            elif len(seen) >= 2 and floors[-1] is None:
                break
            assert time.monotonic() < deadline, (seen, floors)
    finally:
        src.close()
    assert sorted(set(seen)) == ["0", "1"]
    second = seen.index(next(p for p in seen if p != seen[0]))  # the first batch of the other partition
    assert floors[second] == HOLD  # its rows not placed yet: every window stays open
    assert floors[-1] is None and max(src._max_event.values()) >= 2 * HOUR  # caught up: no bound


def test_sigkill_of_rank_1_restarts_the_world_which_trains_every_row_once(broker, tmp_path):
    topic, windows = "ranks-kill", 6
    messages = produce(broker.bootstrap, topic, windows)
    state = tmp_path / "state"
    kill_rank_1_after_two_windows(
        command(broker.bootstrap, topic, state, windows, restarts=1), state, tmp_path / "stderr", ENV
    )
    check_every_row_once(state, broker.bootstrap, topic, messages, windows)
