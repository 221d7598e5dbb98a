"""Kafka record batches (message format v2) unpacked vectorised, for kafka-python's consumer.

kafka-python builds each ConsumerRecord in pure Python (varint by varint, ~9 us a record): at one
JSON event per message that cost more than training. `install(consumer)` replaces, on that one
consumer, the class its fetcher instantiates per fetched partition (`Fetcher.PartitionRecords`)
with `BulkPartitionRecords`, which locates and decodes the records of a whole uncompressed batch
with numpy and then hands the same ConsumerRecords over, in the same order, with the same
`next_fetch_offset` after each `take` (so positions, seeks, pauses and commits are kafka-python's
own), by list slices rather than record by record.

This relies on kafka-python 3.0's internals (`Fetcher.PartitionRecords`, its `take`, its
`_unpack_records` generator and `_maybe_skip_record`, `DefaultRecordBatch._buffer`): the pin
`kafka-python>=3.0,<3.1` in requirements.txt and pyproject.toml is what makes it safe. Any batch
the fast path does not cover - compressed, control or transactional (read_committed), legacy magic,
records with headers, or anything that does not parse exactly as kafka-python would parse it -
hands that batch and the rest of the fetch to kafka-python's own path (counted in `FALLBACKS`; an
unexpected one is logged once).

Record boundaries (each record is a varint length, then that many bytes) are found without a
loop over records: a record's attributes byte, right after its length, is 0 (unused in v2), so
the candidate starts are the positions 1..5 bytes before a zero byte whose varint there is that
long; each candidate points at the one after it (start + size + length), and the chain from the
first record is followed by pointer doubling (log2 n gathers over the candidates).

>>> from kafka.record.default_records import DefaultRecordBatchBuilder, DefaultRecordBatch
>>> b = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, batch_size=1 << 20)
>>> for i, v in enumerate([b'{"x": 1}', None, b'{"x": 3}']):
...     _ = b.append(i, timestamp=1000 + i, key=None, value=v, headers=[])
>>> [(offset, value) for offset, value in zip(*unpack_batch(DefaultRecordBatch(b.build()))[:2])]
[(0, b'{"x": 1}'), (1, None), (2, b'{"x": 3}')]
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging

import numpy as np
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.record.default_records import DefaultRecordBatch

log = logging.getLogger(__name__)

FALLBACKS: collections.Counter = collections.Counter()  # batches read by kafka-python's path, by reason
_EXPECTED = {"compressed", "control", "transactional", "headers", "legacy", "empty"}
_said: set[str] = set()
_HEADER = DefaultRecordBatch.HEADER_STRUCT.size  # 61: the records follow the batch header
_READ_COMMITTED = 1  # kafka.consumer.fetcher.IsolationLevel.READ_COMMITTED
_new_record = functools.partial(tuple.__new__, ConsumerRecord)


class Surprise(Exception):
    """A batch the fast path does not read exactly as kafka-python would."""


def _varints(a: np.ndarray, pos: np.ndarray, width: int, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Zigzag varints (Kafka's signed varint/varlong) at positions `pos` of `a` (padded with
    `_PAD` zero bytes past the batch): (values, positions after). One pass per byte of the
    longest, not per value. Longer than `width` bytes: Surprise, or with strict=False after = -1."""
    u = np.zeros(len(pos), np.uint64)
    size = np.zeros(len(pos), np.int64)
    live = np.ones(len(pos), bool)
    for k in range(width):
        b = a[pos + k].astype(np.uint64)
        u |= ((b & np.uint64(127)) << np.uint64(7 * k)) * live
        size += live
        live &= b >= 128
        if not live.any():
            break
    if live.any() and strict:
        raise Surprise(f"a varint longer than {width} bytes")
    value = (u >> np.uint64(1)).astype(np.int64) ^ -(u & np.uint64(1)).astype(np.int64)
    return value, np.where(live, -1, pos + size)


_PAD = 16


def _record_starts(a: np.ndarray, size: int, n: int) -> np.ndarray:
    """The start of each of the batch's n records (see the module doc); `size`: the batch's bytes."""
    zeros = np.flatnonzero(a[_HEADER:size] == 0) + _HEADER
    z = zeros[a[zeros - 1] < 128]  # a varint ends right before it: its last byte is < 128
    # the varint may start 1..5 bytes before the zero: at z-1, or earlier over bytes >= 128
    starts, cont = [z - 1], np.ones(len(z), bool)
    for j in range(2, 6):
        cont &= a[z - j] >= 128
        if not cont.any():
            break
        starts.append((z - j)[cont])
    cand = np.sort(np.concatenate(starts))
    cand = cand[cand >= _HEADER]
    length, after = _varints(a, cand, 5)
    nxt = after + length  # where the record after it starts
    if not len(cand) or cand[0] != _HEADER:
        raise Surprise("the first record's attributes are not 0")
    m = len(cand)
    end, dead = m, m + 1  # the batch's end, and nowhere
    at = np.minimum(np.searchsorted(cand, nxt), m - 1)
    jump = np.where(cand[at] == nxt, at, np.where(nxt == size, end, dead))
    jump = np.concatenate([jump, [end, dead]])
    chain = np.zeros(1, np.int64)
    while len(chain) < n + 1:  # pointer doubling: chain[k] is the k-th record
        chain = np.concatenate([chain, jump[chain]])
        jump = jump[jump]
    chain = chain[: n + 1]
    if chain[n] != end or (chain[:n] >= m).any():
        raise Surprise("the records do not chain to the batch's end")
    return cand[chain[:n]]


def unpack_batch(batch: DefaultRecordBatch):
    """An uncompressed v2 batch's records as lists: (offsets, values, keys, timestamps, value
    sizes, key sizes, record sizes). Raises Surprise where kafka-python's reading could differ."""
    n = batch.records_count
    raw = bytes(batch._buffer)
    a = np.zeros(len(raw) + _PAD, np.uint8)  # padded: a varint at the very end reads zeros, not past it
    a[: len(raw)] = np.frombuffer(raw, np.uint8)
    starts = _record_starts(a, len(raw), n)
    length, body = _varints(a, starts, 5)
    _, p = _varints(a, body, 5)  # attributes
    ts_delta, p = _varints(a, p, 9)  # 10 bytes would be beyond int64: kafka-python's path
    offset_delta, p = _varints(a, p, 5)
    key_len, p = _varints(a, p, 5)
    key_at, p = p, p + np.maximum(key_len, 0)
    value_len, p = _varints(a, p, 5)
    value_at, p = p, p + np.maximum(value_len, 0)
    header_count, p = _varints(a, p, 5)
    if (header_count != 0).any():
        raise Surprise("headers")  # expected: read by kafka-python (dimstream's own messages carry few, large)
    if (p > len(raw)).any() or (p - body != length).any():
        raise Surprise("a record's fields do not add up to its length")
    if (key_len < -1).any() or (value_len < -1).any():
        raise Surprise("a negative key or value length")
    values = _slices(raw, value_at, value_len)
    keys = [None] * n if (key_len == -1).all() else _slices(raw, key_at, key_len)
    if abs(batch.first_timestamp) >= 1 << 62 or (np.abs(ts_delta) >= 1 << 62).any():
        raise Surprise("timestamps beyond int64 when added")  # kafka-python adds Python ints
    if batch.timestamp_type == batch.LOG_APPEND_TIME:
        timestamps = [batch.max_timestamp] * n
    else:
        timestamps = (batch.first_timestamp + ts_delta).tolist()
    offsets = (batch.base_offset + offset_delta).tolist()
    return offsets, values, keys, timestamps, value_len.tolist(), key_len.tolist(), length.tolist()


def _slices(raw: bytes, at: np.ndarray, length: np.ndarray) -> list:
    out = list(map(raw.__getitem__, map(slice, at.tolist(), (at + length).tolist())))
    for i in np.flatnonzero(length < 0).tolist():  # null values (tombstones) and keys: rare
        out[i] = None
    return out


class _Rest:
    """The MemoryRecords kafka-python's path reads on from: this batch, then the rest."""

    def __init__(self, batch, records):
        self._first, self._records = batch, records

    def next_batch(self):
        if self._first is not None:
            batch, self._first = self._first, None
            return batch
        return self._records.next_batch()


class _Chunk:
    """The ConsumerRecords of one batch read here, handed over by slices (`BulkPartitionRecords.take`)."""

    __slots__ = ("records", "offsets", "at")

    def __init__(self, records: list, offsets: list):
        self.records, self.offsets, self.at = records, offsets, 0


_END = object()


class BulkPartitionRecords(Fetcher.PartitionRecords):
    """kafka-python 3.0's PartitionRecords with batches unpacked in bulk (see the module doc).

    A batch read here comes out of the record iterator as one _Chunk, and `take` hands its
    records over by list slices, setting next_fetch_offset once per slice to what kafka-python's
    record-by-record iterator leaves after the slice's last record: no Python work per record."""

    def __init__(self, *args, **kwargs):
        self._chunk: _Chunk | None = None  # the chunk `take` is handing over
        super().__init__(*args, **kwargs)

    def _fast(self, batch) -> str | None:
        """Why this batch goes to kafka-python's path, or None: it is read here."""
        if batch.magic != 2:
            return "legacy"
        if batch.compression_type != batch.CODEC_NONE:
            return "compressed"
        if batch.is_control_batch:
            return "control"
        if self.isolation_level == _READ_COMMITTED and batch.has_producer_id():
            return "transactional"
        if batch.records_count == 0:
            return "empty"
        return None

    def _maybe_skip_record(self, item) -> bool:
        """kafka-python skips the leading records below the fetch offset (a fetch that starts
        inside a batch): within a chunk, by one vectorised search."""
        if not isinstance(item, _Chunk):
            return super()._maybe_skip_record(item)
        below = np.asarray(item.offsets, np.int64) < self.fetch_offset
        item.at = len(below) if below.all() else int(np.argmin(below))
        return item.at == len(item.records)

    def take(self, n=None):
        """As kafka-python's take (up to n records, an exception after some records raised on the
        next call), chunks by slices."""
        self._maybe_raise_next_inline_exception()
        records: list = []
        chunk = self._chunk
        try:
            while n is None or len(records) < n:
                if chunk is None:
                    item = _END if self.record_iterator is None else next(self.record_iterator, _END)
                    if item is _END:
                        break
                    if not isinstance(item, _Chunk):  # kafka-python's path: one record
                        records.append(item)
                        continue
                    chunk = item
                stop = len(chunk.records) if n is None else min(len(chunk.records), chunk.at + n - len(records))
                records += chunk.records[chunk.at : stop]
                self.next_fetch_offset = chunk.offsets[stop - 1] + 1  # as after kafka-python's last one
                chunk.at = stop
                if stop == len(chunk.records):
                    chunk = None
        except Exception as e:
            if not records:
                raise e
            self._next_inline_exception = e  # to be raised by the next call, as kafka-python's
        finally:
            self._chunk = chunk
        return records

    def drain(self):
        self._chunk = None
        super().drain()

    def _unpack_records(self, tp, records, key_deserializer, value_deserializer):
        if key_deserializer is not None or value_deserializer is not None:
            yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
            return
        batch = records.next_batch()
        last_batch = None
        while batch is not None:
            why = self._fast(batch)
            if why is None and self.check_crcs and not batch.validate_crc():
                why = "crc"  # kafka-python raises CorruptRecordError for it
            unpacked = None
            if why is None:
                try:
                    unpacked = unpack_batch(batch)
                except Surprise as e:
                    why = "headers" if str(e) == "headers" else f"unexpected: {e}"
                except Exception as e:  # never more than the normal path: read it there
                    why = f"unexpected: {type(e).__name__}: {e}"
            if unpacked is None:
                _fell_back(why)
                yield from super()._unpack_records(tp, _Rest(batch, records), None, None)
                return
            last_batch = batch
            self.leader_epoch = batch.leader_epoch
            yield self._chunk_of(tp, batch, unpacked)
            batch = records.next_batch()
        if last_batch is not None:  # as kafka-python: the next fetch starts after the batch's last offset
            self.next_fetch_offset = last_batch.next_offset
        self.drain()

    def _chunk_of(self, tp, batch, unpacked) -> _Chunk:
        offsets, values, keys, timestamps, value_sizes, key_sizes, sizes = unpacked
        n = len(offsets)
        # metrics only (the fetch metrics and the fetcher's fairness): counted per batch, not per record
        self.records_read += n
        self.bytes_read += sum(sizes)
        rep = itertools.repeat
        recs = map(
            _new_record,  # tuple.__new__ in C: namedtuple's own __new__ is Python
            zip(
                rep(tp.topic),
                rep(tp.partition),
                rep(self.leader_epoch),
                offsets,
                timestamps,
                rep(batch.timestamp_type),
                keys,
                values,
                map(list, rep((), n)),  # no headers: a list of its own each, as kafka-python's
                rep(None),  # v2 records carry no checksum of their own
                key_sizes,
                value_sizes,
                rep(-1),  # no headers
            ),
        )
        return _Chunk(list(recs), offsets)


def _fell_back(why: str) -> None:
    FALLBACKS[why.split(":")[0]] += 1
    if why not in _EXPECTED and why not in _said:
        _said.add(why)
        log.warning("Kafka record batch read by kafka-python's own path (%s); said once", why)


def install(consumer) -> None:
    """Read this consumer's fetches with BulkPartitionRecords (kafka-python's own path if its
    fetcher is not the one this was written for)."""
    fetcher = getattr(consumer, "_fetcher", None)
    if isinstance(fetcher, Fetcher) and isinstance(getattr(fetcher, "PartitionRecords", None), type):
        fetcher.PartitionRecords = BulkPartitionRecords
    else:
        _fell_back("unexpected: no kafka-python 3.0 fetcher")
