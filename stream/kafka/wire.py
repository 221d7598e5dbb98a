"""One Kafka message = one Arrow IPC stream (schema + one record batch) of many rows.

Headers: `format` (b"arrow", or b"jsonl" for producers that cannot write Arrow: one JSON object
per line, decoded in bulk by pyarrow.json) and `schema_version` (the Schema fingerprint).
A message with no rows (a tombstone with value None, an empty value, JSON lines that are all
blank) raises WireError "empty_message": dead-lettered like any other bad message.

>>> import pyarrow as pa
>>> value, headers = encode_arrow(pa.record_batch({"x": [1, 2]}), "abc")
>>> decode_message(value, headers, "abc").num_rows
2
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.json as pajson


class WireError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def encode_arrow(rb: pa.RecordBatch, schema_version: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema) as w:
        w.write_batch(rb)
    return sink.getvalue().to_pybytes(), [("format", b"arrow"), ("schema_version", schema_version.encode())]


def encode_jsonl(rows: list[dict], schema_version: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    import json

    value = "\n".join(json.dumps(r) for r in rows).encode()
    return value, [("format", b"jsonl"), ("schema_version", schema_version.encode())]


def decode_message(value: bytes | None, headers, expected_version: str | None) -> pa.RecordBatch:
    """The message's rows, or WireError(reason, detail) for a message that cannot be trained on.

    >>> decode_message(None, [("format", b"arrow")], None)
    Traceback (most recent call last):
    ...
    dimstream.stream.kafka.wire.WireError: empty_message: a message without a value (a tombstone)
    """
    try:
        h = {k: (v or b"") for k, v in (headers or [])}
    except (TypeError, ValueError):
        raise WireError("corrupt_input", "headers are not (key, value) pairs") from None
    if value is None:
        raise WireError("empty_message", "a message without a value (a tombstone)")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise WireError("corrupt_input", f"message value of type {type(value).__name__}")
    if not bytes(value).strip():
        raise WireError("empty_message", "an empty message value")
    version = bytes(h.get("schema_version", b"")).decode(errors="replace")
    if expected_version is not None and version != expected_version:
        raise WireError("unknown_schema", f"schema version {version!r}, expected {expected_version!r}")
    fmt = h.get("format", b"arrow")
    if fmt == b"jsonl":
        try:
            table = pajson.read_json(pa.BufferReader(value))  # bulk, not row by row
        except (pa.ArrowInvalid, OSError) as e:
            raise WireError("corrupt_input", f"not JSON lines: {e}") from None
        if table.num_rows == 0:
            raise WireError("empty_message", "JSON lines without any row")
        return table.combine_chunks().to_batches()[0]
    if fmt != b"arrow":
        raise WireError("corrupt_input", f"unsupported format {fmt!r}")
    try:
        table = pa.ipc.open_stream(pa.py_buffer(value)).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise WireError("corrupt_input", f"not an Arrow IPC stream: {e}") from None
    return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], table.schema)
