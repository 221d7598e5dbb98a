"""The Criteo display-ads TSV format: label, I1..I13 (integers), C1..C26 (hashed hex), no header.

Criteo has no timestamps: rows are in time order, so event time is synthesised from the row
number at `rows_per_hour` rows per hour from a fixed epoch. Lines that do not parse are
skipped by the CSV reader, counted, and reported as one error batch per file (reason
"corrupt_input") so they reach the dead-letter record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as csv

from dimstream.stream.schema import FieldSpec, Schema
from dimstream.stream.sources.base import SourceBatch, SourceOptions
from dimstream.stream.sources.registry import path_arg
from dimstream.stream.sources.table import TableSource

INTS = [f"I{i}" for i in range(1, 14)]
CATS = [f"C{i}" for i in range(1, 27)]
EPOCH = 1_400_000_000


def criteo_schema(buckets: int = 1_000_000) -> Schema:
    return Schema([FieldSpec(c, "numeric", 64) for c in INTS] + [FieldSpec(c, "categorical", buckets) for c in CATS])


def read_delimited(path: Path, names, types, delimiter: str, header: bool) -> tuple[pa.Table, int]:
    bad = []
    table = csv.read_csv(
        path,
        read_options=csv.ReadOptions(column_names=None if header else names),
        parse_options=csv.ParseOptions(
            delimiter=delimiter, quote_char=False, invalid_row_handler=lambda row: bad.append(row) or "skip"
        ),
        convert_options=csv.ConvertOptions(column_types=types, strings_can_be_null=True),
    )
    return table, len(bad)


class _DelimitedSource(TableSource):
    def __init__(self, name, table, schema, skipped: int, batch_rows: int):
        super().__init__(name, table, schema, batch_rows, default_window_seconds=3600)
        self.skipped = skipped

    def read(self, position):
        if self.skipped and not position:
            yield SourceBatch(
                None,
                {"row": 0},
                {"row": 0},
                error="corrupt_input",
                detail=f"{self.name}: {self.skipped} malformed lines skipped",
            )
        yield from super().read(position)


class CriteoSource(_DelimitedSource):
    def __init__(self, path: Path, batch_rows: int = 65536, rows_per_hour: int = 100_000, buckets: int = 1_000_000):
        types = {"label": pa.int8()} | {c: pa.int64() for c in INTS} | {c: pa.string() for c in CATS}
        table, skipped = read_delimited(Path(path), ["label"] + INTS + CATS, types, "\t", header=False)
        t = EPOCH + (np.arange(table.num_rows) * 3600) // rows_per_hour
        table = table.append_column("event_time", pa.array(t.astype(np.int64)))
        super().__init__(f"criteo:{path}", table, criteo_schema(buckets), skipped, batch_rows)

    @classmethod
    def from_spec(cls, arg: str, options: SourceOptions) -> CriteoSource:
        """`criteo:FILE`: one TSV file of the Criteo display-ads format."""
        return cls(path_arg(arg, "criteo:FILE", directory=False))
