"""SparseBatch: decoded rows held as per-field jagged arrays, sliced into KeyedJaggedTensors.

Decoding produces one SparseBatch per Arrow batch; a window concatenates them and is then cut
into mini-batches with `slice`, each turned into a TorchRec KeyedJaggedTensor by `to_kjt`.

>>> import numpy as np
>>> b = SparseBatch(["a"], {"a": np.array([3, 4, 5])}, {"a": np.array([0, 1, 3])},
...                 np.array([0., 1.], np.float32), np.array([10, 11]))
>>> b.slice(1, 2).values["a"].tolist()
[4, 5]
>>> b.to_kjt().lengths().tolist()
[1, 2]

Single-valued fields (one id a row: categorical and numeric) carry `unit_offsets`, views of one
shared read-only 0, 1, 2, ...: a window holds no offsets of its own for them (half its memory,
and the half that had to be page-faulted in and concatenated), and slicing, taking and
concatenating them allocates nothing.

>>> u = SparseBatch(["a"], {"a": np.array([7, 8, 9])}, {"a": unit_offsets(3)},
...                 np.zeros(3, np.float32), np.zeros(3, np.int64))
>>> is_unit(SparseBatch.concat([u, u]).offsets["a"]), is_unit(u.slice(1, 3).offsets["a"])
(True, True)
>>> SparseBatch.concat([u, b]).offsets["a"].tolist()
[0, 1, 2, 3, 4, 6]
>>> t = u.take(np.array([True, False, True]))
>>> t.values["a"].tolist(), t.offsets["a"].tolist(), is_unit(t.offsets["a"])
([7, 9], [0, 1, 2], True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # imported where used: a serving process decodes batches without TorchRec
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


_UNITS: list[np.ndarray] = []  # read-only aranges, the longest last


def unit_offsets(n: int) -> np.ndarray:
    """The offsets of n rows of one id each, 0..n: a read-only view of a shared arange."""
    if not _UNITS or len(_UNITS[-1]) < n + 1:
        grown = np.arange(max(n + 1, 2 * len(_UNITS[-1]) if _UNITS else 1 << 16), dtype=np.int64)
        grown.flags.writeable = False
        _UNITS.append(grown)
    return _UNITS[-1][: n + 1]


def is_unit(offsets: np.ndarray) -> bool:
    """Whether `offsets` came from unit_offsets (a prefix of a shared arange: one id a row)."""
    base = offsets.base  # numpy points a view of a view at the array that owns the memory
    # a contiguous view of an arange that begins with 0 begins where the arange does
    return base is not None and any(base is u for u in _UNITS) and offsets.strides == (8,) and int(offsets[0]) == 0


def _lengths(offsets: np.ndarray) -> np.ndarray:
    return np.ones(len(offsets) - 1, np.int64) if is_unit(offsets) else np.diff(offsets)


@dataclass
class SparseBatch:
    keys: list[str]
    values: dict[str, np.ndarray]  # int64 embedding rows, all rows' ids concatenated
    offsets: dict[str, np.ndarray]  # int64, len n+1: row r's ids are values[offsets[r]:offsets[r+1]]
    labels: np.ndarray  # float32 in {0, 1}
    event_time: np.ndarray  # int64 unix seconds

    def __len__(self) -> int:
        return int(len(self.labels))

    def slice(self, start: int, stop: int) -> SparseBatch:
        values, offsets = {}, {}
        for k in self.keys:
            off = self.offsets[k]
            if is_unit(off):
                values[k], offsets[k] = self.values[k][start:stop], unit_offsets(stop - start)
                continue
            lo, hi = off[start], off[stop]
            values[k] = self.values[k][lo:hi]
            offsets[k] = off[start : stop + 1] - lo
        return SparseBatch(self.keys, values, offsets, self.labels[start:stop], self.event_time[start:stop])

    def take(self, mask: np.ndarray) -> SparseBatch:
        """Rows where `mask` is true (vectorised; used to split a batch at a window boundary)."""
        idx = np.flatnonzero(mask)
        if len(idx) == len(self.labels) and (len(idx) == 0 or idx[-1] == len(idx) - 1):
            return self
        values, offsets = {}, {}
        for k in self.keys:
            off = self.offsets[k]
            if is_unit(off):
                values[k], offsets[k] = self.values[k][idx], unit_offsets(len(idx))
                continue
            lengths = (off[1:] - off[:-1])[idx]
            starts = off[:-1][idx]
            new_off = np.zeros(len(idx) + 1, np.int64)
            np.cumsum(lengths, out=new_off[1:])
            # gather the jagged ids: position p of output row r reads starts[r] + p
            rep = np.repeat(starts - new_off[:-1], lengths)
            values[k] = self.values[k][np.arange(new_off[-1], dtype=np.int64) + rep]
            offsets[k] = new_off
        return SparseBatch(self.keys, values, offsets, self.labels[idx], self.event_time[idx])

    @staticmethod
    def concat(batches: list[SparseBatch]) -> SparseBatch:
        if len(batches) == 1:
            return batches[0]
        keys = batches[0].keys
        values = {k: np.concatenate([b.values[k] for b in batches]) for k in keys}
        offsets = {}
        for k in keys:
            if all(is_unit(b.offsets[k]) for b in batches):
                offsets[k] = unit_offsets(len(values[k]))
                continue
            parts, base = [np.zeros(1, np.int64)], 0
            for b in batches:
                parts.append(b.offsets[k][1:] + base)
                base += int(b.offsets[k][-1])
            offsets[k] = np.concatenate(parts)
        return SparseBatch(
            keys,
            values,
            offsets,
            np.concatenate([b.labels for b in batches]),
            np.concatenate([b.event_time for b in batches]),
        )

    @staticmethod
    def empty(keys: list[str]) -> SparseBatch:
        z = np.zeros(0, np.int64)
        return SparseBatch(
            list(keys), {k: z for k in keys}, dict.fromkeys(keys, unit_offsets(0)), np.zeros(0, np.float32), z
        )

    def to_kjt(self, keys: list[str] | None = None) -> KeyedJaggedTensor:
        """KeyedJaggedTensor over `keys` (default: all); fields left out of a model are dropped."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        keys = self.keys if keys is None else keys
        values = np.concatenate([self.values[k] for k in keys]) if keys else np.zeros(0, np.int64)
        lengths = np.concatenate([_lengths(self.offsets[k]) for k in keys]) if keys else np.zeros(0, np.int64)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=list(keys), values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
        )

    def labels_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.labels)
