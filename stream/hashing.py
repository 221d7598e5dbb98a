"""Stable, seed-independent hashing of ids into embedding rows.

The same id maps to the same row in every process and after every restart (no Python
`hash()`, whose string hashing is salted per process). Vectorised with numpy:
- integer ids in [0, num_embeddings) go through a multiplicative hash (v * A + salt) mod n with
  A prime and larger than any n, a bijection on [0, n): small vocabularies (gender, weekday,
  a dense id space) get no collisions at all, which a random hash would give them;
- other integers go through splitmix64, strings through FNV-1a computed column by column over
  a padded byte matrix (the Python loop runs over byte positions, never over rows).

>>> import numpy as np, pyarrow as pa
>>> int(hash_ids(pa.array([1, 2, 1]), "user", 10)[2]) == int(hash_ids(pa.array([1]), "user", 10)[0])
True
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_KNUTH = np.uint64(2654435761)  # prime > 2^31: coprime with every table size
MAX_STRING_BYTES = 64  # longer ids are hashed on their first 64 bytes plus their length
NULL_ID = -(2**63)  # missing integer ids and missing numerics hash as this value


def field_salt(name: str) -> np.uint64:
    """A per-field constant so equal ids of different fields land on unrelated rows."""
    return np.uint64(zlib.crc32(name.encode()) * 0x9E3779B1 & 0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def fnv1a_strings(arr: pa.Array) -> np.ndarray:
    """FNV-1a of each (non-null) string/binary value; nulls hash as the empty string."""
    arr = pc.fill_null(arr.cast(pa.large_binary()), b"")
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    width = int(min(lengths.max(initial=0), MAX_STRING_BYTES))
    with np.errstate(over="ignore"):
        for j in range(width):  # loop over byte positions, vectorised over rows
            has = lengths > j
            byte = np.zeros(n, np.uint64)
            byte[has] = data[starts[has] + j]
            h = np.where(has, (h ^ byte) * _FNV_PRIME, h)
        h = (h ^ lengths.astype(np.uint64)) * _FNV_PRIME
    return h


def _bijection(v: np.ndarray, salt: np.uint64, n: np.uint64) -> np.ndarray:
    """(v * A + salt) mod n for ids v in [0, n < 2^31): v * A + salt stays below 2^63, so int64
    arithmetic gives the same rows as uint64 at half the cost of numpy's unsigned modulo."""
    return (np.asarray(v, np.int64) * int(_KNUTH) + int(salt % n)) % int(n)


def hash_ids(arr: pa.Array, field_name: str, num_embeddings: int) -> np.ndarray:
    """Row index in [0, num_embeddings) for every value of `arr` (ints or strings)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        raw = fnv1a_strings(arr)
    elif pa.types.is_integer(t) or pa.types.is_boolean(t):
        # nulls become the reserved NULL_ID, hashed like any other id
        # uint64 ids beyond int64 wrap around (still one row each) rather than fail the batch
        v = pc.fill_null(pc.cast(arr, pa.int64(), safe=False), NULL_ID).to_numpy(zero_copy_only=False)
        n = np.uint64(num_embeddings)
        salt = field_salt(field_name)
        if num_embeddings < 2**31 and len(v) and v.min() >= 0 and v.max() < num_embeddings:
            # the usual case (ids already a dense id space): the bijection alone, on the whole
            # array; the masked path below costs 2.5x as much per value for the same rows
            return _bijection(v, salt, n)
        rows = (splitmix64(v.view(np.uint64) ^ salt) % n).astype(np.int64)
        small = (v >= 0) & (v < num_embeddings)
        if small.any() and num_embeddings < 2**31:
            rows[small] = _bijection(v[small], salt, n)
        return rows
    elif pa.types.is_dictionary(t):
        return hash_ids(arr.cast(t.value_type), field_name, num_embeddings)
    else:
        raise TypeError(f"field {field_name!r}: ids must be integers or strings, got {t}")
    mixed = splitmix64(raw ^ field_salt(field_name))
    return (mixed % np.uint64(num_embeddings)).astype(np.int64)
