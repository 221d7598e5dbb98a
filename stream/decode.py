"""Decode Arrow RecordBatches into SparseBatches (and so KeyedJaggedTensors), vectorised.

Rows that cannot be trained on are not dropped silently: each is rejected with a reason
(counted in `DecodeResult.rejected_counts`) and kept, with its reason, in
`DecodeResult.rejected` for the dead-letter file. A whole batch is rejected when a column
is missing or of a type that cannot hold the field; single rows when their label or event
time is bad or a value cannot be cast (a non-numeric string in a numeric column: wrong_type).

Every accepted batch is cast to the schema's canonical Arrow types (`DecodeResult.table`), so
batches of one window concatenate whatever their sources wrote (int8 or int64 labels, JSON
lines among Arrow, numbers as strings):
- label: int8 (0 or 1);
- event time: int64 unix seconds (numeric columns in `Schema.event_time_unit`, timestamps in
  their own unit), or timestamp[s] when that unit is not "s" (so that the accepted rows decode
  again to the same seconds); rows that are no date in [1970, 9999] are bad_event_time;
- numeric fields: float64;
- categorical ids: int64 or string as `FieldSpec.id_type` says; undeclared: int64 for integer
  columns, string for string columns, binary for binary ones (lists of these for multi).
Columns the schema does not name are kept as they are.

>>> import pyarrow as pa
>>> from dimstream.stream.schema import Schema, FieldSpec
>>> d = Decoder(Schema([FieldSpec("user", "categorical", 100)]))
>>> r = d.decode(pa.record_batch({"user": [1, 2, 3], "label": [0, 1, 7], "event_time": [5, 6, 7]}))
>>> len(r.batch), r.rejected_counts
(2, {'label_out_of_range': 1})
>>> r = d.decode(pa.record_batch({"user": [1, 2], "label": ["1", "x"], "event_time": [2.0**60, 5.0]}))
>>> len(r.batch), r.rejected_counts, r.table.schema.field("label").type
(0, {'wrong_type': 1, 'bad_event_time': 1}, DataType(int8))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dimstream.stream.batch import SparseBatch, unit_offsets
from dimstream.stream.hashing import NULL_ID, field_salt, fnv1a_strings, hash_ids, splitmix64
from dimstream.stream.schema import FieldSpec, Schema

REASONS = (
    "empty_batch",
    "empty_message",
    "missing_column",
    "wrong_type",
    "null_label",
    "nan_label",
    "label_out_of_range",
    "null_event_time",
    "bad_event_time",
    "corrupt_input",
    "late",
    "unknown_schema",
    "schema_mismatch",  # a Kafka message carrying another schema than the source's (declared or adopted)
    "unsupported_format",  # a Kafka message in a format dimstream does not read (Avro, schema registry, Protobuf)
)

EVENT_TIME_MAX = 253402300799  # 9999-12-31T23:59:59Z: the last second a date can be written for
_PER_SECOND = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}
_FLOAT_RE = r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)$"
_INT_RE = r"^[+-]?\d{1,19}$"
_INT64_MAX = "9223372036854775807"


@dataclass
class Rejected:
    """Rows (or a whole batch) refused by the decoder, with one reason each."""

    reason: str
    detail: str
    rows: pa.Table | None  # None when there were no rows to keep (empty batch, unreadable input)


@dataclass
class DecodeResult:
    batch: SparseBatch
    rejected: list[Rejected] = field(default_factory=list)
    rejected_counts: dict[str, int] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    table: pa.Table | None = None  # the accepted rows as Arrow (canonical types), aligned with `batch`
    # which input rows were accepted (None: all), to map them back to the messages they came in
    kept: np.ndarray | None = None

    @property
    def rejected_rows(self) -> int:
        return sum(self.rejected_counts.values())


def numeric_to_ids(arr: pa.Array, transform: str) -> pa.Array:
    """Bucketise a numeric column into integer ids (nulls and NaN become null).

    "log2" is the Criteo-competition winner's transform used by SSEDS (sec. 4.1):
    int(log(x)^2) for x > 2, int(x) otherwise."""
    x = pc.cast(arr, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(x) | (np.abs(x) >= 2.0**62)  # beyond int64: one bucket, like NaN
    x = np.where(bad, 0.0, x)
    if transform == "log2":
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(x > 2, np.floor(np.log(np.maximum(x, 2.0)) ** 2), np.floor(x))
    else:
        t = np.floor(x)
    ids = t.astype(np.int64)
    ids[bad] = NULL_ID
    return pa.array(ids)


# raw ids a managed field never carries: 0 is the id of padding rows (models/distributed.py
# `pad`) and int64 max TorchRec's empty-slot sentinel (models/vocab.py); an id mixing onto one
# of them is moved to the next value (a collision of probability 2^-63 per id)
RESERVED_IDS = (0, 2**63 - 1)


def raw_ids(arr: pa.Array, field_name: str) -> np.ndarray:
    """64-bit ids of a managed field, one per value, never folded into a table's rows.

    Integers go through splitmix64 (a bijection of the 64-bit ids, so two ids never share a
    value), strings through FNV-1a (64 bits) first; nulls hash as NULL_ID / the empty string,
    like the hashed fields. The model (models/vocab.py) gives each admitted value its own row.

    >>> import pyarrow as pa
    >>> v = raw_ids(pa.array([7, 8, 7]), "user")
    >>> bool(v[0] == v[2]), bool(v[0] != v[1]), v.dtype
    (True, True, dtype('int64'))
    >>> bool((raw_ids(pa.array(["a", "b"]), "item") != 0).all())
    True
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if _is_bytes(arr.type):
        base = fnv1a_strings(arr)
    else:
        base = pc.fill_null(pc.cast(arr, pa.int64(), safe=False), NULL_ID).to_numpy(zero_copy_only=False)
    ids = splitmix64(base.view(np.uint64) ^ field_salt(field_name)).view(np.int64)
    for r in RESERVED_IDS:
        ids = np.where(ids == r, r - 1 if r else 1, ids)
    return ids


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bytes(t: pa.DataType) -> bool:
    return _is_str(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _np_mask(arr) -> np.ndarray:
    """A boolean Arrow array as numpy, nulls as False."""
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def binary_to_text(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Binary values as strings: (strings, rows that are not UTF-8: null). One bulk cast; only a
    batch that holds bad bytes (rare bad input) is checked value by value."""
    if _is_str(arr.type):
        return arr.cast(pa.string()), np.zeros(len(arr), bool)
    try:
        return arr.cast(pa.string()), np.zeros(len(arr), bool)
    except pa.ArrowInvalid:
        pass

    def utf8(v):
        try:
            v.decode()
            return True
        except UnicodeDecodeError:
            return False

    bad = np.array([v is not None and not utf8(v) for v in arr.to_pylist()], bool)
    kept = pc.if_else(pa.array(bad), pa.scalar(None, arr.type), arr)
    return kept.cast(pa.string()), bad


def _clean_strings(arr: pa.Array) -> pa.Array:
    """Trimmed strings, "" as null (an empty CSV or JSON cell is a missing value); bytes that
    are not UTF-8 are null."""
    s = pc.utf8_trim_whitespace(binary_to_text(arr)[0])
    return pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)


def _parse(arr: pa.Array, to: pa.DataType, ok_fn) -> tuple[pa.Array, np.ndarray]:
    text, not_utf8 = binary_to_text(arr)
    s = _clean_strings(text)
    try:  # the common case: every value parses, one bulk cast
        return pc.cast(s, to), not_utf8
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    bad = not_utf8 | ~_np_mask(pc.or_kleene(ok_fn(s), pc.is_null(s)))
    return pc.cast(pc.if_else(pa.array(bad), pa.scalar(None, pa.string()), s), to), bad


def parse_floats(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Numeric strings -> float64, vectorised: (values, rows that are no number: null)."""
    return _parse(arr, pa.float64(), lambda s: pc.match_substring_regex(s, _FLOAT_RE, ignore_case=True))


def parse_ints(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Decimal integer strings -> int64, vectorised: (ids, rows that are no int64: null)."""

    def ok(s):
        digits = pc.utf8_ltrim(s, "+-")
        over = pc.and_kleene(pc.equal(pc.utf8_length(digits), 19), pc.greater(digits, _INT64_MAX))
        return pc.and_kleene(pc.match_substring_regex(s, _INT_RE), pc.invert(over))

    return _parse(arr, pa.int64(), ok)


def _to_float64(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    if _is_bytes(col.type):
        return parse_floats(col)
    # int64 beyond 2^53 loses precision as a float: fine for labels and buckets, never an error
    return pc.cast(col, pa.float64(), safe=False), np.zeros(len(col), bool)


def event_seconds(col: pa.Array, unit: str = "s") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Event times as int64 unix seconds, vectorised: (seconds, bad, unparsable).

    Numeric columns are in `unit` ("s", "ms", "us"), timestamps in their own. `bad` rows are no
    date in [1970, 9999] (negative, too large, NaN, infinite: e.g. milliseconds read as
    seconds), `unparsable` rows are strings that are no number; nulls are neither (the caller
    rejects them as null_event_time). Bad, unparsable and null rows read as 0.

    >>> import pyarrow as pa
    >>> sec, bad, _ = event_seconds(pa.array([1_700_000_000_000, 2**60, -5]))
    >>> bad.tolist()
    [True, True, True]
    >>> event_seconds(pa.array([1_700_000_000_123]), "ms")[0].tolist()
    [1700000000]
    """
    t = col.type
    n = len(col)
    unparsable = np.zeros(n, bool)
    ok = np.ones(n, bool)
    if pa.types.is_timestamp(t):
        v = pc.fill_null(col.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
        sec = np.floor_divide(v, _PER_SECOND[t.unit])
    elif pa.types.is_integer(t):
        # integers are divided as integers: no float64 cast (which fails beyond 2^53);
        # uint64 beyond int64 wraps to a negative number, rejected below
        v = pc.fill_null(pc.cast(col, pa.int64(), safe=False), 0).to_numpy(zero_copy_only=False)
        sec = np.floor_divide(v, _PER_SECOND[unit])
    else:
        x, unparsable = _to_float64(col)
        x = pc.fill_null(x, 0.0).to_numpy(zero_copy_only=False) / _PER_SECOND[unit]
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(x) & (x > -1) & (x < EVENT_TIME_MAX + 1)
        sec = np.floor(np.where(ok, x, 0.0)).astype(np.int64)
    null = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    bad = (~ok | (sec < 0) | (sec > EVENT_TIME_MAX)) & ~null & ~unparsable
    return np.where(bad | unparsable | null, 0, sec).astype(np.int64), bad, unparsable


def _canonical_ids(col: pa.Array, id_type: str | None) -> tuple[pa.Array, np.ndarray]:
    """Flat ids in the Arrow type the hashing takes for this field (see FieldSpec.id_type):
    int64, string or binary; rows that cannot be cast are flagged (and become null)."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    fine = np.zeros(len(col), bool)
    if pa.types.is_integer(t):
        ids = pc.cast(col, pa.int64(), safe=False)  # uint64 beyond int64 wraps: still one id each
        return (pc.cast(ids, pa.string()), fine) if id_type == "str" else (ids, fine)
    if id_type == "int":
        return parse_ints(col)
    if _is_str(t):
        return col.cast(pa.string()), fine
    if id_type == "str":  # binary ids must be text to compare with integers written out
        return binary_to_text(col)
    return col.cast(pa.binary()), fine


def _canonical_column(spec: FieldSpec, col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A field's column in its canonical Arrow type, and the rows that could not be cast."""
    if spec.kind == "numeric":
        return _to_float64(col)
    if spec.kind == "categorical":
        return _canonical_ids(col, spec.id_type)
    # multi: cast the flattened values, then rebuild the lists on the same offsets
    if pa.types.is_large_list(col.type):
        col = col.cast(pa.list_(col.type.value_type))
    values, bad_values = _canonical_ids(pc.list_flatten(col), spec.id_type)
    offsets = pc.subtract(col.offsets, col.offsets[0])
    lists = pa.ListArray.from_arrays(offsets, values, mask=col.is_null() if col.null_count else None)
    bad = np.zeros(len(col), bool)
    if bad_values.any():
        parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
        bad[parents[bad_values]] = True
    return lists, bad


def _type_ok(spec: FieldSpec, t: pa.DataType) -> bool:
    def is_id(u):
        return pa.types.is_integer(u) or _is_bytes(u) or pa.types.is_dictionary(u)

    if spec.kind == "categorical":
        return is_id(t)
    if spec.kind == "multi":
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and is_id(t.value_type)
    return _is_number(t) or _is_bytes(t)


class Decoder:
    """Arrow RecordBatch -> DecodeResult for one Schema."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self._known = {f.source_column for f in schema.fields} | {schema.label, schema.event_time}

    def decode(self, rb: pa.RecordBatch | pa.Table) -> DecodeResult:
        keys = self.schema.feature_names
        table = pa.Table.from_batches([rb]) if isinstance(rb, pa.RecordBatch) else rb
        if table.num_rows == 0:
            return DecodeResult(
                SparseBatch.empty(keys), [Rejected("empty_batch", "batch has no rows", None)], {"empty_batch": 1}
            )
        whole = self._check_columns(table)
        if whole is not None:
            reason, detail = whole
            return DecodeResult(SparseBatch.empty(keys), [Rejected(reason, detail, table)], {reason: table.num_rows})
        canon, labels, seconds, masks, own = self._canonical(table)
        keep, rejected, counts = self._reject_rows(table, masks)
        good = canon if keep is None else canon.filter(pa.array(keep))
        if keep is not None:
            labels, seconds = labels[keep], seconds[keep]
            own = {k: v.filter(pa.array(keep)) for k, v in own.items()}
        ignored = [c for c in table.column_names if c not in self._known]
        return DecodeResult(self._to_sparse(good, labels, seconds, own), rejected, counts, ignored, good, keep)

    def _check_columns(self, table: pa.Table) -> tuple[str, str] | None:
        s = self.schema
        names = set(table.column_names)  # once: the property builds a new list at every call
        for col in [s.label, s.event_time] + [f.source_column for f in s.fields]:
            if col not in names:
                return "missing_column", f"column {col!r} is missing"
        lt = table.schema.field(s.label).type
        if not (_is_number(lt) or pa.types.is_boolean(lt) or _is_bytes(lt)):
            return "wrong_type", f"label column {s.label!r} has type {lt}, expected a number"
        et = table.schema.field(s.event_time).type
        if not (_is_number(et) or pa.types.is_timestamp(et) or _is_bytes(et)):
            return "wrong_type", f"event-time column {s.event_time!r} has type {et}"
        for f in s.fields:
            t = table.schema.field(f.source_column).type
            if not _type_ok(f, t):
                return "wrong_type", f"field {f.name!r} ({f.kind}) has column type {t}"
        return None

    def _canonical(self, table: pa.Table):
        """The table in canonical types (see the module doc), labels as float32, event times as
        int64 seconds, per-row masks of what is wrong (each row gets one reason later), and the
        canonical ids of fields that read a column the table holds in another field's type."""
        s = self.schema
        n = table.num_rows
        wrong = np.zeros(n, bool)
        columns = {}
        label = table.column(s.label).combine_chunks()
        y_arr, bad = _to_float64(label if not pa.types.is_boolean(label.type) else label.cast(pa.int8()))
        wrong |= bad
        y = y_arr.to_numpy(zero_copy_only=False)
        null = np.asarray(label.is_null().to_numpy(zero_copy_only=False), dtype=bool) & ~bad
        nan = np.isnan(y) & ~null & ~bad
        out = ~null & ~nan & ~bad & (y != 0) & (y != 1)
        labels = np.where(null | nan | out | bad, 0, y).astype(np.float32)
        columns[s.label] = pa.array(labels.astype(np.int8))
        et = table.column(s.event_time).combine_chunks()
        seconds, bad_time, unparsable = event_seconds(et, s.event_time_unit)
        wrong |= unparsable
        t_null = np.asarray(et.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        # int64 seconds; a timestamp when the schema's unit is not seconds, so that decoding the
        # accepted rows again (the recent-rows buffer) reads them as seconds, not milliseconds
        ts = pa.array(seconds)
        columns[s.event_time] = ts if s.event_time_unit == "s" else ts.cast(pa.timestamp("s"))
        own = {}  # fields whose column the table holds in another type (a column read twice)
        for f in s.fields:
            col, bad = _canonical_column(f, table.column(f.source_column).combine_chunks())
            wrong |= bad
            if f.source_column not in columns:
                columns[f.source_column] = col
            elif not columns[f.source_column].type.equals(col.type):
                own[f.name] = col
        canon = pa.table([columns.get(c, table.column(c)) for c in table.column_names], names=table.column_names)
        masks = [
            ("wrong_type", wrong),
            ("null_label", null),
            ("nan_label", nan),
            ("label_out_of_range", out),
            ("null_event_time", t_null),
            ("bad_event_time", bad_time),
        ]
        return canon, labels, seconds, masks, own

    def _reject_rows(self, table: pa.Table, masks):
        """One reason per bad row (the first that applies, in `masks` order); rejected rows are
        kept as they came in, so dead letters show the raw values."""
        taken = np.zeros(table.num_rows, bool)
        rejected, counts = [], {}
        for reason, mask in masks:
            mine = mask & ~taken
            n = int(mine.sum())
            if n:
                counts[reason] = n
                rejected.append(Rejected(reason, self._detail(reason), table.filter(pa.array(mine))))
                taken |= mine
        return (~taken if taken.any() else None), rejected, counts

    def _detail(self, reason: str) -> str:
        s = self.schema
        if reason == "bad_event_time":
            return (
                f"event time {s.event_time!r} is no date in 1970..9999 read in unit {s.event_time_unit!r} "
                "(milliseconds or microseconds? declare the schema's event_time_unit)"
            )
        if reason == "wrong_type":
            return "a value cannot be cast to its field's type (e.g. a non-numeric string)"
        return reason.replace("_", " ")

    def _to_sparse(self, table: pa.Table, labels: np.ndarray, seconds: np.ndarray, own: dict) -> SparseBatch:
        s = self.schema
        n = table.num_rows
        values, offsets = {}, {}
        for f in s.fields:
            col = own[f.name] if f.name in own else table.column(f.source_column).combine_chunks()
            ids = raw_ids if f.vocab == "managed" else lambda a, name, rows=f.num_embeddings: hash_ids(a, name, rows)
            if f.kind == "multi":
                lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
                values[f.name] = ids(pc.list_flatten(col), f.name)
                offsets[f.name] = np.zeros(n + 1, np.int64)
                np.cumsum(lengths, out=offsets[f.name][1:])
            else:
                if f.kind == "numeric":
                    col = numeric_to_ids(col, f.numeric_transform)
                values[f.name] = ids(col, f.name)
                offsets[f.name] = unit_offsets(n)  # one id a row
        return SparseBatch(s.feature_names, values, offsets, labels.astype(np.float32, copy=False), seconds)
