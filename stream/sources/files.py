"""A directory of Parquet or Arrow IPC files, read in file-name order.

Any tabular click log streams without code changes: the schema is declared in the TOML config
(`schema_from_config`). A file that cannot be read is not fatal: it yields an error batch
(reason "corrupt_input", dead-lettered with the file name and the error) and reading goes on.
Positions are {"file": name, "row": offset within the file}.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dimstream.stream.schema import FieldSpec, Schema, SchemaError
from dimstream.stream.sources.base import Source, SourceBatch, SourceOptions
from dimstream.stream.sources.registry import path_arg

SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")


def schema_from_config(d: dict | None) -> Schema:
    """Schema from a TOML table: {label=..., event_time=..., fields=[{name, kind, num_embeddings}, ...]}."""
    if not isinstance(d, dict) or not isinstance(d.get("fields"), list) or not d["fields"]:
        raise SchemaError("files: sources need a [schema] table with a non-empty fields list")
    fields = []
    for i, f in enumerate(d["fields"]):
        if not isinstance(f, dict) or "name" not in f or "kind" not in f or "num_embeddings" not in f:
            raise SchemaError(f"schema field #{i + 1} needs name, kind and num_embeddings")
        try:
            fields.append(FieldSpec(**f))
        except TypeError as e:
            raise SchemaError(f"schema field {f.get('name')!r}: {e}") from None
    return Schema(fields, label=d.get("label", "label"), event_time=d.get("event_time", "event_time"))


def read_ipc(path: Path) -> pa.Table:
    """An Arrow IPC file, in the file or the stream format."""
    with pa.memory_map(str(path)) as src:
        try:
            return pa.ipc.open_file(src).read_all()
        except pa.ArrowInvalid:
            src.seek(0)
            return pa.ipc.open_stream(src).read_all()


def _read_table(path: Path) -> pa.Table:
    return pq.read_table(path) if path.suffix == ".parquet" else read_ipc(path)


class FilesSource(Source):
    def __init__(self, directory: Path, schema: Schema, batch_rows: int = 65536):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory} is not a directory")
        self.name, self.schema, self.batch_rows = f"files:{directory}", schema, int(batch_rows)

    @classmethod
    def from_spec(cls, arg: str, options: SourceOptions) -> FilesSource:
        """`files:DIR`, with the schema declared in the config."""
        directory = path_arg(arg, "files:DIR", directory=True)
        return cls(directory, schema_from_config(options.schema_config))

    def is_before(self, position: dict, limit: dict | None) -> bool:
        """Files are read in name order, each from its first row: positions compare as
        (file name, row), so a row of a later file is never taken for one read before.

        >>> import tempfile
        >>> src = FilesSource(tempfile.gettempdir(), Schema([FieldSpec("user", "categorical", 8)]))
        >>> src.is_before({"file": "b.parquet", "row": 0}, {"file": "a.parquet", "row": 9})
        False
        >>> src.is_before({"file": "a.parquet", "row": 9}, {"file": "a.parquet\\0", "row": 0})
        True
        """
        if not limit:
            return False
        return (position["file"], int(position["row"])) < (limit["file"], int(limit["row"]))

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.suffix in SUFFIXES)

    def read(self, position: dict | None) -> Iterator[SourceBatch]:
        start_file, start_row = (position["file"], int(position["row"])) if position else (None, 0)
        for path in self.files():
            if start_file is not None and path.name < start_file:
                continue
            row = start_row if path.name == start_file else 0
            try:
                table = _read_table(path)
            except Exception as e:  # corrupt or unreadable: dead-letter and go on
                yield SourceBatch(
                    None,
                    {"file": path.name, "row": 0},
                    {"file": path.name + "\0", "row": 0},
                    error="corrupt_input",
                    detail=f"{path.name}: {e}",
                )
                continue
            while row < table.num_rows:
                n = min(self.batch_rows, table.num_rows - row)
                for rb in table.slice(row, n).combine_chunks().to_batches():
                    yield SourceBatch(rb, {"file": path.name, "row": row}, _next(path.name, row + rb.num_rows, table))
                    row += rb.num_rows


def _next(name: str, row: int, table: pa.Table) -> dict:
    # after the last row of a file, the next position is the start of any later file
    return {"file": name, "row": row} if row < table.num_rows else {"file": name + "\0", "row": 0}
