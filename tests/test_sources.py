"""Sources over real files and the real MovieLens-100k data."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dimstream.stream.decode import Decoder
from dimstream.stream.schema import SchemaError
from dimstream.stream.sources.avazu import AvazuSource
from dimstream.stream.sources.criteo import CriteoSource
from dimstream.stream.sources.files import FilesSource, schema_from_config
from dimstream.stream.sources.movielens import MovieLensSource
from dimstream.stream.sources.registry import open_source
from dimstream.stream.window import Windower
from tests.helpers import ML100K, tiny_batch, tiny_schema

needs_ml100k = pytest.mark.skipif(not (ML100K / "u.data").exists(), reason=f"MovieLens-100k not at {ML100K}")


def _write_dir(tmp_path):
    pq.write_table(pa.Table.from_batches([tiny_batch(100, 0, t0=0)]), tmp_path / "a.parquet")
    with pa.ipc.new_file(str(tmp_path / "b.arrow"), tiny_batch(1).schema) as w:
        w.write_batch(tiny_batch(80, 1, t0=3600))
    with pa.ipc.new_stream(str(tmp_path / "c.ipc"), tiny_batch(1).schema) as w:
        w.write_batch(tiny_batch(60, 2, t0=7200))
    return tmp_path


def test_files_source_reads_parquet_and_ipc_and_resumes_exactly(tmp_path):
    src = FilesSource(_write_dir(tmp_path), tiny_schema(), batch_rows=50)
    batches = list(src.read(None))
    assert [b.batch.num_rows for b in batches] == [50, 50, 50, 30, 50, 10]
    assert batches[2].position == {"file": "b.arrow", "row": 0}
    again = list(src.read(batches[3].position))
    assert [b.batch.num_rows for b in again] == [30, 50, 10]
    assert again[0].batch.equals(batches[3].batch)
    assert list(src.read(batches[3].next_position))[0].batch.equals(batches[4].batch)


def test_a_corrupt_file_is_dead_lettered_and_the_rest_is_read(tmp_path):
    _write_dir(tmp_path)
    (tmp_path / "b2.parquet").write_bytes(b"PAR1 this is not parquet")
    src = FilesSource(tmp_path, tiny_schema())
    windows = list(Windower(src, Decoder(src.schema), 3600).windows())
    assert sum(len(w.batch) for w in windows) == 240
    counts = {}
    for w in windows:
        for k, v in w.rejected_counts.items():
            counts[k] = counts.get(k, 0) + v
    assert counts == {"corrupt_input": 1}
    detail = [r.detail for w in windows for r in w.rejected]
    assert detail and detail[0].startswith("b2.parquet:")


def _with_times(rb: pa.RecordBatch, t: np.ndarray) -> pa.Table:
    rb = rb.set_column(rb.schema.get_field_index("event_time"), "event_time", pa.array(t.astype(np.int64)))
    return pa.Table.from_batches([rb])


def test_files_resume_tells_replayed_rows_from_late_rows_by_file_and_row(tmp_path):
    """Restarted at window 0's checkpoint (a.parquet row 50, read up to row 100): rows of
    window 0 in a.parquet rows 50-99 were trained before, rows of window 0 first seen in
    b.parquet are late. Comparing rows without the file got both wrong."""
    t_a = np.linspace(0, 7199, 150).astype(np.int64)  # batch a@50 straddles the 3600 s boundary
    pq.write_table(_with_times(tiny_batch(150, 0), t_a), tmp_path / "a.parquet")
    t_b = np.concatenate([np.full(20, 100), 7200 + np.arange(30) * 60])  # 20 late rows first
    pq.write_table(_with_times(tiny_batch(50, 1), t_b), tmp_path / "b.parquet")
    src = FilesSource(tmp_path, tiny_schema(), batch_rows=50)
    full = list(Windower(src, Decoder(src.schema), 3600).windows())
    first = full[0]
    assert (first.resume, first.read_upto) == ({"file": "a.parquet", "row": 50}, {"file": "a.parquet", "row": 100})
    again = list(
        Windower(
            src, Decoder(src.schema), 3600, start=first.resume, watermark=first.end, read_upto=first.read_upto
        ).windows()
    )
    replayed = int((t_a[50:100] < 3600).sum())
    assert replayed == 25 and sum(w.replayed_rows for w in again) == replayed
    assert [w.rejected_counts for w in again] == [w.rejected_counts for w in full[1:]] == [{"late": 20}, {}]
    assert [(w.start, len(w.batch)) for w in again] == [(w.start, len(w.batch)) for w in full[1:]]
    assert [(w.start, len(w.batch)) for w in full] == [(0, 75), (3600, 75), (7200, 30)]


def test_schema_from_config_declares_any_log_and_refuses_bad_declarations():
    s = schema_from_config(
        {
            "label": "clicked",
            "event_time": "ts",
            "fields": [{"name": "user", "kind": "categorical", "num_embeddings": 100}],
        }
    )
    assert s.label == "clicked" and s.feature_names == ["user"]
    for bad in [
        None,
        {"fields": []},
        {"fields": [{"name": "u", "kind": "categorical"}]},
        {"fields": [{"name": "u", "kind": "weird", "num_embeddings": 3}]},
    ]:
        with pytest.raises(SchemaError):
            schema_from_config(bad)


def test_registry_rejects_bad_specs(tmp_path):
    cases = {
        "nonsense": "unknown source kind 'nonsense'",
        "files:": "files:DIR needs a directory",
        f"files:{tmp_path}/nope": "nope is not a directory",
        f"criteo:{tmp_path}": "is not a file",
        "parquet:/x": "unknown source kind 'parquet'",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message):
            open_source(spec)


@needs_ml100k
def test_movielens_is_100k_time_ordered_rows_with_labels_and_genres():
    src = MovieLensSource(ML100K)
    t = src.table
    assert t.num_rows == 100_000 and src.default_window_seconds == 86400
    raw = np.loadtxt(ML100K / "u.data", dtype=np.int64)
    assert t.column("label").to_numpy().mean() == pytest.approx((raw[:, 2] > 3).mean())
    assert (np.diff(t.column("event_time").to_numpy()) >= 0).all()
    # genres: as many as the movie's flags in u.item
    flags = {}
    for line in (ML100K / "u.item").read_text(encoding="latin-1").splitlines():
        parts = line.split("|")
        flags[int(parts[0])] = sum(int(x) for x in parts[5:])
    movies = t.column("movie").to_numpy()[:500]
    lengths = [len(g) for g in t.column("genres").to_pylist()[:500]]
    assert lengths == [flags[m] for m in movies]
    r = Decoder(src.schema).decode(t)
    assert len(r.batch) == 100_000 and not r.rejected_counts


def test_criteo_tsv_with_a_malformed_line(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for _i in range(300):
        ints = [str(x) if x >= 0 else "" for x in rng.integers(-1, 50, 13)]
        cats = [format(int(x), "08x") if x else "" for x in rng.integers(0, 1000, 26)]
        lines.append("\t".join([str(int(rng.random() < 0.25))] + ints + cats))
    lines.insert(7, "1\tgarbage")
    path = tmp_path / "day_0.tsv"
    path.write_text("\n".join(lines) + "\n")
    src = CriteoSource(path, batch_rows=128, rows_per_hour=100)
    batches = list(src.read(None))
    assert batches[0].error == "corrupt_input" and "1 malformed" in batches[0].detail
    assert sum(b.batch.num_rows for b in batches[1:]) == 300
    r = Decoder(src.schema).decode(src.table)
    assert len(r.batch) == 300 and not r.rejected_counts
    assert (
        src.table.column("event_time").to_numpy()[-1] - src.table.column("event_time").to_numpy()[0] == 2 * 3600 + 3564
    )


def test_avazu_csv(tmp_path):
    from dimstream.stream.sources.avazu import CATEGORICAL

    header = "id,click,hour," + ",".join(CATEGORICAL)
    rows = [
        f"{i},{i % 2},141021{h:02d}," + ",".join(f"v{(i * 7 + j) % 5}" for j in range(len(CATEGORICAL)))
        for i, h in enumerate([0, 0, 1, 2, 2])
    ]
    path = tmp_path / "train.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    src = AvazuSource(path)
    t = src.table
    assert t.column("click").to_pylist() == [0, 1, 0, 1, 0]
    et = t.column("event_time").to_numpy()
    assert et[2] - et[0] == 3600 and et[0] == 1413849600  # 2014-10-21T00:00Z
    assert len(Decoder(src.schema).decode(t).batch) == 5
