"""The contracts every input implements: `Source` (all of them) and `LiveSource` (a broker).

A source yields `SourceBatch`es in (roughly) event-time order. Each carries a JSON-able
`position`: where reading must restart so that this batch is read again. The window loop
checkpoints, at each window's close, the position of the earliest batch that still holds
rows of an open window plus the window boundary (the "watermark"); on resume the source is
re-opened at that position and rows older than the watermark, already trained or
dead-lettered, are skipped. This gives exactly-once training without row-level offsets and
works the same for a Kafka partition (position = offsets per partition).

What a position looks like is the source's business: the window loop only asks the source
to compare two (`Source.is_before`) and where to resume (`resume_position`,
`read_upto_position`). A source that talks to a broker is a `LiveSource`: it is also told
when a checkpoint is durable (`commit`), asked to re-tell it after a crash (`recover`),
hands dead letters back to the broker (`dead_letter_rows`) and reports its `status()`, which
the metrics read at scrape time. The daemon calls nothing else.

How a source is opened from a `--source` spec is declared too: `Source.from_spec(arg,
options)`, looked up by kind in stream/sources/registry.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dimstream.stream.schema import Schema


@dataclass
class SourceBatch:
    """One unit read from a source.

    batch: the rows, or None when the input could not be read (then `error` says why and the
        loop dead-letters `detail`, e.g. a corrupt Parquet file or an undecodable message).
    position: JSON-able; re-opening the source at it yields this batch again.
    next_position: JSON-able; re-opening the source at it yields the batch after this one.
    message_rows: the row count of each message `batch` was concatenated from, in arrival order
        (a Kafka poll's run of small messages); None: the batch is one unit (a file, a dataset
        slice). The window loop judges lateness per message in arrival order, so how a source
        happens to group messages into batches (polls differ after a restart) changes nothing.
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
    message_rows: np.ndarray | None = None
    # with message_rows, each message's offset in its partition (Kafka; Source.messages_before)
    message_offsets: np.ndarray | None = None


@dataclass(frozen=True)
class SourceStatus:
    """What a live source reports about its broker, read at scrape time (ops/metrics.py)."""

    up: bool  # the broker answers (its own liveness probe)
    lag: dict[str, int] = field(default_factory=dict)  # messages behind, per partition
    last_message_time: float | None = None  # unix seconds of the last data delivered
    handed_over_rows: int = 0  # rows skipped: an earlier owner had trained them
    offset_resets: int = 0  # partitions restarted from their start: their offsets went back


@dataclass(frozen=True)
class SourceOptions:
    """What a `--source` spec does not say, from the run's config (`Source.from_spec`)."""

    schema_config: dict | None = None  # a declared schema (TOML [schema]): files, kafka
    seed: int = 0
    kafka: dict = field(default_factory=dict)  # kafka-python security options (TOML [kafka])
    rows_per_window: int = 50_000  # synthetic only
    window_seconds: int | None = None  # the run's window length, None: the source's default


def row_position(row: int) -> dict:
    """The position of sources that are one sequence of rows (datasets, synthetic)."""
    return {"row": int(row)}


class Source(ABC):
    """Every input: synthetic, files, datasets, Kafka.

    Subclasses set `name` and `schema` and implement `read`; the other members have defaults
    for a source that is one sequence of rows with positions {"row": n}."""

    name: str
    schema: Schema
    # Length of a window that suits the source (e.g. 1 day for ml-100k), or None.
    default_window_seconds: int | None = None

    @abstractmethod
    def read(self, position: dict | None) -> Iterator[SourceBatch]:
        """Batches from `position` (None: from the beginning); ends when the source is exhausted
        (a file or dataset) or never (a live stream)."""

    def close(self) -> None:  # noqa: B027 (most sources hold nothing to release)
        """Release what the source holds (connections, files)."""

    def truth(self) -> dict | None:
        """What is known to be true of the stream (the synthetic generator's field ranks), for
        the summary; None for real data."""
        return None

    @classmethod
    def from_spec(cls, arg: str, options: SourceOptions) -> Source:
        """The source a `--source KIND:ARG` spec names (`arg`: the text after "KIND:", the
        whole URL for "KIND://...", "" for a bare "KIND"); raises ValueError for a bad `arg`."""
        raise NotImplementedError(f"{cls.__name__} cannot be opened from a --source spec")

    def is_before(self, position: dict, limit: dict | None) -> bool:
        """True if the batch at `position` was read before reading had got to `limit` (a
        checkpointed `read_upto`): its rows older than the watermark were handled before a
        restart, not late. This default knows row positions {"row": n}; a source with positions
        of another shape overrides it (else resuming would fail here, not count its rows wrong).

        >>> class Empty(Source):
        ...     name, schema = "empty", None
        ...     def read(self, position):
        ...         return iter(())
        >>> Empty().is_before({"row": 3}, {"row": 5}), Empty().is_before({"row": 5}, {"row": 5})
        (True, False)
        >>> Empty().is_before({"row": 3}, None)  # no checkpoint: nothing was read before it
        False
        """
        if not limit:
            return False
        if "row" not in position or "row" not in limit:
            raise TypeError(
                f"{type(self).__name__}: {position} and {limit} are not both row positions; a source "
                "with positions of another shape overrides Source.is_before (or the checkpoint is "
                "another source's)"
            )
        return position["row"] < limit["row"]

    def messages_before(self, sb: SourceBatch, limit: dict | None) -> bool | np.ndarray:
        """`is_before` per message of `sb`: one bool per `sb.message_rows` entry, or one bool for
        the whole batch. A poll that straddles `limit` holds messages of both sides, and rows of a
        message read only after the restart must be judged late, not skipped as handled. This
        default judges the batch by its position (a source whose batches are units)."""
        return self.is_before(sb.position, limit)

    def resume_position(
        self, unfinished: list[SourceBatch], last: SourceBatch | None, start: dict | None
    ) -> dict | None:
        """Where to re-open the source after a checkpoint.

        unfinished: batches (in read order) that still hold rows of windows not yet closed.
        last: the last batch read (None if nothing was read since `start`).
        A single sequence restarts at the first unfinished batch, or after the last batch read;
        sources that interleave several sequences (Kafka partitions) override this."""
        if unfinished:
            return unfinished[0].position
        return last.next_position if last is not None else start

    def read_upto_position(self, last: SourceBatch | None, previous: dict | None) -> dict | None:
        """How far reading had got when a window closed (checkpointed as `read_upto`); a single
        sequence is read up to the end of the last batch."""
        return last.next_position if last is not None else previous


class LiveSource(Source):
    """A source backed by a broker (Kafka): positions are told back once they are durable."""

    @abstractmethod
    def commit(self, position: dict, watermark: int | None, read_upto: dict | None, window: int | None) -> None:
        """The checkpoint of `window`, which resumes at `position`, is durable: commit it."""

    @abstractmethod
    def recover(self, position: dict, watermark: int | None, read_upto: dict | None, window: int | None) -> None:
        """At start, before reading: re-tell the broker the last durable checkpoint (a crash
        may have come between writing it and `commit`)."""

    @abstractmethod
    def dead_letter_rows(self, table: pa.Table) -> None:
        """Put rejected rows (a dead-letter table, stream/deadletter.py) on the broker too."""

    @abstractmethod
    def status(self) -> SourceStatus:
        """The broker's status now; cheap and thread-safe (called at every scrape)."""
