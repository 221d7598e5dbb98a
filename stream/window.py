"""Event-time windows over a Source: the unit of test-then-train, checkpoints and search.

A window [start, start + length) closes when the watermark (largest event time seen minus the
allowed lateness) passes its end, when the source ends, or after `idle_timeout` seconds of a
live source with no data (time while the source reports itself down does not count).

Lateness is judged per message, in arrival order (a batch is one message unless its source
says how many rows each message gave, SourceBatch.message_rows: a Kafka poll): a row is late,
rejected with reason "late", when it is older than the last closed window's end, or when its
window's end is at or before the watermark of everything read before its message (the largest
event time of earlier batches and of earlier messages of its batch, minus the allowed
lateness): its window was passed, whether or not it has closed yet or ever held a row. So a
restart, whose polls split the stream differently, judges the same rows late. (Readers in
lockstep judge only the first rule: their closes are agreed across ranks.) After a restart,
rows older than the checkpointed watermark that come from messages read before the crash are
skipped as already handled (trained or dead-lettered; `Source.messages_before`, per message of
a poll that straddles the checkpoint's read_upto): see stream.sources.base for the position
contract.

A row whose event time lies far ahead of the data (a clock in 2100, milliseconds read as
seconds) must not move the watermark, or every later row would be late. Rows are rejected as
"bad_event_time" when they are separated by more than `max_event_time_skew` seconds (default
one day) from the largest event time seen so far (or, for the very first batch, from its
earliest row): a row joins the data when its sorted event times reach it in steps of at most
the skew. Rows beyond such a gap (not connected to the data, see `detached`) are held back for
one batch and then judged against that next batch's front (the median event time of its last
rows in arrival order): placed unless still more than the skew ahead of it, else rejected. So a
real jump (a source down for days) is placed one batch late, sparse data with gaps of days,
even months of it re-read in one large batch after a restart, is placed, and a few rows far
ahead of everything read after them are rejected. New rows that join held ones are connected.
When no next batch comes (a finite source's end, a live one gone idle), held rows are judged
against the last batch's front the same way. `max_event_time_skew=
None` turns the bound off. Event times that are no date at all (negative, beyond year 9999) are
rejected by the decoder, before any of this.

>>> from dimstream.stream.synthetic import SyntheticSource
>>> from dimstream.stream.decode import Decoder
>>> src = SyntheticSource(seed=0, rows_per_window=2000, batch_rows=700, max_windows=2)
>>> ws = list(Windower(src, Decoder(src.schema), 3600).windows())
>>> [(w.start - ws[0].start, len(w.batch)) for w in ws]
[(0, 2000), (3600, 2000)]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dimstream.stream.batch import SparseBatch
from dimstream.stream.decode import Decoder, Rejected
from dimstream.stream.sources.base import Source, SourceBatch

log = logging.getLogger(__name__)


@dataclass
class Window:
    start: int  # event-time seconds, inclusive
    end: int  # exclusive; the watermark once this window is closed
    batch: SparseBatch  # accepted rows, decoded
    table: pa.Table | None  # the same rows as Arrow (truth columns, recent-rows buffer)
    rejected: list[Rejected] = field(default_factory=list)
    rejected_counts: dict[str, int] = field(default_factory=dict)
    rows_read: int = 0  # rows read from the source while this window was open
    replayed_rows: int = 0  # rows skipped after a restart: handled before the crash
    resume: dict | None = None  # source position to restart at after this window
    read_upto: dict | None = None  # position after the last batch read when it closed
    read_seconds: float = 0.0  # wall time spent reading and decoding


def concat_tables(tables: list[pa.Table]) -> pa.Table:
    """One table of a window's parts. The decoder casts the schema's columns to canonical types;
    columns it does not know (and ids of undeclared id_type, int in one batch and string in the
    next) may still differ: they are promoted, else written as strings, else dropped."""
    try:
        return pa.concat_tables(tables)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    types: dict[str, set] = {}
    for t in tables:
        for f in t.schema:
            types.setdefault(f.name, set()).add(f.type)
    fixed = []
    for t in tables:
        for name, ts in types.items():
            if len(ts) > 1 and name in t.column_names:
                i = t.column_names.index(name)
                try:
                    t = t.set_column(i, name, t.column(i).cast(pa.large_string()))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    t = t.remove_column(i)
        fixed.append(t)
    try:
        return pa.concat_tables(fixed, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        dropped = sorted(n for n, ts in types.items() if len(ts) > 1)
        log.warning("window table: columns %s differ between batches and were dropped", dropped)
        return pa.concat_tables(
            [t.drop_columns([n for n in dropped if n in t.column_names]) for t in fixed], promote_options="permissive"
        )


def detached(t: np.ndarray, anchor: int | None, skew: int, confirmed: np.ndarray | None = None) -> np.ndarray:
    """Rows not connected to the data: the sorted rows fall into groups wherever two neighbours
    are more than `skew` seconds apart; connected are the group of `anchor` (the largest event
    time seen so far; None at the start: the group of the batch's first row in time) and every group
    that holds a `confirmed` row (one held back from an earlier batch) next to an unconfirmed
    one (the new batch has gone there too). Vectorised.

    >>> import numpy as np
    >>> detached(np.array([10, 20, 4_000_000_000, 30]), None, 86400).tolist()
    [False, False, True, False]
    >>> detached(np.array([500_000, 500_010, 500_020]), 100, 86400).tolist()  # a jump: held first
    [True, True, True]
    >>> detached(np.array([500_000, 500_010]), 100, 86400, np.array([True, False])).tolist()  # then joined
    [False, False]
    >>> day = 86400  # stretches two days apart: the new rows join the held ones, not the 2100 row
    >>> detached(np.array([0, 2, 4, 4, 50_000]) * day, 0, day, np.array([0, 0, 1, 0, 1], bool)).tolist()
    [False, True, False, False, True]
    """
    n = len(t)
    if n == 0 or t.max() <= (t.min() if anchor is None else anchor) + skew:
        return np.zeros(n, bool)  # the common case: no gap can be wider than the skew, no sort
    order = np.argsort(t, kind="stable")
    s = t[order]
    prev = np.empty_like(s)
    prev[0] = s[0] if anchor is None else anchor
    prev[1:] = s[:-1]
    if anchor is not None:
        prev = np.maximum(prev, anchor)
    group = np.cumsum(s - prev > skew)  # 0: the rows the anchor (or the first row) reaches
    if not group[-1]:
        return np.zeros(n, bool)
    joined = np.zeros(group[-1] + 1, bool)
    joined[0] = True
    if confirmed is not None:
        c = confirmed[order]
        joined |= (np.bincount(group, weights=c, minlength=len(joined)) > 0) & (
            np.bincount(group, weights=~c, minlength=len(joined)) > 0
        )
    out = np.zeros(n, bool)
    out[order] = ~joined[group]
    return out


def front(t: np.ndarray, tail: int = 64) -> int:
    """Where a batch leaves the stream: the median event time of its last `tail` rows in arrival
    order (a few outliers among them do not move it)."""
    return int(np.median(t[-tail:]))


def message_index(message_rows: np.ndarray | None, kept: np.ndarray | None, accepted: int) -> np.ndarray | None:
    """Per accepted row of a batch, the index of the message it came in (SourceBatch.message_rows;
    `kept`: the rows the decoder accepted, None: all); None when the batch is one message.

    >>> message_index(np.array([2, 0, 1]), np.array([True, False, True]), 2).tolist()
    [0, 2]
    """
    if message_rows is None or len(message_rows) <= 1:
        return None
    msg = np.repeat(np.arange(len(message_rows)), message_rows)
    if kept is not None and len(kept) == len(msg):
        msg = msg[kept]
    if len(msg) != accepted:  # not the rows the source said: judge the batch as one unit
        log.warning("message_rows (%d rows) does not match the batch (%d accepted)", len(msg), accepted)
        return None
    return msg


def earlier_max(t: np.ndarray, msg: np.ndarray | None, max_t: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the largest event time read before its message: `max_t` (earlier batches; None:
    none) or a row of an earlier message of this batch (`msg`: each row's message index, in
    arrival order; None: the batch is one message). Also which rows have such an earlier row.

    >>> prior, has = earlier_max(np.array([50, 70, 10, 60]), np.array([0, 0, 1, 2]), None)
    >>> prior[has].tolist(), has.tolist()
    ([70, 70], [False, False, True, True])
    >>> earlier_max(np.array([5, 6]), None, 40)[0].tolist()
    [40, 40]
    """
    n = len(t)
    if msg is None or n == 0 or msg[0] == msg[-1]:
        return np.full(n, 0 if max_t is None else max_t, np.int64), np.full(n, max_t is not None)
    first = np.flatnonzero(np.r_[True, msg[1:] != msg[:-1]])  # messages with rows (msg never decreases)
    seg_max = np.maximum.reduceat(t, first)
    before = np.empty_like(seg_max)
    before[0] = seg_max[0] if max_t is None else max_t  # a placeholder when nothing came before
    before[1:] = np.maximum.accumulate(seg_max)[:-1]
    if max_t is not None:
        before = np.maximum(before, max_t)
    has = np.ones(n, bool)
    if max_t is None:
        has[: first[1]] = False
    return np.repeat(before, np.diff(np.r_[first, n])), has


def _rows(msg: np.ndarray | None, m: np.ndarray) -> np.ndarray | None:
    return None if msg is None else msg[m]


class WindowObserver:
    """Told as things happen, before any window closes: rows read, rows (or inputs) rejected,
    and a rewind (a rebalance: what open windows buffered, rejections included, is read again).
    The daemon writes dead letters and moves its counters from here, at once."""

    def read(self, rows: int) -> None:
        """`rows` rows were read from the source."""

    def rejected(self, rejected: Rejected, rows: int) -> None:
        """`rows` rows (1 for an unreadable input) were rejected for `rejected.reason`."""

    def rewound(self) -> None:
        """The source went back to the last window boundary."""


class Windower:
    def __init__(
        self,
        source: Source,
        decoder: Decoder,
        window_seconds: int,
        allowed_lateness: int = 0,
        idle_timeout: float | None = None,
        start: dict | None = None,
        watermark: int | None = None,
        read_upto: dict | None = None,
        stop=None,
        max_event_time_skew: int | None = 86400,
        observer: WindowObserver | None = None,
        lockstep=None,
    ):
        if window_seconds <= 0:
            raise ValueError("window length must be positive")
        if not isinstance(source, Source):  # positions are compared and resumed by the source itself
            raise TypeError(f"{type(source).__name__} is not a dimstream.stream.sources.base.Source")
        self.source, self.decoder = source, decoder
        self.length = int(window_seconds)
        self.lateness = int(allowed_lateness)
        self.idle_timeout = idle_timeout
        self.start_position, self.watermark, self.read_upto = start, watermark, read_upto
        # rows more than this many seconds ahead of the data are bad_event_time (None: no bound)
        self.max_skew = None if max_event_time_skew is None else int(max_event_time_skew)
        if self.max_skew is not None and self.max_skew < 0:
            raise ValueError("max_event_time_skew must be >= 0")
        self.stop = stop or (lambda: False)  # checked at every batch and heartbeat: a clean way out
        self.rewinds = 0  # times the source went back to the last window boundary (rebalances)
        self.observer = observer or WindowObserver()
        # readers of disjoint parts of one live stream (ranks): windows close only as all of them
        # agree, every lockstep.every_seconds (stream/lockstep.py); None: as this one reader sees fit
        self.lockstep = lockstep

    def _window_of(self, t: np.ndarray) -> np.ndarray:
        return (t // self.length) * self.length

    def windows(self) -> Iterator[Window]:
        # buffered parts of open windows: window start -> list of (SparseBatch, Table, SourceBatch)
        parts: dict[int, list] = {}
        pending_rejects: list[Rejected] = []
        counts: dict[str, int] = {}
        rows_read = replayed = 0
        max_t = None
        closed_end = self.watermark  # everything before it was handled
        # end of the windows the restart point's checkpoint covers: a re-read row is "already
        # handled" only if older than this. closed_end moves on as this run closes windows, and a
        # re-read row between the two sat in a window the crashed run never closed (not trained)
        replay_end = self.watermark
        last: SourceBatch | None = None
        last_data = time.monotonic()
        read_s = 0.0
        restart = (self.start_position, self.read_upto)  # the last window boundary (a checkpoint)
        # (SparseBatch, Table, SourceBatch, message index per row) of rows far ahead, decided at the next batch
        held: list = []
        last_front = None  # front() of the last batch judged (to decide held rows when the source ends)

        def reject(rej: Rejected, n: int):
            pending_rejects.append(rej)
            counts[rej.reason] = counts.get(rej.reason, 0) + n
            self.observer.rejected(rej, n)  # at once: not at a window close that may never come

        def reject_ahead(table: pa.Table, anchor: int | None):
            n = table.num_rows
            where = f"the largest event time so far, {anchor}" if anchor is not None else "the stream's other rows"
            reject(Rejected("bad_event_time", f"event time more than {self.max_skew} s ahead of {where}", table), n)

        def judge(items: list) -> list:
            """Rows far ahead of the data (see the module doc) must not move the watermark: rows
            not connected to it are held back for one batch; then placed unless they are still
            more than the skew ahead of that next batch's front, else rejected as bad_event_time."""
            nonlocal held, last_front
            last_front = front(items[-1][0].event_time)
            items = held + items
            confirmed = np.concatenate([np.full(len(it[0]), i < len(held)) for i, it in enumerate(items)])
            anchor = max_t if max_t is not None else closed_end
            times = np.concatenate([it[0].event_time for it in items])
            ahead = detached(times, anchor, self.max_skew, confirmed)
            out, new_held, at = [], [], 0
            for i, (batch, table, src_batch, msg) in enumerate(items):
                m = ahead[at : at + len(batch)]
                at += len(batch)
                if i < len(held):  # held once already: rejected if still ahead of the stream's front
                    m = batch.event_time > last_front + self.max_skew
                if m.any():
                    if i < len(held):
                        reject_ahead(table.filter(pa.array(m)), anchor)
                    else:
                        new_held.append((batch.take(m), table.filter(pa.array(m)), src_batch, _rows(msg, m)))
                    if m.all():
                        continue
                    batch, table, msg = batch.take(~m), table.filter(pa.array(~m)), _rows(msg, ~m)
                out.append((batch, table, src_batch, msg))
            held = new_held
            return out

        def place(batch: SparseBatch, table: pa.Table, sb: SourceBatch, msg: np.ndarray | None):
            """Buffer rows into their windows (late and replayed ones are not) and move max_t.
            `msg`: each row's message index (None: the batch is one message)."""
            nonlocal replayed, max_t
            t = batch.event_time
            keep = np.ones(len(t), bool)
            starts = self._window_of(t)
            if closed_end is not None:
                old = t < closed_end
                if old.any():
                    before = self.source.messages_before(sb, self.read_upto)
                    if np.ndim(before):  # per message: a poll may straddle read_upto
                        before = before[msg] if msg is not None else bool(np.all(before))
                    if np.any(before):
                        done = old & before & (t < replay_end)  # read and handled before the restart
                        replayed += int(done.sum())
                        keep &= ~done
                        old &= ~done
                    if old.any():
                        reject(
                            Rejected("late", f"event time before {closed_end}", table.filter(pa.array(old))),
                            int(old.sum()),
                        )
                    keep &= ~old
            if self.lockstep is None:  # in lockstep, closes (so lateness) are agreed across ranks
                keep &= ~passed_by_earlier(t, starts, msg, keep, table)
            if keep.all() and starts[0] == starts[-1] and (starts == starts[0]).all():
                # the common case: the whole batch lies in one window, nothing to split
                parts.setdefault(int(starts[0]), []).append((batch, table, sb))
            else:
                for s in np.unique(starts[keep]):
                    m = keep & (starts == s)
                    parts.setdefault(int(s), []).append((batch.take(m), table.filter(pa.array(m)), sb))
            max_t = int(t.max()) if max_t is None else max(max_t, int(t.max()))

        def passed_by_earlier(t, starts, msg, keep, table) -> np.ndarray:
            """Rows (among `keep`) whose window the rows read before their message had passed
            (see the module doc), rejected as late."""
            prior, has = earlier_max(t, msg, max_t)
            wm = prior - self.lateness
            passed = keep & has & (starts + self.length <= wm)
            if passed.any():
                s, e, w = int(starts[passed].min()), int(starts[passed].max()) + self.length, int(wm[passed].max())
                what = f"window [{s}, {e})" if e - s == self.length else f"windows in [{s}, {e})"
                detail = f"{what} already passed by the watermark {w} of earlier messages"
                reject(Rejected("late", detail, table.filter(pa.array(passed))), int(passed.sum()))
            return passed

        def close(start: int | None) -> Window:
            """Close window `start`; None: a window without a single accepted row (only
            rejections), which takes no event time, so the watermark stays where it was."""
            nonlocal pending_rejects, counts, rows_read, replayed, closed_end, read_s, restart
            empty_at = (closed_end or 0) if start is None else None
            mine = parts.pop(start, []) if start is not None else []
            # batches still buffered (open windows, held rows) are read again after a restart
            unfinished = [sb for s in sorted(parts) for _, _, sb in parts[s]] + [it[2] for it in held]
            batch = (
                SparseBatch.concat([p for p, _, _ in mine])
                if mine
                else SparseBatch.empty(self.decoder.schema.feature_names)
            )
            tables = [t for _, t, _ in mine if t is not None]
            w = Window(
                start if start is not None else empty_at,
                start + self.length if start is not None else empty_at,
                batch,
                concat_tables(tables) if tables else None,
                pending_rejects,
                counts,
                rows_read,
                replayed,
                self.source.resume_position(unfinished, last, self.start_position),
                self.source.read_upto_position(last, self.read_upto),
                read_s,
            )
            pending_rejects, counts, rows_read, replayed, read_s = [], {}, 0, 0, 0.0
            if start is not None:
                closed_end = w.end
            restart = (w.resume, w.read_upto)
            return w

        def release_held():
            """No next batch will judge the held rows (the source ended, or a live one went idle):
            those the last batch's front reaches are where the stream ended (a final jump, the
            last days of gappy data): placed; rows still ahead of it are rejected."""
            nonlocal held
            for batch, table, src_batch, msg in held:
                m = batch.event_time <= last_front + self.max_skew
                if m.all():
                    place(batch, table, src_batch, msg)
                    continue
                reject_ahead(table.filter(pa.array(~m)), max_t)
                if m.any():
                    place(batch.take(m), table.filter(pa.array(m)), src_batch, _rows(msg, m))
            held = []

        def agreed_closes() -> list:
            """A lockstep round: the windows every reader closes now (stream/lockstep.py)."""
            idle = self.idle_timeout is not None and time.monotonic() - last_data > self.idle_timeout
            if idle and held:  # no next batch is coming to judge them
                release_held()
            return self.lockstep.closes(max_t, list(parts), idle, bool(pending_rejects), self.lateness, self.length)

        t0 = time.perf_counter()
        for sb in self.source.read(self.start_position):
            if self.stop():
                return  # open windows are abandoned: the last checkpoint stays the resume point
            if self.lockstep is not None and self.lockstep.due():
                for start in agreed_closes():
                    read_s += time.perf_counter() - t0
                    yield close(start)
                    t0 = time.perf_counter()
            if sb.rewind:  # back to the last window boundary: drop what open windows buffered
                replay_end = closed_end  # the restart point is the last close
                parts.clear()
                held.clear()
                pending_rejects, counts, rows_read, replayed, max_t, last = [], {}, 0, 0, None, None
                self.start_position, self.read_upto = restart
                self.rewinds += 1
                self.observer.rewound()
                last_data = time.monotonic()
                continue
            if sb.batch is None and sb.error is None:  # heartbeat of a live source
                if sb.source_down:  # an outage is not idleness: the idle clock waits for the source
                    last_data = time.monotonic()
                    continue
                idle = self.idle_timeout is not None and time.monotonic() - last_data > self.idle_timeout
                idle = idle and self.lockstep is None  # in lockstep, idleness is agreed in rounds
                if idle and held:  # no next batch is coming to judge them
                    release_held()
                if idle and (parts or pending_rejects):  # nothing decodes: close an empty window all the same
                    read_s += time.perf_counter() - t0
                    yield close(min(parts) if parts else None)
                    t0 = time.perf_counter()
                continue
            last = sb
            last_data = time.monotonic()
            if sb.error is not None:
                reject(Rejected(sb.error, sb.detail, None), 1)
                continue
            rows_read += sb.batch.num_rows
            self.observer.read(sb.batch.num_rows)
            res = self.decoder.decode(sb.batch)
            for rej in res.rejected:
                reject(rej, res.rejected_counts.get(rej.reason, 0) if rej.rows is not None else 1)
            if len(res.batch) == 0:
                continue
            items = [(res.batch, res.table, sb, message_index(sb.message_rows, res.kept, len(res.batch)))]
            if self.max_skew is not None:
                items = judge(items)
            for batch, table, src_batch, msg in items:
                place(batch, table, src_batch, msg)
            # close every window whose end the watermark has passed (in lockstep: as agreed)
            while self.lockstep is None and parts and max_t - self.lateness >= min(parts) + self.length:
                read_s += time.perf_counter() - t0
                yield close(min(parts))
                t0 = time.perf_counter()
        read_s += time.perf_counter() - t0
        release_held()
        while parts and not self.stop():  # the source ended: close what is left, in order
            yield close(min(parts))
        if pending_rejects and not self.stop():  # rejections after the last window: recorded too
            yield close(None)
