"""One Kafka message = one Arrow IPC stream (schema + one record batch) of many rows.

Headers: `format` (b"arrow") and `schema_version` (the Schema fingerprint the rows follow).

>>> import pyarrow as pa
>>> value, headers = encode_arrow(pa.record_batch({"x": [1, 2]}), "abc")
>>> decode_message(value, headers, "abc").num_rows
2
"""
from __future__ import annotations

import pyarrow as pa


class WireError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def encode_arrow(rb: pa.RecordBatch, schema_version: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema) as w:
        w.write_batch(rb)
    return sink.getvalue().to_pybytes(), [("format", b"arrow"), ("schema_version", schema_version.encode())]


def decode_message(value: bytes, headers, expected_version: str | None) -> pa.RecordBatch:
    h = {k: v for k, v in (headers or [])}
    version = h.get("schema_version", b"").decode(errors="replace")
    if expected_version is not None and version != expected_version:
        raise WireError("unknown_schema", f"schema version {version!r}, expected {expected_version!r}")
    if h.get("format", b"arrow") != b"arrow":
        raise WireError("corrupt_input", f"unsupported format {h.get('format')!r}")
    try:
        table = pa.ipc.open_stream(pa.py_buffer(value)).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise WireError("corrupt_input", f"not an Arrow IPC stream: {e}") from None
    return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], table.schema)
