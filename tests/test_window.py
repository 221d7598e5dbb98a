"""Event-time windows: splitting, late rows, resume after a checkpoint."""

import numpy as np
import pyarrow as pa

from dimstream.stream.decode import Decoder
from dimstream.stream.schema import FieldSpec, Schema
from dimstream.stream.sources.base import Source, SourceBatch, row_position
from dimstream.stream.sources.table import TableSource
from dimstream.stream.window import Windower
from tests.helpers import tiny_batch, tiny_schema


class ListSource(Source):
    """A finite in-memory source of real Arrow batches (a Source, not a mock of one)."""

    name = "list"
    default_window_seconds = 3600

    def __init__(self, batches):
        self.batches, self.schema = batches, tiny_schema()

    def read(self, position):
        start = position["row"] if position else 0
        for i in range(start, len(self.batches)):
            yield SourceBatch(self.batches[i], row_position(i), row_position(i + 1))


def _batches():
    # 4 batches of 50 rows spanning 2 hours; batch 1 straddles the 1h boundary
    out = []
    for i in range(4):
        b = tiny_batch(50, seed=i)
        t = 1800 * i + np.arange(50) * 36  # each batch covers 30 minutes
        out.append(b.set_column(b.schema.get_field_index("event_time"), "event_time", pa.array(t)))
    return out


def test_windows_split_at_boundaries_and_record_resume_positions():
    src = ListSource(_batches())
    ws = list(Windower(src, Decoder(src.schema), 3600).windows())
    assert [(w.start, w.end, len(w.batch)) for w in ws] == [(0, 3600, 100), (3600, 7200, 100)]
    # window 0 closed while batch 2 (first rows of window 1) was buffered: resume there
    assert ws[0].resume == {"row": 2} and ws[0].read_upto == {"row": 3}
    assert ws[1].resume == {"row": 4}


def test_late_rows_are_rejected_with_reason():
    bs = _batches()
    late = tiny_batch(10, seed=9)
    late = late.set_column(late.schema.get_field_index("event_time"), "event_time", pa.array(np.full(10, 100)))
    src = ListSource(bs[:3] + [late] + bs[3:])
    ws = list(Windower(src, Decoder(src.schema), 3600).windows())
    assert ws[1].rejected_counts == {"late": 10}
    assert ws[1].rejected[0].rows.num_rows == 10


def test_resume_skips_rows_handled_before_the_checkpoint():
    src = ListSource(_batches())
    first = next(iter(Windower(src, Decoder(src.schema), 3600).windows()))
    again = list(
        Windower(
            src, Decoder(src.schema), 3600, start=first.resume, watermark=first.end, read_upto=first.read_upto
        ).windows()
    )
    assert [(w.start, len(w.batch)) for w in again] == [(3600, 100)]
    assert again[0].replayed_rows == 0  # batch 2 holds only window-1 rows
    assert not again[0].rejected_counts


def test_bad_batches_are_counted_not_fatal():
    bs = _batches()
    broken = bs[1].drop_columns(["label"])
    src = ListSource([bs[0], broken, bs[2], bs[3]])
    ws = list(Windower(src, Decoder(src.schema), 3600).windows())
    assert ws[0].rejected_counts == {"missing_column": 50}
    assert len(ws[0].batch) == 50 and len(ws[1].batch) == 100


def test_a_row_re_read_after_a_restart_is_skipped_only_if_the_checkpoint_covered_it():
    """5 windows of 60 s, 10 rows each; rid 45 (among window 4's rows) belongs to window 2. The
    first run reads all 50 rows in one batch (a Kafka poll after a restart reads far ahead), closes
    window 0 and dies. Resumed from window 0's checkpoint with 10-row batches, rows of window 0
    are skipped as replayed; rid 45 sat in window 2, which the first run never closed: it is late
    now, and dead-lettered, not skipped as handled (it was silently lost: benchmarks/soak.py)."""
    schema = Schema([FieldSpec("user", "categorical", 10)])
    t = np.repeat(np.arange(5) * 60, 10) + np.tile(np.arange(10), 5)
    t[45] = 2 * 60 + 5
    table = pa.table(
        {"user": np.zeros(50, np.int64), "label": np.zeros(50, np.int64), "event_time": t, "rid": np.arange(50)}
    )
    first = next(Windower(TableSource("t", table, schema, batch_rows=50), Decoder(schema), 60).windows())
    again = Windower(
        TableSource("t", table, schema, batch_rows=10),
        Decoder(schema),
        60,
        start=first.resume,
        watermark=first.end,
        read_upto=first.read_upto,
    )
    trained, late, replayed = [], [], 0
    for w in again.windows():
        trained += w.table.column("rid").to_pylist() if w.table is not None else []
        late += [r for rej in w.rejected if rej.reason == "late" for r in rej.rows.column("rid").to_pylist()]
        replayed += w.replayed_rows
    assert replayed == 10 and late == [45]
    assert sorted(trained) == [r for r in range(10, 50) if r != 45]
