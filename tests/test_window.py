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


class MessageSource(Source):
    """Messages (Arrow tables) delivered in batches as `groups` says (lists of message indices,
    in order), each batch saying how many rows each of its messages gave, as a Kafka poll does."""

    name = "messages"

    def __init__(self, messages, schema, groups, message_rows=True):
        self.messages, self.schema, self.groups, self.message_rows = messages, schema, groups, message_rows

    def read(self, position):
        for i, group in enumerate(self.groups[position["row"] if position else 0 :]):
            rb = pa.concat_tables([self.messages[m] for m in group]).combine_chunks().to_batches()[0]
            rows = np.array([self.messages[m].num_rows for m in group]) if self.message_rows else None
            yield SourceBatch(rb, row_position(i), row_position(i + 1), message_rows=rows)


def _messages():
    """Six messages of 60 s windows: m2 brings a row of window 0 after m1 reached window 1 (and a
    NaN label the decoder drops), m4 a row of window 2 (which no row was in) after m3 reached
    window 3."""
    spec = [  # (rid, event time, label) per row of each message
        [(r, r, 0.0) for r in range(5)],
        [(r, 55 + r, 1.0) for r in range(5, 10)],
        [(10, 10, 0.0), (11, 65, float("nan"))],
        [(r, 168 + r, 0.0) for r in range(12, 17)],
        [(17, 130, 1.0), (18, 185, 0.0)],
        [(r, 221 + r, 0.0) for r in range(19, 24)],
    ]
    return [
        pa.table(
            {
                "user": np.zeros(len(rows), np.int64),
                "label": [lab for _, _, lab in rows],
                "event_time": np.array([t for _, t, _ in rows], np.int64),
                "rid": [r for r, _, _ in rows],
            }
        )
        for rows in spec
    ]


def _outcome(groups, message_rows=True):
    schema = Schema([FieldSpec("user", "categorical", 10)])
    src = MessageSource(_messages(), schema, groups, message_rows)
    trained, late, counts = {}, [], {}
    for w in Windower(src, Decoder(schema), 60).windows():
        if w.table is not None:
            trained[w.start] = sorted(w.table.column("rid").to_pylist())
        late += [r for rej in w.rejected if rej.reason == "late" for r in rej.rows.column("rid").to_pylist()]
        for k, v in w.rejected_counts.items():
            counts[k] = counts.get(k, 0) + v
    return trained, sorted(late), counts


def test_lateness_is_judged_per_message_however_messages_are_batched():
    """The same messages one per batch, all in one batch (a Kafka poll after a restart reads far
    ahead) and grouped otherwise: the same rows are late (a row whose window earlier messages had
    passed, whether or not that window held rows), the same rows trained in the same windows."""
    one_each = _outcome([[m] for m in range(6)])
    assert one_each[1] == [10, 17]
    assert one_each[2] == {"late": 2, "nan_label": 1}
    assert one_each[0] == {0: [0, 1, 2, 3, 4], 60: [5, 6, 7, 8, 9], 180: [*range(12, 17), 18], 240: [*range(19, 24)]}
    assert _outcome([list(range(6))]) == one_each
    assert _outcome([[0, 1], [2, 3, 4], [5]]) == one_each
    assert _outcome([[0], [1, 2], [3], [4, 5]]) == one_each


def test_a_batch_without_message_rows_is_one_message():
    """A file is one unit: rows out of order within it are not late among themselves."""
    trained, late, counts = _outcome([list(range(6))], message_rows=False)
    assert late == [] and counts == {"nan_label": 1}
    assert sum(len(r) for r in trained.values()) == 23


class OffsetSource(MessageSource):
    """MessageSource whose positions are message indices, as Kafka offsets are: a batch says
    each message's offset, and `messages_before` judges a read_upto per message."""

    def read(self, position):
        start = position["row"] if position else 0
        for group in self.groups:
            group = [m for m in group if m >= start]
            if group:
                rb = pa.concat_tables([self.messages[m] for m in group]).combine_chunks().to_batches()[0]
                rows = np.array([self.messages[m].num_rows for m in group])
                here, after = row_position(group[0]), row_position(group[-1] + 1)
                yield SourceBatch(rb, here, after, message_rows=rows, message_offsets=np.array(group))

    def messages_before(self, sb, limit):
        return sb.message_offsets < limit["row"] if limit else False


def test_a_poll_straddling_read_upto_skips_only_the_messages_read_before_the_restart():
    """m2 (a row of window 0, arriving after m1 closed it) was not read before the first run
    died. Resumed at m1 in one poll [m1, m2, m3] that straddles read_upto: m2's row is late
    (dead-lettered), not skipped as handled before the restart (it was: the whole batch was
    judged by its first message)."""
    schema = Schema([FieldSpec("user", "categorical", 10)])
    msgs = _messages()[:2] + [_messages()[2].slice(0, 1), _messages()[3]]  # rid 10 at t 10 in m2
    first_run = Windower(OffsetSource(msgs, schema, [[0], [1], [2], [3]]), Decoder(schema), 60)
    first = next(first_run.windows())
    assert (first.end, first.resume, first.read_upto) == (60, {"row": 1}, {"row": 2})
    again = Windower(
        OffsetSource(msgs, schema, [[0, 1, 2, 3]]),
        Decoder(schema),
        60,
        start=first.resume,
        watermark=first.end,
        read_upto=first.read_upto,
    )
    late, replayed, trained = [], 0, []
    for w in again.windows():
        late += [r for rej in w.rejected if rej.reason == "late" for r in rej.rows.column("rid").to_pylist()]
        replayed += w.replayed_rows
        trained += w.table.column("rid").to_pylist() if w.table is not None else []
    assert late == [10] and replayed == 0
    assert sorted(trained) == [*range(5, 10), *range(12, 17)]
