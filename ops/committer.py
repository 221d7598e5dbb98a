"""What a closed window leaves behind, in the order that makes a crash at any point safe.

1. the window's dead letters (written and sent to the broker's DLQ when they were rejected,
   ops/deadletters.py) rotated into STATE/deadletter/window-<n>.arrow, and the recent-rows
   buffer that `dimstream search` reads;
2. the checkpoint (every rank writes its part; ops/checkpoint.py), which names the history
   log's length and holds the window's record;
3. the window's record, appended to the history log (ops/history.py);
4. the publication for serving (EXPORT_DIR/window-<n>, then the `latest` pointer);
5. the source's commit (Kafka offsets), only now that the checkpoint is durable.
A crash before 2 leaves the previous checkpoint as the resume point: the window is trained
again, once. A crash after 2 resumes after the window; 3-5 are redone or re-told at start
(`History.resume`, `LiveSource.recover`).

Rank 0 alone writes 1, 3, 4 and 5 (`rank0`); every rank writes its shard in 2, and rank 0
marks the checkpoint complete once every shard is durable (ops/checkpoint.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from dimstream.ops import checkpoint
from dimstream.ops.deadletters import DeadLetters
from dimstream.ops.history import History
from dimstream.ops.record import WindowRecord
from dimstream.stream import deadletter
from dimstream.stream.atomic import write_bytes
from dimstream.stream.sources.base import LiveSource
from dimstream.stream.window import Window


class Committer:
    def __init__(
        self,
        state_dir: Path,
        source,
        deadletters: DeadLetters,
        *,
        rank0: bool,
        recent_rows: int,
        export_dir: Path | None = None,
        base_every: int = 24,
    ):
        self.state_dir = Path(state_dir)
        self.source = source
        self.deadletters = deadletters
        self.rank0 = rank0
        self.recent_rows = recent_rows
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.base_every = base_every
        self._publisher = None  # ops/export.Publisher, made on first publication (rank 0)

    def close(
        self,
        window: Window,
        record: WindowRecord,
        meta: Callable[[WindowRecord], dict],
        arms: list,
        history: History,
        publish=None,
        extra: dict | None = None,
    ) -> None:
        """Steps 1-5 for `window`; `meta(record)` is the checkpoint's meta (built after step 1),
        `publish` the arm exported for serving, `extra` tensors checkpointed beside the arms."""
        if self.rank0:
            self.deadletters.rotate(record.index)
            self._recent_rows(window)
        t0 = time.perf_counter()
        info = meta(record)
        checkpoint.save(self.state_dir, record.index, info, arms, extra=extra)  # every rank: its part
        record.checkpoint_seconds = time.perf_counter() - t0
        history.append(record.to_dict())  # counted on every rank, written by rank 0 (History.writer)
        weights = None
        if self.export_dir is not None and publish is not None:
            from dimstream.ops.export import export_weights

            weights = export_weights(publish)  # every rank: the tables are gathered from their shards
        if not self.rank0:
            return
        if weights is not None:
            self._publish(record.index, publish, info, weights)
        if isinstance(self.source, LiveSource) and window.resume is not None:
            self.source.commit(window.resume, window.end, window.read_upto, window=record.index)

    def _recent_rows(self, window: Window) -> None:
        if window.table is None or not window.table.num_rows:
            return
        recent = window.table.slice(max(0, window.table.num_rows - self.recent_rows))
        write_bytes(self.state_dir / "recent" / "rows.arrow", deadletter.to_ipc_bytes(recent))

    def _publish(self, index: int, arm, meta: dict, weights: dict) -> None:
        """Export the arm as checkpointed for serving and move `latest` atomically, the way
        online systems publish a model every hour."""
        from dimstream.ops.export import Publisher

        if self._publisher is None:  # base every `base_every` windows, deltas between (README "Serving")
            self._publisher = Publisher(self.export_dir, self.base_every)
        self._publisher.publish(index, arm, meta, weights)
