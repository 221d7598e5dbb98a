"""Dead-letter files: every rejected row (or unreadable input) with its reason.

One Arrow IPC file per window, STATE/deadletter/window-<index>.arrow, columns
reason, detail, row (the rejected row as JSON; rows of any schema fit one file).
Rejections are rare, so turning rows into JSON row by row is off the hot path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from dimstream.stream.decode import Rejected

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
