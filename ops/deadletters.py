"""Rejections as they happen: the dead-letter file, the broker's DLQ, the counters, a warning.

The window loop tells `DeadLetters` (a `WindowObserver`) of every row read and every
rejection at once, so a stream in which nothing decodes shows on /metrics and in
STATE/deadletter/ within seconds, not at a window close that may never come. When more than
half of the last `RECENT_ROWS` rows were rejected, one WARNING line names the top reason and
an example, repeated at most every `WARN_EVERY_SECONDS` while it lasts; the gauge
dimstream_rows_rejected_recent_ratio carries the same share for the alert.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from pathlib import Path

from dimstream.ops.metrics import Metrics
from dimstream.stream.deadletter import DeadLetterLog
from dimstream.stream.decode import Rejected
from dimstream.stream.sources.base import LiveSource
from dimstream.stream.window import WindowObserver

log = logging.getLogger("dimstream")
RECENT_ROWS = 1000  # the span of rows the rejected share is taken over
MIN_ROWS = 100  # no verdict on fewer rows than this
WARN_EVERY_SECONDS = 30.0


class DeadLetters(WindowObserver):
    def __init__(self, state_dir: Path, source, metrics: Metrics, *, rank0: bool = True):
        self.source = source
        self.metrics = metrics
        self.log = DeadLetterLog(Path(state_dir) / "deadletter") if rank0 else None
        self._recent: deque[tuple[int, int, str]] = deque()  # (rows read, rows rejected, reason)
        self._read = self._rejected = 0
        self._last_warning = -float("inf")
        self._example = ""

    def read(self, rows: int) -> None:
        self.metrics.rows_consumed.inc(rows)
        self._add(rows, 0, "")

    def rejected(self, rejected: Rejected, rows: int) -> None:
        self.metrics.rows_rejected.labels(rejected.reason).inc(rows)
        if self.log is not None:
            table = self.log.write(rejected)
            if isinstance(self.source, LiveSource):  # the broker's DLQ topic too, at once
                self.source.dead_letter_rows(table)
        unread = rejected.rows is None  # an input that could not be read at all counts as one row
        self._example = f"{rejected.reason}: {rejected.detail}"[:200]
        self._add(1 if unread else 0, rows, rejected.reason)
        self._maybe_warn()

    def rewound(self) -> None:
        if self.log is not None:
            self.log.discard()

    def rotate(self, index: int) -> Path | None:
        """At window `index`'s close: its dead letters into deadletter/window-<index>.arrow."""
        return self.log.rotate(index) if self.log is not None else None

    def recent_ratio(self) -> float:
        return self._rejected / self._read if self._read else 0.0

    def _add(self, read: int, rejected: int, reason: str) -> None:
        self._recent.append((read, rejected, reason))
        self._read += read
        self._rejected += rejected
        while len(self._recent) > 1 and self._read - self._recent[0][0] >= RECENT_ROWS:
            r, j, _ = self._recent.popleft()
            self._read -= r
            self._rejected -= j
        self.metrics.rows_rejected_recent_ratio.set(self.recent_ratio())

    def _maybe_warn(self) -> None:
        if self._read < MIN_ROWS or self.recent_ratio() <= 0.5:
            return
        if time.monotonic() - self._last_warning < WARN_EVERY_SECONDS:
            return
        self._last_warning = time.monotonic()
        reasons = Counter()
        for _, j, reason in self._recent:
            reasons[reason] += j
        top, n = reasons.most_common(1)[0]
        log.warning(
            "%d of the last %d rows were rejected; top reason %s (%d rows), e.g. %s",
            self._rejected,
            self._read,
            top,
            n,
            self._example,
        )
