"""The Source contract every input (synthetic, files, datasets, Kafka) implements.

A source yields `SourceBatch`es in (roughly) event-time order. Each carries a JSON-able
`position`: where reading must restart so that this batch is read again. The window loop
checkpoints, at each window's close, the position of the earliest batch that still holds
rows of an open window plus the window boundary (the "watermark"); on resume the source is
re-opened at that position and rows older than the watermark, already trained or
dead-lettered, are skipped. This gives exactly-once training without row-level offsets and
works the same for a Kafka partition (position = offsets per partition).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import pyarrow as pa

from dimstream.stream.schema import Schema


@dataclass
class SourceBatch:
    """One unit read from a source.

    batch: the rows, or None when the input could not be read (then `error` says why and the
        loop dead-letters `detail`, e.g. a corrupt Parquet file or an undecodable message).
    position: JSON-able; re-opening the source at it yields this batch again.
    next_position: JSON-able; re-opening the source at it yields the batch after this one.
    """

    batch: pa.RecordBatch | None
    position: dict
    next_position: dict
    error: str | None = None
    detail: str = ""
    schema: Schema | None = None  # a per-message schema version (Kafka), else the source's
    # heartbeats only (batch None, no error): the source cannot tell whether data is waiting
    # (its broker is down or hangs), so the time without data must not close windows as idle
    source_down: bool = False
    # heartbeats only: the source went back to its last durable position (a Kafka rebalance);
    # what was read since must be dropped by the window loop and will be read again
    rewind: bool = False


class Source(Protocol):
    name: str
    schema: Schema
    # Length of a window that suits the source (e.g. 1 day for ml-100k), or None.
    default_window_seconds: int | None

    def read(self, position: dict | None) -> Iterator[SourceBatch]:
        """Batches from `position` (None: from the beginning); ends when the source is exhausted
        (a file or dataset) or never (a live stream)."""
        ...

    def close(self) -> None:
        ...


def row_position(row: int) -> dict:
    """The position of sources that are a sequence of rows (files, datasets, synthetic)."""
    return {"row": int(row)}


def resume_position(source: Source, unfinished: list[SourceBatch], last: SourceBatch | None,
                    start: dict | None) -> dict | None:
    """Where to re-open `source` after a checkpoint.

    unfinished: batches (in read order) that still hold rows of windows not yet closed.
    last: the last batch read (None if nothing was read since `start`).
    Sources that interleave several sequences (Kafka partitions) override this with a
    `resume_position` method of their own; a single sequence restarts at the first
    unfinished batch, or after the last batch read."""
    own = getattr(source, "resume_position", None)
    if own is not None:
        return own(unfinished, last, start)
    if unfinished:
        return unfinished[0].position
    return last.next_position if last is not None else start


def read_upto_position(source: Source, last: SourceBatch | None, previous: dict | None) -> dict | None:
    """How far reading had got when a window closed (checkpointed as `read_upto`). Sources that
    interleave several sequences report it per sequence (`read_upto_position`); a single
    sequence is read up to the end of the last batch."""
    own = getattr(source, "read_upto_position", None)
    if own is not None:
        return own(previous)
    return last.next_position if last is not None else previous
