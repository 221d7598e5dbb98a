"""MovieLens in GroupLens's ml-100k format (u.data, u.user, u.item) as a click stream.

label = rating > 3; fields: user, movie, age bucket, gender, occupation, zip prefix, release
year, genres (multi-valued). Rows are sorted by rating time (stable), read vectorised with
pyarrow.csv and joined to users and movies by a vectorised lookup (`_lookup`).

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())  # two ratings of a two-user, two-movie ml-100k
>>> _ = (d / "u.data").write_text("2\\t1\\t5\\t881250949\\n1\\t2\\t3\\t881250000\\n")
>>> _ = (d / "u.user").write_text("1|24|M|technician|85711\\n2|53|F|other|94043\\n")
>>> flags = lambda *on: "|".join("1" if g in on else "0" for g in range(N_GENRES))
>>> _ = (d / "u.item").write_text(f"1|Toy Story (1995)|01-Jan-1995||url|{flags(3, 4)}\\n"
...                               f"2|GoldenEye (1995)|01-Jan-1995||url|{flags(1)}\\n")
>>> src = MovieLensSource(d)
>>> src.table.select(["user", "movie", "label", "genres"]).to_pylist()  # in time order
[{'user': 1, 'movie': 2, 'label': 0, 'genres': [1]}, {'user': 2, 'movie': 1, 'label': 1, 'genres': [3, 4]}]
>>> src.default_window_seconds
86400
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv

from dimstream.stream.schema import FieldSpec, Schema
from dimstream.stream.sources.base import SourceOptions
from dimstream.stream.sources.registry import path_arg
from dimstream.stream.sources.table import TableSource

AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])  # the MovieLens-1M age groups
N_GENRES = 19


def movielens_schema() -> Schema:
    return Schema(
        [
            FieldSpec("user", "categorical", 2048),
            FieldSpec("movie", "categorical", 4096),
            FieldSpec("age_bucket", "categorical", 16),
            FieldSpec("gender", "categorical", 8),
            FieldSpec("occupation", "categorical", 64),
            FieldSpec("zip_prefix", "categorical", 1024),
            FieldSpec("release_year", "categorical", 128),
            FieldSpec("genres", "multi", 32),
        ]
    )


def _read(path: Path, names: list[str], delimiter: str, types: dict) -> pa.Table:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (expected GroupLens ml-100k files)")
    return csv.read_csv(
        path,
        read_options=csv.ReadOptions(column_names=names, encoding="latin-1"),
        parse_options=csv.ParseOptions(delimiter=delimiter, quote_char=False),
        convert_options=csv.ConvertOptions(column_types=types),
    )


def load_movielens(directory: Path) -> pa.Table:
    d = Path(directory)
    ratings = _read(
        d / "u.data",
        ["user", "movie", "rating", "event_time"],
        "\t",
        {"user": pa.int64(), "movie": pa.int64(), "rating": pa.int64(), "event_time": pa.int64()},
    )
    users = _read(
        d / "u.user",
        ["user", "age", "gender", "occupation", "zip"],
        "|",
        {"user": pa.int64(), "age": pa.int64(), "zip": pa.string()},
    )
    genre_cols = [f"g{i}" for i in range(N_GENRES)]
    items = _read(
        d / "u.item",
        ["movie", "title", "release", "video_release", "url"] + genre_cols,
        "|",
        {"movie": pa.int64(), "release": pa.string()} | {g: pa.int8() for g in genre_cols},
    )
    flags = np.stack([items.column(g).to_numpy(zero_copy_only=False) for g in genre_cols], axis=1) > 0
    lengths = flags.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    genres = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.nonzero(flags)[1].astype(np.int64)))
    year = pc.utf8_slice_codeunits(pc.fill_null(items.column("release"), ""), -4)
    year = pc.cast(pc.if_else(pc.equal(pc.utf8_length(year), 4), year, None), pa.int64())
    items = pa.table({"movie": items.column("movie"), "release_year": year, "genres": genres})
    users = pa.table(
        {
            "user": users.column("user"),
            "age_bucket": pa.array(np.searchsorted(AGE_EDGES, users.column("age").to_numpy(), side="right")),
            "gender": users.column("gender"),
            "occupation": users.column("occupation"),
            "zip_prefix": pc.utf8_slice_codeunits(users.column("zip"), 0, 3),
        }
    )
    u = _lookup(users, "user", ratings.column("user").to_numpy())
    m = _lookup(items, "movie", ratings.column("movie").to_numpy())
    cols = {c: u.column(c) for c in u.column_names if c != "user"} | {
        c: m.column(c) for c in m.column_names if c != "movie"
    }
    t = ratings
    for name, col in cols.items():
        t = t.append_column(name, col)
    t = t.append_column("label", pc.cast(pc.greater(t.column("rating"), 3), pa.int8()))
    t = t.take(pc.sort_indices(t, [("event_time", "ascending"), ("user", "ascending"), ("movie", "ascending")]))
    return t.select(movielens_schema().feature_names + ["label", "event_time"])


def _lookup(table: pa.Table, key: str, ids: np.ndarray) -> pa.Table:
    """Rows of `table` whose `key` equals each of `ids` (vectorised join by position;
    Arrow's hash join refuses list columns). Unknown ids give null rows."""
    keys = table.column(key).to_numpy()
    pos = np.full(max(int(keys.max()), int(ids.max())) + 1, -1, np.int64)
    pos[keys] = np.arange(len(keys))
    idx = pos[ids]
    return table.take(pa.array(idx, mask=idx < 0))


class MovieLensSource(TableSource):
    def __init__(self, directory: Path, batch_rows: int = 8192):
        super().__init__(
            "ml-100k", load_movielens(directory), movielens_schema(), batch_rows, default_window_seconds=86400
        )

    @classmethod
    def from_spec(cls, arg: str, options: SourceOptions) -> MovieLensSource:
        """`ml-100k:DIR`: GroupLens's u.data, u.user and u.item in DIR."""
        return cls(path_arg(arg, "ml-100k:DIR", directory=True))
