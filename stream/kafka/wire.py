"""One Kafka message = one Arrow IPC stream (schema + one record batch) of many rows.

Headers: `format` (b"arrow", or b"jsonl" for producers that cannot write Arrow: one JSON object
per line, decoded in bulk by pyarrow.json) and `schema_version` (the Schema fingerprint). The
Arrow schema's metadata carries the dimstream schema itself (`dimstream.schema.v1`). Messages of
other producers, without these headers, are recognised by content (stream/kafka/formats.py).
A message with no rows (a tombstone with value None, an empty value, JSON lines that are all
blank) raises WireError "empty_message": dead-lettered like any other bad message.

>>> import pyarrow as pa
>>> value, headers = encode_arrow(pa.record_batch({"x": [1, 2]}), "abc")
>>> decode_message(value, headers, "abc").num_rows
2
"""

from __future__ import annotations

import pyarrow as pa

from dimstream.stream.schema import Schema


class WireError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def encode_arrow(
    rb: pa.RecordBatch, schema_version: str, schema: Schema | None = None
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """One Arrow message; with `schema`, the stream carries it: the declaration goes into the
    Arrow schema metadata under `dimstream.schema.v1` (README, Kafka: the contract)."""
    if schema is not None:
        rb = rb.replace_schema_metadata({**(rb.schema.metadata or {}), **schema.to_metadata()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema) as w:
        w.write_batch(rb)
    return sink.getvalue().to_pybytes(), [("format", b"arrow"), ("schema_version", schema_version.encode())]


def encode_jsonl(rows: list[dict], schema_version: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    import json

    value = "\n".join(json.dumps(r) for r in rows).encode()
    return value, [("format", b"jsonl"), ("schema_version", schema_version.encode())]


def decode_message(
    value: bytes | None, headers, expected_version: str | None, declared_format: str = "auto"
) -> pa.RecordBatch:
    """The message's rows, or WireError(reason, detail) for a message that cannot be trained on.
    One message alone; the Kafka source decodes a poll's messages together (formats.decode_values).

    >>> decode_message(None, [("format", b"arrow")], None)
    Traceback (most recent call last):
    ...
    dimstream.stream.kafka.wire.WireError: empty_message: a message without a value (a tombstone)
    >>> decode_message(b'{"x": 1}', None, None).num_rows  # no headers: recognised by content
    1
    """
    from dimstream.stream.kafka.formats import decode_values

    (piece,) = decode_values([value], [headers], expected_version, declared_format)
    if piece.error is not None:
        raise piece.error
    return piece.rb
