"""A source over one in-memory Arrow table sorted by event time (datasets converted on load)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from dimstream.stream.schema import Schema
from dimstream.stream.sources.base import Source, SourceBatch, row_position


class TableSource(Source):
    """Yields `batch_rows`-row slices of `table`; positions are row offsets."""

    def __init__(
        self,
        name: str,
        table: pa.Table,
        schema: Schema,
        batch_rows: int = 8192,
        default_window_seconds: int | None = None,
    ):
        self.name, self.table, self.schema = name, table, schema
        self.batch_rows = int(batch_rows)
        self.default_window_seconds = default_window_seconds

    def read(self, position: dict | None) -> Iterator[SourceBatch]:
        row = int(position["row"]) if position else 0
        n = self.table.num_rows
        while row < n:
            stop = min(row + self.batch_rows, n)
            batch = self.table.slice(row, stop - row).combine_chunks()
            for rb in batch.to_batches():
                yield SourceBatch(rb, row_position(row), row_position(row + rb.num_rows))
                row += rb.num_rows
