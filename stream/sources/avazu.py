"""The Avazu CSV format (header: id,click,hour,C1,banner_pos,site_id,...,C21); hour is YYMMDDHH."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from dimstream.stream.schema import FieldSpec, Schema
from dimstream.stream.sources.base import SourceOptions
from dimstream.stream.sources.criteo import _DelimitedSource, read_delimited
from dimstream.stream.sources.registry import path_arg

CATEGORICAL = [
    "C1",
    "banner_pos",
    "site_id",
    "site_domain",
    "site_category",
    "app_id",
    "app_domain",
    "app_category",
    "device_id",
    "device_ip",
    "device_model",
    "device_type",
    "device_conn_type",
    "C14",
    "C15",
    "C16",
    "C17",
    "C18",
    "C19",
    "C20",
    "C21",
]


def avazu_schema(buckets: int = 1_000_000) -> Schema:
    return Schema([FieldSpec(c, "categorical", buckets) for c in CATEGORICAL], label="click")


class AvazuSource(_DelimitedSource):
    def __init__(self, path: Path, batch_rows: int = 65536, buckets: int = 1_000_000):
        types = {"click": pa.int8(), "hour": pa.string()} | {c: pa.string() for c in CATEGORICAL}
        table, skipped = read_delimited(Path(path), None, types, ",", header=True)
        hour = pc.strptime(pc.binary_join_element_wise("20", table.column("hour"), ""), format="%Y%m%d%H", unit="s")
        table = table.append_column("event_time", pc.cast(hour, pa.int64()))
        super().__init__(f"avazu:{path}", table, avazu_schema(buckets), skipped, batch_rows)

    @classmethod
    def from_spec(cls, arg: str, options: SourceOptions) -> AvazuSource:
        """`avazu:FILE`: one CSV file of the Avazu format, with its header."""
        return cls(path_arg(arg, "avazu:FILE", directory=False))
