"""A directory of Parquet, Arrow IPC, CSV or JSON-lines files, read in file-name order.

Any tabular click log streams without code changes: the schema is declared in the TOML config
(`schema_from_config`). A file that cannot be read is not fatal: it yields an error batch
(reason "corrupt_input", dead-lettered with the file name and the error) and reading goes on.
Files of another kind (no suffix in SUFFIXES) are skipped with one WARNING naming them, the
first time they are seen. CSV files are read with pyarrow.csv: ids of a field declared
`id_type = "str"` are read as strings (so "007" stays "007"), other columns are inferred and
cast by the decoder like any other batch (a multi field cannot be held by a CSV column).
Positions are {"file": name, "row": offset within the file}.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from dimstream.stream.schema import FieldSpec, Schema, SchemaError
from dimstream.stream.sources.base import Source, SourceBatch, SourceOptions
from dimstream.stream.sources.registry import path_arg

log = logging.getLogger(__name__)

SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc", ".csv", ".jsonl", ".ndjson")


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
    return Schema(
        fields,
        label=d.get("label", "label"),
        event_time=d.get("event_time", "event_time"),
        event_time_unit=d.get("event_time_unit", "s"),
    )


def read_ipc(path: Path) -> pa.Table:
    """An Arrow IPC file, in the file or the stream format."""
    with pa.memory_map(str(path)) as src:
        try:
            return pa.ipc.open_file(src).read_all()
        except pa.ArrowInvalid:
            src.seek(0)
            return pa.ipc.open_stream(src).read_all()


def read_csv(path: Path, schema: Schema) -> pa.Table:
    """A CSV file with a header line; string ids stay strings where the schema says so."""
    types = {f.source_column: pa.string() for f in schema.fields if f.id_type == "str"}
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))


def _read_table(path: Path, schema: Schema) -> pa.Table:
    if path.suffix in (".csv", ".jsonl", ".ndjson") and path.stat().st_size == 0:
        return pa.table({})  # an empty text file holds no rows (pyarrow calls it an error)
    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix == ".csv":
        return read_csv(path, schema)
    if path.suffix in (".jsonl", ".ndjson"):
        return pajson.read_json(path)
    return read_ipc(path)


class FilesSource(Source):
    def __init__(self, directory: Path, schema: Schema, batch_rows: int = 65536):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory} is not a directory")
        self.name, self.schema, self.batch_rows = f"files:{directory}", schema, int(batch_rows)
        self.skipped: set[str] = set()  # files of no supported kind, reported once each

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
        """The files to read, in name order; others (not hidden ones) are reported once each."""
        names = sorted(self.directory.iterdir())
        unsupported = [
            p.name
            for p in names
            if p.suffix not in SUFFIXES and not p.name.startswith(".") and p.name not in self.skipped and p.is_file()
        ]
        if unsupported:
            self.skipped.update(unsupported)
            log.warning(
                "%s: skipping %d file(s) of no supported kind (%s): %s",
                self.name,
                len(unsupported),
                ", ".join(SUFFIXES),
                ", ".join(unsupported),
            )
        return [p for p in names if p.suffix in SUFFIXES]

    def read(self, position: dict | None) -> Iterator[SourceBatch]:
        start_file, start_row = (position["file"], int(position["row"])) if position else (None, 0)
        for path in self.files():
            if start_file is not None and path.name < start_file:
                continue
            row = start_row if path.name == start_file else 0
            try:
                table = _read_table(path, self.schema)
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
