"""The declared source contracts (stream/sources/base.py) and the registry of `--source` kinds."""

import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dimstream.stream.decode import Decoder
from dimstream.stream.sources import registry
from dimstream.stream.sources.base import LiveSource, Source, SourceBatch, SourceOptions, SourceStatus
from dimstream.stream.sources.kafka import KafkaSource, Liveness
from dimstream.stream.sources.registry import open_source, register_source
from dimstream.stream.synthetic import T0, SyntheticSource
from dimstream.stream.window import Windower
from tests.helpers import REPO, tiny_batch, tiny_schema

BUILT_IN = ("synthetic", "files", "ml-100k", "criteo", "avazu", "kafka")


class SeqSource(Source):
    """A source with positions of its own shape, {"seq": n} (n from 100): the window loop must
    compare and resume them through the source, knowing nothing of their shape."""

    name = "seq"

    def __init__(self, batches, schema=None):
        self.batches, self.schema = batches, schema or tiny_schema()

    @classmethod
    def from_spec(cls, arg, options):
        n = int(arg)
        return cls([_timed(tiny_batch(50, i), 2400 * i) for i in range(n)])

    def read(self, position):
        first = position["seq"] - 100 if position else 0
        for i in range(first, len(self.batches)):
            yield SourceBatch(self.batches[i], {"seq": 100 + i}, {"seq": 101 + i})

    def is_before(self, position, limit):
        return bool(limit) and position["seq"] < limit["seq"]


def _timed(rb: pa.RecordBatch, t0: int, step: int = 48) -> pa.RecordBatch:
    """`rb` with event times t0, t0 + step, ... (50 rows at step 48 cover 2352 s)."""
    t = pa.array(t0 + np.arange(rb.num_rows, dtype=np.int64) * step)
    return rb.set_column(rb.schema.get_field_index("event_time"), "event_time", t)


def _rows(ws) -> list[tuple[int, int]]:
    return [(w.start, len(w.batch)) for w in ws]


def _counts(ws) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in ws:
        for k, v in w.rejected_counts.items():
            out[k] = out.get(k, 0) + v
    return out


# --- every source is a Source -------------------------------------------------------------------


def test_every_built_in_kind_is_registered_and_its_class_is_a_source_that_opens_from_a_spec():
    assert set(BUILT_IN) <= set(registry.SOURCES)
    for kind in BUILT_IN:
        cls = registry.source_class(kind)
        assert issubclass(cls, Source), kind
        assert cls.from_spec.__func__ is not Source.from_spec.__func__, f"{kind} does not implement from_spec"
        assert issubclass(cls, LiveSource) == (kind == "kafka"), kind


def _ml100k(d: Path) -> Path:
    """A two-rating dataset in GroupLens's ml-100k layout."""
    d.mkdir()
    (d / "u.data").write_text("2\t1\t5\t881250949\n1\t2\t3\t881250000\n")
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = "|".join(["0"] * 18 + ["1"])
    (d / "u.item").write_text(f"1|A (1995)|01-Jan-1995||u|{flags}\n2|B (1996)|01-Jan-1996||u|{flags}\n")
    return d


def test_every_built_in_source_opens_through_open_source_as_a_source(tmp_path):
    from dimstream.stream.sources.avazu import CATEGORICAL

    (tmp_path / "files").mkdir()
    pq.write_table(pa.Table.from_batches([tiny_batch(30)]), tmp_path / "files" / "a.parquet")
    (tmp_path / "day.tsv").write_text("\t".join(["1"] + ["3"] * 13 + ["0a"] * 26) + "\n")
    (tmp_path / "train.csv").write_text(
        "id,click,hour," + ",".join(CATEGORICAL) + "\n" + "1,0,14102100," + ",".join(["x"] * len(CATEGORICAL)) + "\n"
    )
    opts = SourceOptions(schema_config=tiny_schema().to_dict(), rows_per_window=100)
    specs = {
        "synthetic": 100,
        f"files:{tmp_path / 'files'}": 30,
        f"ml-100k:{_ml100k(tmp_path / 'ml')}": 2,
        f"criteo:{tmp_path / 'day.tsv'}": 1,
        f"avazu:{tmp_path / 'train.csv'}": 1,
    }
    for spec, rows in specs.items():
        src = open_source(spec, opts)
        assert isinstance(src, Source) and not isinstance(src, LiveSource), spec
        first = next(iter(src.read(None)))
        assert first.batch.num_rows == rows, spec
        assert len(Decoder(src.schema).decode(first.batch).batch) == rows, spec
        assert (src.truth() is not None) == (spec == "synthetic"), spec
        src.close()
    kafka = open_source("kafka://127.0.0.1:1/clicks?group=g", opts)  # nothing connects before read
    assert isinstance(kafka, LiveSource) and kafka.group == "g" and kafka.schema == tiny_schema()
    assert kafka.truth() is None and kafka.default_window_seconds is None


def test_synthetic_from_spec_builds_what_the_daemon_built_bit_for_bit():
    def same(a: pa.Table, b: pa.Table) -> bool:
        return a.column_names == b.column_names and all(
            np.array_equal(x.to_numpy(), y.to_numpy(), equal_nan=True) if pa.types.is_floating(x.type) else x.equals(y)
            for x, y in zip(a.columns, b.columns)
        )

    opened = open_source("synthetic", SourceOptions(seed=7, rows_per_window=3000))
    built = SyntheticSource(seed=7, rows_per_window=3000, window_seconds=3600)
    assert (opened.seed, opened.rows_per_window, opened.window_seconds) == (7, 3000, 3600)
    assert same(opened.window_table(2), built.window_table(2))
    other = open_source("synthetic", SourceOptions(seed=7, rows_per_window=3000, window_seconds=600))
    t = other.window_table(1).column("event_time").to_numpy()
    assert other.default_window_seconds == 600 and T0 + 600 <= t.min() and t.max() < T0 + 1200
    assert opened.truth() == {"field_rank": opened.field_rank} and opened.truth()["field_rank"]["noise_flag"] == 0
    assert open_source("synthetic").rows_per_window == 50_000  # no options: the daemon's defaults


# --- is_before: row, file and offset positions, and a shape of a source's own -------------------


def test_row_positions_compare_by_row_and_other_shapes_must_be_declared():
    src = SyntheticSource(rows_per_window=10)
    assert src.is_before({"row": 3}, {"row": 5}) and not src.is_before({"row": 5}, {"row": 5})
    assert not src.is_before({"row": 3}, None) and not src.is_before({"row": 3}, {})
    with pytest.raises(TypeError, match="override"):
        src.is_before({"seq": 3}, {"seq": 5})  # a shape the default does not know: no silent False


def test_kafka_positions_compare_per_partition_missing_partitions_were_not_read():
    src = KafkaSource("127.0.0.1:1", "t", tiny_schema(), positions=False)
    limit = {"offsets": {"0": 10, "1": 4}}
    assert src.is_before({"offsets": {"0": 9}}, limit)
    assert not src.is_before({"offsets": {"0": 10}}, limit)
    assert not src.is_before({"offsets": {"2": 0}}, limit)  # partition 2 not in the limit: -1
    assert src.is_before({"offsets": {"1": 3, "0": 12}}, limit)  # any partition before its limit
    assert not src.is_before({"offsets": {"0": 0}}, None) and not src.is_before({"offsets": {"0": 0}}, {"row": 5})


def _straddling():
    # batch i covers [2400 i, 2400 i + 2352]: batch 1 straddles the 3600 s window boundary
    return [_timed(tiny_batch(50, i), 2400 * i) for i in range(4)]


def test_a_source_with_its_own_position_shape_resumes_replaying_not_rejecting_rows():
    """After a restart at window 0's checkpoint, batch 1 is read again; its rows before the
    watermark were trained before the crash: they must count as replayed. The hard-coded
    row/offsets comparison took them for late rows and dead-lettered them."""
    batches = _straddling()
    late = _timed(tiny_batch(10, 9), 100, step=1)  # rows of window 0, first read after the restart
    src = SeqSource(batches[:3] + [late] + batches[3:])
    full = list(Windower(src, Decoder(src.schema), 3600).windows())
    first = full[0]
    assert (first.resume, first.read_upto) == ({"seq": 101}, {"seq": 102})
    again = list(
        Windower(
            src, Decoder(src.schema), 3600, start=first.resume, watermark=first.end, read_upto=first.read_upto
        ).windows()
    )
    before_boundary = int((np.arange(50) * 48 + 2400 < 3600).sum())
    assert before_boundary == 25
    assert sum(w.replayed_rows for w in again) == 25
    assert _counts(again) == {"late": 10} == _counts(full)  # only the truly late rows
    assert _rows(again) == _rows(full[1:]) == [(3600, 75), (7200, 50)]
    assert again[0].resume == {"seq": 104} and again[-1].resume == {"seq": 105}


def test_windower_refuses_a_source_that_does_not_declare_the_contract():
    class Duck:
        name, schema = "duck", tiny_schema()

        def read(self, position):
            return iter(())

    with pytest.raises(TypeError, match="not a dimstream.stream.sources.base.Source"):
        Windower(Duck(), Decoder(tiny_schema()), 3600)


def test_the_window_loop_knows_no_position_shape():
    for path in ("stream/window.py", "stream/sources/base.py"):
        assert "getattr(" not in (REPO / path).read_text(), path
    window = (REPO / "stream/window.py").read_text()
    assert not re.search(r"""["'](row|offsets|file|seq)["']""", window)


# --- LiveSource: Kafka's status -----------------------------------------------------------------


def test_kafka_status_reports_up_lag_last_message_and_handed_over_rows_without_the_broker():
    src = KafkaSource("127.0.0.1:1", "t", tiny_schema(), positions=False)
    assert src.status() == SourceStatus(up=False, lag={}, last_message_time=None, handed_over_rows=0)  # never polled
    src._poll_ok = True  # a poll succeeded, no probe yet
    src.lag, src.last_message_time, src.handed_over_rows = {"0": 3, "1": 0}, 1234.5, 7
    status = src.status()
    assert status == SourceStatus(up=True, lag={"0": 3, "1": 0}, last_message_time=1234.5, handed_over_rows=7)
    src.lag = {"0": 1}  # the reader replaces lag: a status already taken keeps what it read
    assert status.lag == {"0": 3, "1": 0} and src.status().lag == {"0": 1}
    src._liveness = Liveness("127.0.0.1:1", {})  # the probe thread's verdict wins over the last poll
    src._liveness.up = False
    assert src.status().up is False and src.kafka_up is False


def test_kafka_status_up_comes_from_the_liveness_probe():
    from dimstream.stream.kafka.tansu import Broker, free_port

    dead = Liveness(f"127.0.0.1:{free_port()}", {}, interval=0.1, timeout=0.5)
    dead.start()
    broker = Broker()
    try:
        live = Liveness(broker.bootstrap, {}, interval=0.1, timeout=2.0)
        live.start()
        deadline = time.monotonic() + 10
        while (dead.up is None or live.up is None) and time.monotonic() < deadline:
            time.sleep(0.05)
        src = KafkaSource(broker.bootstrap, "t", tiny_schema(), positions=False)
        src._poll_ok, src._liveness = True, live
        assert src.status().up is True
        src._liveness = dead
        assert src.status().up is False
        live.stop()
    finally:
        dead.stop()
        broker.stop()


def test_kafka_read_upto_and_resume_positions_merge_every_partition_read():
    src = KafkaSource("127.0.0.1:1", "t", tiny_schema(), positions=False)
    src._next = {"0": 5}  # partition 0 read up to offset 5 since the checkpoint
    last = SourceBatch(None, {"offsets": {"0": 4}}, {"offsets": {"0": 5}})
    assert src.read_upto_position(last, {"offsets": {"1": 3}}) == {"offsets": {"0": 5, "1": 3}}
    assert src.read_upto_position(None, None) == {"offsets": {"0": 5}}
    unfinished = [SourceBatch(None, {"offsets": {"0": 2}}, {"offsets": {"0": 3}})]
    assert src.resume_position(unfinished, last, {"offsets": {"1": 1}})["offsets"] == {"0": 2, "1": 1}


# --- the registry --------------------------------------------------------------------------------


def test_unknown_kinds_get_one_line_naming_the_registered_kinds():
    with pytest.raises(ValueError) as e:
        open_source("parquet:/x")
    assert str(e.value) == (
        "unknown source kind 'parquet' in 'parquet:/x': the kinds are "
        "avazu, clothing, criteo, files, kafka, ml-100k, synthetic"
    )
    for spec in ("nonsense", "", "Synthetic"):
        with pytest.raises(ValueError, match="unknown source kind"):
            open_source(spec)


def test_bad_arguments_keep_their_messages(tmp_path):
    cases = {
        "files:": "files:DIR needs a directory",
        f"files:{tmp_path}/nope": f"{tmp_path}/nope is not a directory",
        f"criteo:{tmp_path}": f"{tmp_path} is not a file",
        "avazu:": "avazu:FILE needs a file",
        f"ml-100k:{tmp_path}/x": f"{tmp_path}/x is not a directory",
        "synthetic:3": "synthetic takes no argument",
        "kafka://nohost": "bad Kafka URL",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError) as e:
            open_source(spec, SourceOptions(schema_config=tiny_schema().to_dict()))
        assert message in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
    with pytest.raises(ValueError, match=r"\[schema\] table"):  # files: without a declared schema
        open_source(f"files:{tmp_path}")


@pytest.fixture
def sources(monkeypatch):
    """The registry, restored after the test."""
    monkeypatch.setattr(registry, "SOURCES", dict(registry.SOURCES))
    return registry.SOURCES


@pytest.mark.parametrize("target", [SeqSource, f"{SeqSource.__module__}:SeqSource"])
def test_a_plug_in_source_registered_here_opens_and_resumes_through_open_source(sources, target):
    register_source("seq", target)
    src = open_source("seq:4")
    assert type(src) is SeqSource and len(src.batches) == 4
    first = next(iter(Windower(src, Decoder(src.schema), 3600).windows()))
    again = list(
        Windower(
            open_source("seq:4"),
            Decoder(src.schema),
            3600,
            start=first.resume,
            watermark=first.end,
            read_upto=first.read_upto,
        ).windows()
    )
    assert sum(w.replayed_rows for w in again) == 25 and not _counts(again)
    assert "seq" in str(pytest.raises(ValueError, open_source, "nope").value)  # listed with the rest


def test_registration_refuses_bad_kinds_targets_and_silent_replacement(sources):
    for kind in ("", "a:b", "a/b", "Upper"):
        with pytest.raises(ValueError, match="bad source kind"):
            register_source(kind, SeqSource)
    with pytest.raises(ValueError, match="module:Class"):
        register_source("seq", "no_class_here")
    with pytest.raises(TypeError):
        register_source("seq", dict)
    with pytest.raises(ValueError, match="already registered"):
        register_source("files", SeqSource)
    assert sources["files"] == "dimstream.stream.sources.files:FilesSource"
    register_source("files", SeqSource, replace=True)
    assert type(open_source("files:2")) is SeqSource
    register_source("notsource", "dimstream.stream.schema:Schema")
    with pytest.raises(TypeError, match="not a Source subclass"):
        open_source("notsource:x")
