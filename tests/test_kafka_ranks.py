"""Kafka partitions per rank under torchrun (gloo, CPU), against a real tansu broker.

A topic of 4 partitions with skewed rows (partitions 0 and 2, rank 0's, hold 3 times the rows of
1 and 3, rank 1's) is read by `torchrun --nproc_per_node 2 --no-python dimstream run`: each rank
its own partitions (p mod 2), the windows closed in lockstep. Every row produced is trained
exactly once, checked row by row against Kafka's offsets: every row carries a unique id, the
producer learns each message's (partition, offset), and the daemon's audit
(DIMSTREAM_TRAINED_IDS, ops/daemon.py) writes the ids each rank trained per window; their union
over windows and ranks is every row of every offset below the committed one, each once, in its
own hour's window, on the rank owning its partition. The checkpoint and rank 0's commit hold the
offsets of all 4 partitions. Covered: 2 ranks with the search re-shaping the slim arm, then 2 -> 1;
1 -> 2 (a plain run stopped by SIGTERM mid-backlog, then torchrun); SIGKILL of rank 1 under
`--max-restarts 1` (the world restarts from the last complete checkpoint)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import pytest

from dimstream.ops.daemon import TRAINED_IDS_ENV, _iso
from tests.helpers import REPO, kill_rank_1_after_two_windows, sigterm_after_window, tiny_batch, tiny_schema

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


@dataclass
class Produced:
    """Every row produced: its id, and its message's partition and offset, and its hour."""

    ids: np.ndarray
    partition: np.ndarray
    offset: np.ndarray
    hour: np.ndarray

    def __add__(self, other: Produced) -> Produced:
        return Produced(*(np.concatenate([a, b]) for a, b in zip(vars(self).values(), vars(other).values())))

    def ends(self) -> dict[str, int]:
        """The offset after each partition's last message."""
        return {str(p): int(self.offset[self.partition == p].max()) + 1 for p in ROWS}

    def locate(self, ids: np.ndarray) -> np.ndarray:
        """The index of each of `ids` among the rows produced (all of them must be there)."""
        order = np.argsort(self.ids)
        at = np.searchsorted(self.ids, ids, sorter=order).clip(0, len(order) - 1)
        found = order[at]
        assert (self.ids[found] == ids).all(), "trained ids that were never produced"
        return found


def produce(bootstrap: str, topic: str, windows: int, first: int = 0) -> Produced:
    """Hours `first` .. `first + windows - 1` of rows into 4 partitions (ROWS per partition and
    hour), the schema in every message, each row with a unique id (hour, partition, message,
    row); returns them with the offsets the broker gave their messages."""
    from kafka import KafkaProducer

    from dimstream.ops.replay import ensure_topic
    from dimstream.stream.kafka.wire import encode_arrow

    schema = tiny_schema()
    ensure_topic(bootstrap, topic, 4)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    sent = []  # (ids, partition, hour, the send's future)
    for w in range(first, first + windows):
        for p, rows in ROWS.items():
            for m in range(rows // PER_MESSAGE):
                ids = ((w * 4 + p) * 100 + m) * 100 + np.arange(PER_MESSAGE)
                rb = tiny_batch(PER_MESSAGE, seed=1000 * w + 10 * p + m, t0=w * HOUR, ids=ids)
                value, headers = encode_arrow(rb, schema.fingerprint(), schema)
                sent.append((ids, p, w, producer.send(topic, value=value, headers=headers, partition=p)))
    producer.flush()
    offsets = [f.get(timeout=30).offset for *_, f in sent]
    producer.close()
    n = PER_MESSAGE
    return Produced(
        np.concatenate([ids for ids, *_ in sent]),
        np.repeat([p for _, p, _, _ in sent], n),
        np.repeat(offsets, n),
        np.repeat([w for _, _, w, _ in sent], n),
    )


def command(
    bootstrap: str, topic: str, state, windows: int, restarts: int = 0, arms: str = "control", search: str = "none"
) -> list[str]:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_port())]
    cmd += ["--max-restarts", str(restarts), "--no-python", *daemon(bootstrap, topic, state, windows, arms, search)]
    return cmd


def daemon(bootstrap: str, topic: str, state, windows: int, arms: str = "control", search: str = "none") -> list[str]:
    """`dimstream run` on the topic (one process as it is; torchrun's command in `command`)."""
    cmd = [str(BIN / "dimstream"), "run", "--source", f"kafka://{bootstrap}/{topic}?group={topic}"]
    cmd += ["--windows", str(windows), "--window", "1h", "--idle-timeout", "3", "--arms", arms, "--model", "fm"]
    cmd += ["--seed", "0", "--search", search, "--metrics-addr", "127.0.0.1:0", "--no-progress"]
    return cmd + ["--state-dir", str(state)]


ROW_ID = "row_id"  # the column of unique ids the daemon's audit writes per window and rank
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO.parent), TRAINED_IDS_ENV: ROW_ID}


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


def trained(state, windows: int) -> list[list[np.ndarray]]:
    """Per window, per rank (0 .. N-1 of that window's world): the ids of the rows it trained, as
    the daemon's audit wrote them. Exactly the windows of the history log have them."""
    found: dict[int, dict[int, np.ndarray]] = {}
    for f in (state / "trained-ids").glob("*.npy"):
        w, r = re.fullmatch(r"window-(\d+)\.rank(\d+)\.npy", f.name).groups()
        found.setdefault(int(w), {})[int(r)] = np.load(f)
    assert sorted(found) == list(range(windows))
    assert all(sorted(found[w]) == list(range(len(found[w]))) for w in found), {w: sorted(v) for w, v in found.items()}
    return [[found[w][r] for r in range(len(found[w]))] for w in range(windows)]


def check_rows_against_offsets(state, produced: Produced, ends: dict[str, int], windows: int) -> None:
    """Row by row: the rows trained over all windows and ranks are every row of every message
    below each partition's committed offset, each once; each in its own hour's window, on the
    rank that owns its partition (p mod N in a world of N)."""
    per_window = trained(state, windows)
    everything = np.concatenate([ids for ranks in per_window for ids in ranks])
    ids, counts = np.unique(everything, return_counts=True)
    assert (counts == 1).all(), f"{int((counts > 1).sum())} rows trained more than once"
    lost, foreign = np.setdiff1d(produced.ids, ids), np.setdiff1d(ids, produced.ids)
    assert not len(lost) and not len(foreign), f"{len(lost)} rows lost, {len(foreign)} trained never produced"
    for w, ranks in enumerate(per_window):
        for r, mine in enumerate(ranks):
            i = produced.locate(mine)
            assert (produced.hour[i] == w).all(), (w, r)
            assert (produced.partition[i] % len(ranks) == r).all(), (w, r)
    i = produced.locate(everything)
    pairs, rows = np.unique(np.stack([produced.partition[i], produced.offset[i]]), axis=1, return_counts=True)
    expected = np.concatenate([[[p] * n, range(n)] for p, n in sorted((int(p), n) for p, n in ends.items())], axis=1)
    assert np.array_equal(pairs, expected)  # every offset below the commit, no other
    assert (rows == PER_MESSAGE).all()  # each message's rows, all of them, once


def check_every_row_once(state, bootstrap: str, topic: str, produced: Produced, windows: int) -> list[dict]:
    log = history(state)
    assert [r["index"] for r in log] == list(range(windows))
    assert [r["start"] for r in log] == [_iso(w * HOUR) for w in range(windows)]  # contiguous, once each
    assert [r["rows"] for r in log] == [sum(ROWS.values())] * windows  # what was produced, per window
    assert all(r["rejected_rows"] == 0 for r in log)
    ckpt = state / "checkpoints" / (state / "checkpoints" / "LATEST").read_text().strip()
    meta = json.loads((ckpt / "meta.json").read_text())
    ends = produced.ends()
    assert meta["position"]["offsets"] == ends  # every partition's position, whichever rank read it
    commit = committed(bootstrap, topic, topic)
    assert commit == ends  # committed by rank 0 for all 4 partitions
    check_rows_against_offsets(state, produced, commit, windows)
    return log


def test_two_ranks_read_their_own_skewed_partitions_and_train_every_row_once(broker, tmp_path, monkeypatch):
    """2 ranks, the search (SSEDS) on the sharded control re-shaping the slim arm, then 2 -> 1."""
    topic, windows = "ranks", 3
    produced = produce(broker.bootstrap, topic, windows)
    state = tmp_path / "state"
    cmd = command(broker.bootstrap, topic, state, windows, arms="control,slim", search="sseds")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr[-6000:]
    log = check_every_row_once(state, broker.bootstrap, topic, produced, windows)
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
    # the search on the union of the ranks' rows re-shaped the slim arm on 2 ranks (window 0: from
    # the control's shape to the budget), and the rows above were still trained once
    assert log[0]["reallocation"]["method"] == "sseds", log[0].get("reallocation")
    slim, control = log[-1]["arms"]["slim"]["embedding_params"], log[-1]["arms"]["control"]["embedding_params"]
    assert slim <= 0.25 * control < control

    # 2 -> 1: a plain run on the state dir resumes all 4 partitions from the checkpoint (the group
    # assigns them to its one member) and trains two more hours, every row once. One process's
    # watermark is its newest row over all partitions, so a backlog read partition by partition
    # needs the lateness of a window to keep the rows of partitions read later
    from dimstream.ops.daemon import Runner
    from tests.helpers import kafka_run_config

    monkeypatch.setenv(TRAINED_IDS_ENV, ROW_ID)
    more = produce(broker.bootstrap, topic, 2, first=windows)
    # as if the 2 ranks had trained the next window and died before its checkpoint: the one
    # process trains it again, and its audit drops rank 1's file (else these rows count twice)
    np.save(state / "trained-ids" / f"window-{windows:06d}.rank1.npy", more.ids[more.partition % 2 == 1])
    cfg = kafka_run_config(
        f"kafka://{broker.bootstrap}/{topic}?group={topic}",
        state,
        windows + 2,
        window_seconds=HOUR,
        idle_timeout=3,
        allowed_lateness=HOUR,
        arms=("control", "slim"),
        search="sseds",
    )
    Runner.from_config(cfg).run()
    check_every_row_once(state, broker.bootstrap, topic, produced + more, windows + 2)


def test_a_plain_run_stopped_mid_backlog_resumes_on_two_ranks_training_every_row_once(broker, tmp_path):
    """1 -> 2: a plain `dimstream run` on a backlog of 6 hours, stopped by SIGTERM once its first
    window is checkpointed (its later windows still open: their rows read, not trained), then
    `torchrun --nproc_per_node 2` on the same state dir: each rank seeks its partitions from the
    one process's checkpoint and every row is trained once over both runs."""
    topic, windows = "ranks-grow", 6
    produced = produce(broker.bootstrap, topic, windows)
    state = tmp_path / "state"
    # one process takes its newest row over all partitions as the watermark (README, Scale-out):
    # a backlog of 6 hours read partition by partition needs a lateness of 6 hours to lose no row,
    # so its windows close on the idle timeout, once everything is read
    one = daemon(broker.bootstrap, topic, state, windows) + ["--allowed-lateness", str(windows * HOUR)]
    sigterm_after_window(one, state, 0, tmp_path / "stderr-1", ENV)
    done = len(history(state))
    assert 1 <= done < windows  # stopped mid-backlog: the rest is for the two ranks
    meta = json.loads((state / "checkpoints" / f"ckpt-{done - 1:06d}" / "meta.json").read_text())
    position, read = meta["position"]["offsets"], meta["read_upto"]["offsets"]
    assert all(position[p] < read[p] for p in read), meta  # rows read and not trained, to read again
    first = trained(state, done)
    assert all(len(ranks) == 1 for ranks in first)  # trained by one process
    r = subprocess.run(
        command(broker.bootstrap, topic, state, windows), capture_output=True, text=True, timeout=240, env=ENV, cwd=REPO
    )
    assert r.returncode == 0, r.stderr[-6000:]
    assert f"resumed from ckpt-{done - 1:06d}" in r.stderr, r.stderr[-3000:]
    check_every_row_once(state, broker.bootstrap, topic, produced, windows)
    assert all(len(ranks) == 2 for ranks in trained(state, windows)[done:])  # the rest by two ranks


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
    produced = produce(broker.bootstrap, topic, windows)
    state = tmp_path / "state"
    kill_rank_1_after_two_windows(
        command(broker.bootstrap, topic, state, windows, restarts=1), state, tmp_path / "stderr", ENV
    )
    check_every_row_once(state, broker.bootstrap, topic, produced, windows)
