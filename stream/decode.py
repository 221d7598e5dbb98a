"""Decode Arrow RecordBatches into SparseBatches (and so KeyedJaggedTensors), vectorised.

Rows that cannot be trained on are not dropped silently: each is rejected with a reason
(counted in `DecodeResult.rejected_counts`) and kept, with its reason, in
`DecodeResult.rejected` for the dead-letter file. A whole batch is rejected when a column
is missing or of the wrong type; single rows when their label or event time is bad.

>>> import pyarrow as pa
>>> from dimstream.stream.schema import Schema, FieldSpec
>>> d = Decoder(Schema([FieldSpec("user", "categorical", 100)]))
>>> r = d.decode(pa.record_batch({"user": [1, 2, 3], "label": [0, 1, 7], "event_time": [5, 6, 7]}))
>>> len(r.batch), r.rejected_counts
(2, {'label_out_of_range': 1})
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dimstream.stream.batch import SparseBatch
from dimstream.stream.hashing import NULL_ID, hash_ids
from dimstream.stream.schema import FieldSpec, Schema

REASONS = (
    "empty_batch",
    "missing_column",
    "wrong_type",
    "null_label",
    "nan_label",
    "label_out_of_range",
    "null_event_time",
    "corrupt_input",
    "late",
    "unknown_schema",
)


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
    table: pa.Table | None = None  # the accepted rows as Arrow, aligned with `batch`

    @property
    def rejected_rows(self) -> int:
        return sum(self.rejected_counts.values())


def numeric_to_ids(arr: pa.Array, transform: str) -> pa.Array:
    """Bucketise a numeric column into integer ids (nulls and NaN become null).

    "log2" is the Criteo-competition winner's transform used by SSEDS (sec. 4.1):
    int(log(x)^2) for x > 2, int(x) otherwise."""
    x = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(x)
    x = np.where(bad, 0.0, x)
    if transform == "log2":
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(x > 2, np.floor(np.log(np.maximum(x, 2.0)) ** 2), np.floor(x))
    else:
        t = np.floor(x)
    ids = t.astype(np.int64)
    ids[bad] = NULL_ID
    return pa.array(ids)


def _event_seconds(col: pa.Array) -> np.ndarray:
    t = col.type
    if pa.types.is_timestamp(t):
        per_s = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}[t.unit]
        return col.cast(pa.int64()).to_numpy(zero_copy_only=False) // per_s
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.int64)


def _type_ok(spec: FieldSpec, t: pa.DataType) -> bool:
    def is_id(u):
        return (
            pa.types.is_integer(u)
            or pa.types.is_string(u)
            or pa.types.is_large_string(u)
            or pa.types.is_binary(u)
            or pa.types.is_dictionary(u)
        )

    if spec.kind == "categorical":
        return is_id(t)
    if spec.kind == "multi":
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and is_id(t.value_type)
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


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
        keep, rejected, counts = self._check_rows(table)
        good = table if keep is None else table.filter(pa.array(keep))
        ignored = [c for c in table.column_names if c not in self._known]
        return DecodeResult(self._to_sparse(good), rejected, counts, ignored, good)

    def _check_columns(self, table: pa.Table) -> tuple[str, str] | None:
        s = self.schema
        for col in [s.label, s.event_time] + [f.source_column for f in s.fields]:
            if col not in table.column_names:
                return "missing_column", f"column {col!r} is missing"
        lt = table.schema.field(s.label).type
        if not (pa.types.is_integer(lt) or pa.types.is_floating(lt) or pa.types.is_boolean(lt)):
            return "wrong_type", f"label column {s.label!r} has type {lt}, expected a number"
        et = table.schema.field(s.event_time).type
        if not (pa.types.is_integer(et) or pa.types.is_floating(et) or pa.types.is_timestamp(et)):
            return "wrong_type", f"event-time column {s.event_time!r} has type {et}"
        for f in s.fields:
            t = table.schema.field(f.source_column).type
            if not _type_ok(f, t):
                return "wrong_type", f"field {f.name!r} ({f.kind}) has column type {t}"
        return None

    def _check_rows(self, table: pa.Table):
        s = self.schema
        label = table.column(s.label).combine_chunks()
        y = pc.cast(label, pa.float64()).to_numpy(zero_copy_only=False)
        null = np.asarray(label.is_null().to_numpy(zero_copy_only=False))
        nan = np.isnan(y) & ~null
        out = ~null & ~nan & (y != 0) & (y != 1)
        t_null = np.asarray(table.column(s.event_time).combine_chunks().is_null().to_numpy(zero_copy_only=False))
        reasons = [
            ("null_label", null),
            ("nan_label", nan),
            ("label_out_of_range", out),
            ("null_event_time", t_null & ~(null | nan | out)),
        ]
        bad = null | nan | out | t_null
        if not bad.any():
            return None, [], {}
        rejected, counts = [], {}
        for reason, mask in reasons:
            n = int(mask.sum())
            if n:
                counts[reason] = n
                rejected.append(Rejected(reason, reason.replace("_", " "), table.filter(pa.array(mask))))
        return ~bad, rejected, counts

    def _to_sparse(self, table: pa.Table) -> SparseBatch:
        s = self.schema
        n = table.num_rows
        values, offsets = {}, {}
        for f in s.fields:
            col = table.column(f.source_column).combine_chunks()
            if f.kind == "multi":
                lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
                flat = pc.list_flatten(col)
                values[f.name] = hash_ids(flat, f.name, f.num_embeddings)
            else:
                if f.kind == "numeric":
                    col = numeric_to_ids(col, f.numeric_transform)
                values[f.name] = hash_ids(col, f.name, f.num_embeddings)
                lengths = np.ones(n, np.int64)
            off = np.zeros(n + 1, np.int64)
            np.cumsum(lengths, out=off[1:])
            offsets[f.name] = off
        labels = pc.cast(table.column(s.label), pa.float32()).to_numpy().astype(np.float32, copy=False)
        return SparseBatch(
            s.feature_names, values, offsets, labels, _event_seconds(table.column(s.event_time).combine_chunks())
        )
