"""Event-time windows over a Source: the unit of test-then-train, checkpoints and search.

A window [start, start + length) closes when the watermark (largest event time seen minus the
allowed lateness) passes its end, when the source ends, or after `idle_timeout` seconds of a
live source with no data (time while the source reports itself down does not count). Rows
older than the open window are late: rejected with reason "late". After a restart, rows older
than the checkpointed watermark that come from batches read before the crash are skipped as
already handled (trained or dead-lettered): see stream.sources.base for the position contract.

>>> from dimstream.stream.synthetic import SyntheticSource
>>> from dimstream.stream.decode import Decoder
>>> src = SyntheticSource(seed=0, rows_per_window=2000, batch_rows=700, max_windows=2)
>>> ws = list(Windower(src, Decoder(src.schema), 3600).windows())
>>> [(w.start - ws[0].start, len(w.batch)) for w in ws]
[(0, 2000), (3600, 2000)]
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dimstream.stream.batch import SparseBatch
from dimstream.stream.decode import Decoder, Rejected
from dimstream.stream.sources.base import Source, SourceBatch


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
        self.stop = stop or (lambda: False)  # checked at every batch and heartbeat: a clean way out
        self.rewinds = 0  # times the source went back to the last window boundary (rebalances)

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
        last: SourceBatch | None = None
        last_data = time.monotonic()
        read_s = 0.0
        restart = (self.start_position, self.read_upto)  # the last window boundary (a checkpoint)

        def reject(rej: Rejected, n: int):
            pending_rejects.append(rej)
            counts[rej.reason] = counts.get(rej.reason, 0) + n

        def close(start: int) -> Window:
            nonlocal pending_rejects, counts, rows_read, replayed, closed_end, read_s, restart
            mine = parts.pop(start, [])
            unfinished = [sb for s in sorted(parts) for _, _, sb in parts[s]]
            batch = (
                SparseBatch.concat([p for p, _, _ in mine])
                if mine
                else SparseBatch.empty(self.decoder.schema.feature_names)
            )
            tables = [t for _, t, _ in mine if t is not None]
            w = Window(
                start,
                start + self.length,
                batch,
                pa.concat_tables(tables) if tables else None,
                pending_rejects,
                counts,
                rows_read,
                replayed,
                self.source.resume_position(unfinished, last, self.start_position),
                self.source.read_upto_position(last, self.read_upto),
                read_s,
            )
            pending_rejects, counts, rows_read, replayed, read_s = [], {}, 0, 0, 0.0
            closed_end = w.end
            restart = (w.resume, w.read_upto)
            return w

        t0 = time.perf_counter()
        for sb in self.source.read(self.start_position):
            if self.stop():
                return  # open windows are abandoned: the last checkpoint stays the resume point
            if sb.rewind:  # back to the last window boundary: drop what open windows buffered
                parts.clear()
                pending_rejects, counts, rows_read, replayed, max_t, last = [], {}, 0, 0, None, None
                self.start_position, self.read_upto = restart
                self.rewinds += 1
                last_data = time.monotonic()
                continue
            if sb.batch is None and sb.error is None:  # heartbeat of a live source
                if sb.source_down:  # an outage is not idleness: the idle clock waits for the source
                    last_data = time.monotonic()
                    continue
                if parts and self.idle_timeout is not None and time.monotonic() - last_data > self.idle_timeout:
                    read_s += time.perf_counter() - t0
                    yield close(min(parts))
                    t0 = time.perf_counter()
                continue
            last = sb
            last_data = time.monotonic()
            if sb.error is not None:
                reject(Rejected(sb.error, sb.detail, None), 1)
                continue
            rows_read += sb.batch.num_rows
            res = self.decoder.decode(sb.batch)
            for rej in res.rejected:
                reject(rej, res.rejected_counts.get(rej.reason, 0) if rej.rows is not None else 1)
            if len(res.batch) == 0:
                continue
            t = res.batch.event_time
            keep = np.ones(len(t), bool)
            if closed_end is not None:
                old = t < closed_end
                if old.any():
                    if self.source.is_before(sb.position, self.read_upto):
                        replayed += int(old.sum())  # read and handled before the restart
                    else:
                        reject(
                            Rejected("late", f"event time before {closed_end}", res.table.filter(pa.array(old))),
                            int(old.sum()),
                        )
                    keep &= ~old
            starts = self._window_of(t)
            if keep.all() and starts[0] == starts[-1] and (starts == starts[0]).all():
                # the common case: the whole batch lies in one window, nothing to split
                parts.setdefault(int(starts[0]), []).append((res.batch, res.table, sb))
            else:
                for s in np.unique(starts[keep]):
                    m = keep & (starts == s)
                    parts.setdefault(int(s), []).append((res.batch.take(m), res.table.filter(pa.array(m)), sb))
            max_t = int(t.max()) if max_t is None else max(max_t, int(t.max()))
            # close every window whose end the watermark has passed
            while parts and max_t - self.lateness >= min(parts) + self.length:
                read_s += time.perf_counter() - t0
                yield close(min(parts))
                t0 = time.perf_counter()
        read_s += time.perf_counter() - t0
        while parts and not self.stop():  # the source ended: close what is left, in order
            yield close(min(parts))
