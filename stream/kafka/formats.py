"""What a Kafka message holds, by its headers, the source's declared format or its content; and
the decoding of one poll's messages in bulk.

dimstream's producers set the header `format` (b"arrow" or b"jsonl"). Other producers' messages
carry no such header: their format is declared per source (`kafka://HOST:PORT/TOPIC?format=json`)
or recognised by content (`sniff`):
- Arrow IPC stream: the continuation marker 0xFFFFFFFF;
- JSON: a first non-blank byte "{" (one object per message, or JSON lines) or "[";
- Avro object container (b"Obj\\x01"), Confluent schema-registry framing (magic byte 0, then a
  4-byte schema id: Avro, Protobuf or JSON Schema behind a registry) and Protobuf (named by a
  `content-type` header) are formats dimstream does not read: `unsupported_format`.

JSON is decoded in bulk: the single-line values of consecutive JSON messages of a poll are
joined with b"\\n" into one buffer for one `pyarrow.json.read_json` call (one event per message
is the usual event topic: a call per message would cost more than training), parsed in blocks on
every core. Only when that call fails is the run split in halves, and so on, to find the bad
messages: the good ones stay in bulk. A multi-line message (JSON lines, or one pretty-printed
object) is decoded on its own.

Every parsed table is put in one canonical column order (`canonical`): the schema's declared
columns in declaration order, then any others sorted by name, struct fields sorted by name at
every depth. pyarrow orders columns by when its threads first met them, so a column first met
in a later block could come at another place from one run to the next; in canonical order a
poll's table is the same whatever the blocks and their timing (tests/test_kafka_formats.py).

>>> values = [b'{"x": 1}', b'{"x": 2}', b"\\x00\\x00\\x00\\x00\\x07avro", b'{"x": 3}', b'{"x": ']
>>> [(p.lo, p.hi, p.rb.num_rows if p.rb is not None else p.error.reason) for p in decode_values(values)]
[(0, 2, 2), (2, 3, 'unsupported_format'), (3, 4, 1), (4, 5, 'corrupt_input')]
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson

from dimstream.stream.kafka.wire import WireError
from dimstream.stream.schema import METADATA_KEY, Schema, SchemaError

FORMATS = ("auto", "arrow", "json")  # what a source may declare (`?format=`)
UNSUPPORTED = {
    "avro": "an Avro object container file (b'Obj\\x01')",
    "confluent": "Confluent schema-registry framing (magic byte 0 + 4-byte schema id: Avro, Protobuf or JSON Schema)",
    "protobuf": "Protobuf",
    "unknown": "no format dimstream reads (not Arrow IPC, JSON, Avro or schema-registry framing)",
}
_BLANK = b" \t\r\n"
_MIN_BLOCK = 1 << 19  # smaller blocks cost more per block than the parallel parse gains
_BLOCKS_PER_CORE = 2  # more blocks than cores: pyarrow's threads overlap finding lines and parsing


@dataclass
class Piece:
    """Messages [lo, hi) of a poll decoded together: rows, or the error of one message."""

    lo: int
    hi: int
    rb: pa.RecordBatch | None = None
    error: WireError | None = None
    schema: Schema | None = None  # the schema an Arrow message's metadata carries
    fmt: str = "arrow"


def header_dict(headers) -> dict:
    try:
        return {k: (v or b"") for k, v in (headers or [])}
    except (TypeError, ValueError):
        raise WireError("corrupt_input", "headers are not (key, value) pairs") from None


def sniff(value: bytes, headers: dict | None = None) -> str:
    """The format of a message without dimstream's `format` header, from its first bytes.

    >>> sniff(b"\\xff\\xff\\xff\\xff..."), sniff(b'  {"a": 1}'), sniff(b"Obj\\x01...")
    ('arrow', 'json', 'avro')
    >>> sniff(b"\\x00\\x00\\x00\\x00\\x01x")  # Confluent: magic byte 0, schema id 1
    'confluent'
    >>> sniff(b"\\x08\\x96\\x01"), sniff(b"\\x08\\x96\\x01", {"content-type": b"application/x-protobuf"})
    ('unknown', 'protobuf')
    """
    head = bytes(value[:64])
    if head[:4] == b"\xff\xff\xff\xff":
        return "arrow"
    if head[:4] == b"Obj\x01":
        return "avro"
    if head[:1] == b"\x00" and len(value) >= 5:
        return "confluent"
    if head.lstrip(_BLANK)[:1] in (b"{", b"["):  # an array is JSON too (then refused: not one object per event)
        return "json"
    if b"protobuf" in bytes((headers or {}).get("content-type", b"")).lower():
        return "protobuf"
    return "unknown"


def message_format(value: bytes, headers: dict, declared: str = "auto") -> str:
    """dimstream's `format` header first, then the source's declared format, then the content."""
    fmt = headers.get("format")
    if fmt is not None:
        fmt = bytes(fmt)
        if fmt == b"arrow":
            return "arrow"
        if fmt in (b"jsonl", b"json"):
            return "json"
        return "protobuf" if b"proto" in fmt.lower() else "avro" if b"avro" in fmt.lower() else "unknown"
    if declared != "auto":
        return declared
    return sniff(value, headers)


def _empty(value) -> bool:
    """A value with no content (tombstones are caught before): only blanks. Cheap for large values."""
    return len(value) == 0 or (bytes(value[:1]) in (b" ", b"\t", b"\r", b"\n") and not bytes(value).strip(_BLANK))


def check_value(value) -> bytes:
    if value is None:
        raise WireError("empty_message", "a message without a value (a tombstone)")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise WireError("corrupt_input", f"message value of type {type(value).__name__}")
    if _empty(value):
        raise WireError("empty_message", "an empty message value")
    return value


def decode_arrow(value: bytes) -> tuple[pa.RecordBatch, Schema | None]:
    """One Arrow IPC stream: its rows and the dimstream schema its metadata carries (or None)."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(value)).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise WireError("corrupt_input", f"not an Arrow IPC stream: {e}") from None
    try:
        blob = (table.schema.metadata or {}).get(METADATA_KEY)
        schema = None if blob is None else _schema_of(blob)
    except SchemaError as e:
        raise WireError("schema_mismatch", f"the message's schema metadata is no dimstream schema: {e}") from None
    rb = table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], table.schema)
    return rb, schema


@functools.lru_cache(maxsize=16)
def _schema_of(blob: bytes) -> Schema:
    """Parsed once per distinct metadata: the messages of one producer carry the same bytes."""
    return Schema.from_metadata({METADATA_KEY: blob})


def declared_columns(schema: Schema | None) -> tuple[str, ...]:
    """The columns a schema declares, in declaration order: its fields' then label and event time."""
    if schema is None:
        return ()
    names = [f.source_column for f in schema.fields] + [schema.label, schema.event_time]
    return tuple(dict.fromkeys(names))


def _sorted_type(t: pa.DataType) -> pa.DataType:
    """`t` with the fields of every struct in it sorted by name (pyarrow orders them as met)."""
    if pa.types.is_struct(t):
        fields = sorted((t.field(i) for i in range(t.num_fields)), key=lambda f: f.name)
        return pa.struct([f.with_type(_sorted_type(f.type)) for f in fields])
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = t.value_field.with_type(_sorted_type(t.value_type))
        return pa.list_(inner) if pa.types.is_list(t) else pa.large_list(inner)
    return t


def canonical(table: pa.Table, columns: tuple[str, ...] = ()) -> pa.Table:
    """The table's columns in canonical order (see the module doc): `columns` first, in their
    order, then the others by name; struct fields by name. Costs nothing per row when the order
    is already canonical, a select otherwise (no copy of the columns)."""
    names = table.column_names
    rank = {c: i for i, c in enumerate(columns)}
    order = sorted(range(len(names)), key=lambda i: (rank.get(names[i], len(rank)), names[i]))
    if order != list(range(len(names))):
        table = table.select(order)
    target = pa.schema([f.with_type(_sorted_type(f.type)) for f in table.schema])
    return table if target.equals(table.schema) else table.cast(target)  # struct casts go by field name


def _read_json(buf: bytes, longest: int | None = None, columns: tuple[str, ...] = ()) -> pa.Table:
    """JSON lines in blocks that pyarrow parses on every core (types are inferred per block and
    unified), in canonical column order. A block holds at least the longest line (`longest`;
    None: the whole buffer is one block)."""
    even = -(-len(buf) // ((os.cpu_count() or 1) * _BLOCKS_PER_CORE))
    block = len(buf) + 1 if longest is None else max(_MIN_BLOCK, longest + 1, even + 1)
    table = pajson.read_json(pa.BufferReader(buf), read_options=pajson.ReadOptions(block_size=block))
    return canonical(table, columns)


def decode_json(value: bytes, columns: tuple[str, ...] = ()) -> pa.RecordBatch:
    """One message of JSON lines, or one JSON object over several lines."""
    try:
        table = _read_json(value, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        try:  # one pretty-printed object: compact it onto one line
            obj = json.loads(value)
        except ValueError:
            raise WireError("corrupt_input", f"not JSON lines: {e}") from None
        if not isinstance(obj, dict):
            raise WireError("corrupt_input", f"a JSON {type(obj).__name__}, not an object per event") from None
        table = _read_json(json.dumps(obj).encode(), columns=columns)
    if table.num_rows == 0:
        raise WireError("empty_message", "JSON lines without any row")
    return table.combine_chunks().to_batches()[0]


def _bulk_json(
    values: list[bytes], lo: int, buf: bytes | None = None, longest: int | None = None, columns: tuple = ()
) -> list[Piece]:
    """Single-line JSON values (messages lo, lo+1, ...) in one read_json; halves on failure.
    `buf`: the values already joined with b"\\n", `longest` the longest of them."""
    if len(values) == 1:
        try:
            return [Piece(lo, lo + 1, decode_json(values[0], columns), fmt="json")]
        except WireError as e:
            return [Piece(lo, lo + 1, error=e, fmt="json")]
    try:
        longest = max(map(len, values)) if longest is None else longest
        table = _read_json(b"\n".join(values) if buf is None else buf, longest, columns)
        if table.num_rows == len(values):  # one row per message: rows map onto messages
            return [Piece(lo, lo + len(values), table.combine_chunks().to_batches()[0], fmt="json")]
    except (pa.ArrowInvalid, OSError):
        pass
    half = len(values) // 2
    return _bulk_json(values[:half], lo, columns=columns) + _bulk_json(values[half:], lo + half, columns=columns)


def _one_event_each(values: list, headers: list) -> tuple[bytes, int] | None:
    """The values joined with b"\\n", and the longest, when every message is one JSON object on
    one line without headers (the usual event topic, checked without a loop over messages),
    else None."""
    if not values or any(headers) or set(map(type, values)) != {bytes}:
        return None
    buf = b"\n".join(values)
    if buf.count(b"\n") != len(values) - 1:
        return None  # a value of several lines (or an empty one among them)
    lengths = np.fromiter(map(len, values), np.int64, len(values))
    if lengths.min() == 0:
        return None
    starts = np.zeros(len(values), np.int64)
    np.cumsum(lengths[:-1] + 1, out=starts[1:])
    return (buf, int(lengths.max())) if (np.frombuffer(buf, np.uint8)[starts] == ord("{")).all() else None


def decode_values(
    values: list,
    headers: list | None = None,
    expected_version: str | None = None,
    declared: str = "auto",
    columns: tuple[str, ...] = (),
) -> list[Piece]:
    """The messages of one poll (of one partition), in order, as Pieces covering every message.

    A `schema_version` header that differs from `expected_version` is `unknown_schema` (no header:
    the content decides). `columns`: the schema's declared columns (`declared_columns`), which
    come first in a JSON piece's canonical column order."""
    headers = headers or [None] * len(values)
    if declared in ("auto", "json"):
        joined = _one_event_each(values, headers)
        if joined is not None:
            return _bulk_json(values, 0, *joined, columns=columns)
    pieces: list[Piece] = []
    run: list[bytes] = []  # consecutive single-line JSON values, decoded in bulk

    def flush(upto: int) -> None:
        if run:
            pieces.extend(_bulk_json(run, upto - len(run), columns=columns))
            run.clear()

    bulk_ok = declared in ("auto", "json")
    for i, (value, h) in enumerate(zip(values, headers)):
        # the usual event topic, first and cheapest: no headers, one JSON object on one line
        if bulk_ok and not h and type(value) is bytes and value[:1] == b"{" and b"\n" not in value:
            run.append(value)
            continue
        fmt = "?"
        try:
            hd = header_dict(h)
            value = check_value(value)
            version = hd.get("schema_version")
            version = None if version is None else bytes(version).decode(errors="replace")
            # the schema a message carries is checked by the source (schema_mismatch); the header
            # decides only for messages that carry none
            stale = expected_version is not None and version is not None and version != expected_version
            unknown = WireError("unknown_schema", f"schema version {version!r}, expected {expected_version!r}")
            fmt = message_format(value, hd, declared)
            if fmt == "json" and stale:
                raise unknown
            if fmt == "json" and b"\n" not in bytes(value).strip(_BLANK):
                run.append(bytes(value))
                continue
            flush(i)
            if fmt == "arrow":
                rb, schema = decode_arrow(value)
                if schema is None and stale:
                    raise unknown
                pieces.append(Piece(i, i + 1, rb, schema=schema))
            elif fmt == "json":
                pieces.append(Piece(i, i + 1, decode_json(value, columns), fmt="json"))
            else:
                raise WireError("unsupported_format", f"{UNSUPPORTED[fmt]}; dimstream reads Arrow IPC and JSON")
        except WireError as e:
            flush(i)
            pieces.append(Piece(i, i + 1, error=e, fmt=fmt))
    flush(len(values))
    return pieces
