"""Windows closed in lockstep by readers of disjoint parts of one live stream (torchrun ranks,
each reading its own Kafka partitions).

Every reader runs its own `Windower`; none closes a window on its own. A reader's event time is
the largest it has placed, bounded by its source (`floor`: for Kafka the oldest of its partitions
that still have messages to read, so one partition read ahead of another holds nothing late). Every `every_seconds`
(a live source yields a batch or a heartbeat at least every poll) each reader hands `gather` (a
collective all-gather of a few ints, injected by the caller: stream/ knows no process group)
its largest event time, whether it has been idle for the idle timeout, whether it holds
rejections outside any window, and the starts of its oldest open windows. From what every
reader said, all of them close the same windows, in order:
  - the watermark is the minimum over the readers that are not idle of their largest event
    time, minus the allowed lateness: a window closes only once every reader has read past its
    end, so a reader that lags (fewer rows, a slower broker) loses no row as late. A reader
    that has read nothing yet holds the watermark until it goes idle (as an idle input does in
    Flink, an idle reader no longer holds it back);
  - the windows closed are those of the union of the readers' open windows that end at or
    before the watermark: a reader without a row in one closes it empty, so every reader takes
    part in the same training steps (its share padded with zero-weight rows);
  - with every reader idle, the oldest open window closes (one per round, as one process closes
    one per idle heartbeat), or a window of rejections only when no reader has an open window.
The rounds are matched by order, not by time, so each reader calls `closes` in the same
sequence; the windows they return are then processed by all readers before the next round.

>>> import numpy as np
>>> seen = np.array([[7300, 0, 0, 0, 3600, MAX], [4000, 0, 0, 0, 3600, MAX]])  # [max_t, idle, rej, starts]
>>> agreed(seen, lateness=0, length=3600)  # reader 1 has read to 4000 only: window 3600 stays open
[0]
>>> agreed(np.array([[7300, 0, 0, 3600, MAX], [MIN, 0, 0, MAX, MAX]]), 0, 3600)  # reader 1: nothing yet
[]
>>> agreed(np.array([[7300, 0, 0, 3600, MAX], [MIN, 1, 0, MAX, MAX]]), 0, 3600)  # reader 1 idle
[3600]
>>> agreed(np.array([[5000, 1, 0, 3600, MAX], [MIN, 1, 0, MAX, MAX]]), 0, 3600)  # all idle: the oldest
[3600]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

MIN, MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def agreed(seen: np.ndarray, lateness: int, length: int) -> list[int | None]:
    """The windows every reader closes now (starts; None: a window of rejections only), from
    `seen`, one row per reader: [largest event time (MIN: none), idle, holds rejections, the starts
    of its oldest open windows ascending, MAX-padded]."""
    max_t, idle, rejected, starts = seen[:, 0], seen[:, 1].astype(bool), seen[:, 2].astype(bool), seen[:, 3:]
    # a reader with all its slots full may hold later windows: only those before its last are known
    horizon = int(starts[:, -1].min())
    union = np.unique(starts[(starts <= horizon) & (starts != MAX)])
    if idle.all():
        if union.size:
            return [int(union[0])]
        return [None] if rejected.any() else []
    active = max_t[~idle]
    if (active == MIN).any():
        return []  # a reader that has read nothing yet (and is not idle) holds the watermark
    watermark = int(active.min()) - lateness
    return [int(s) for s in union if s + length <= watermark]


class Lockstep:
    """The readers' agreement on which windows close (module doc); `gather(values)` returns every
    reader's `values` as rows of an int64 array, in reader order (a collective)."""

    def __init__(
        self,
        gather: Callable[[list[int]], np.ndarray],
        floor: Callable[[], int | None] | None = None,
        every_seconds: float = 0.2,
        depth: int = 8,
    ):
        self.gather, self.every_seconds, self.depth = gather, float(every_seconds), int(depth)
        # the source's bound on this reader's event time: the newest time every one of its parts
        # still being read has reached (KafkaSource.event_time_floor); None: no bound
        self.floor = floor
        self._last = time.monotonic()
        self.rounds = 0

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_seconds

    def closes(
        self, max_t: int | None, starts: list[int], idle: bool, rejected: bool, lateness: int, length: int
    ) -> list[int | None]:
        """One round: this reader's state in, the windows every reader closes out."""
        mine = sorted(starts)[: self.depth]
        bound = self.floor() if self.floor is not None and max_t is not None else None
        if bound is not None:
            max_t = min(int(max_t), int(bound))
        values = [MIN if max_t is None else int(max_t), int(idle), int(rejected)]
        values += mine + [MAX] * (self.depth - len(mine))
        seen = np.asarray(self.gather(values), np.int64).reshape(-1, len(values))
        self._last = time.monotonic()
        self.rounds += 1
        return agreed(seen, int(lateness), int(length))
