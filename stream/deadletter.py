"""Dead-letter files: every rejected row (or unreadable input) with its reason.

Columns reason, detail, row (the rejected row as JSON; rows of any schema fit one file).
Rejections are rare, so turning rows into JSON row by row is off the hot path.

`DeadLetterLog` writes rejections when they happen, not when their window closes (a window
may never close): each goes to STATE/deadletter/open.arrows (an Arrow IPC stream, appended
and fsynced per rejection), which the window's close rotates into window-<index>.arrow (an
IPC file, atomically). What open.arrows holds belongs to windows not yet closed: after a crash
or a rebalance those inputs are read, and rejected, again, so the stale file is discarded.

>>> import tempfile
>>> log = DeadLetterLog(Path(tempfile.mkdtemp()))
>>> log.write(Rejected("null_label", "label is null", pa.table({"label": [None, None]}))).num_rows
2
>>> log.open_rows()
2
>>> log.rotate(0).name, read(log.directory / "window-000000.arrow").column("reason").to_pylist()
('window-000000.arrow', ['null_label', 'null_label'])
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa

from dimstream.stream.decode import Rejected

log = logging.getLogger(__name__)
OPEN_FILE = "open.arrows"
DEADLETTER_SCHEMA = pa.schema([("reason", pa.string()), ("detail", pa.string()), ("row", pa.string())])


def _json_default(x):
    return x.isoformat() if hasattr(x, "isoformat") else repr(x)


def to_table(rejected: list[Rejected]) -> pa.Table:
    reasons, details, rows = [], [], []
    for r in rejected:
        if r.rows is None or r.rows.num_rows == 0:
            reasons.append(r.reason), details.append(r.detail), rows.append(None)
            continue
        for row in r.rows.to_pylist():
            reasons.append(r.reason), details.append(r.detail)
            rows.append(json.dumps(row, default=_json_default, allow_nan=True))
    return pa.table([reasons, details, rows], schema=DEADLETTER_SCHEMA)


def to_ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def read(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_file(src).read_all()


class DeadLetterLog:
    """The dead letters of the open windows, durable as soon as they are rejected."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / OPEN_FILE
        self._file = self._writer = None
        self._rows = 0
        if self.path.exists():  # a crashed run's: its inputs will be read and rejected again
            log.info("discarding %s: the rejections of windows that never closed are made again", self.path)
            self.path.unlink()

    def write(self, rejected: Rejected) -> pa.Table:
        """Append one rejection (its rows) and fsync; returns the dead-letter table written."""
        table = to_table([rejected])
        if self._writer is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")
            self._writer = pa.ipc.new_stream(self._file, DEADLETTER_SCHEMA)
        self._writer.write_table(table)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._rows += table.num_rows
        return table

    def open_rows(self) -> int:
        """Dead-letter rows written since the last rotation."""
        return self._rows

    def rotate(self, index: int) -> Path | None:
        """At window `index`'s close: its dead letters become window-<index>.arrow (None if it
        had none)."""
        if self._writer is None:
            return None
        table = self._read_open()
        out = self.directory / f"window-{index:06d}.arrow"
        from dimstream.stream.atomic import write_bytes

        write_bytes(out, to_ipc_bytes(table))
        self.discard()
        return out

    def discard(self) -> None:
        """Drop the open windows' dead letters (a rewind: their inputs are read again)."""
        if self._writer is not None:
            self._writer.close()
            self._file.close()
        self._file = self._writer = None
        self._rows = 0
        self.path.unlink(missing_ok=True)

    def _read_open(self) -> pa.Table:
        self._writer.close()
        self._file.close()
        self._file = self._writer = None
        with pa.OSFile(str(self.path), "rb") as f:
            return pa.ipc.open_stream(f).read_all()
