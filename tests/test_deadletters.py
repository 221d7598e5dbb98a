"""Dead letters at once: written, counted and warned about when rows are rejected, not at a
window close that may never come; a stream in which nothing decodes still closes windows."""

import logging
import threading
import time

import pyarrow as pa

from dimstream.models.config import ModelConfig
from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner, make_arm
from dimstream.ops.daemon import initial_specs as specs
from dimstream.ops.history import read_log
from dimstream.stream import deadletter
from dimstream.stream.decode import Decoder
from dimstream.stream.sources.base import Source, SourceBatch
from dimstream.stream.window import Windower, WindowObserver
from tests.helpers import tiny_batch, tiny_schema


def _unlabelled(n: int, seed: int) -> pa.RecordBatch:
    b = tiny_batch(n, seed)
    return b.set_column(b.schema.get_field_index("label"), "label", pa.nulls(n, pa.int8()))


class BadThenQuiet(Source):
    """`bad` batches whose labels are all null, then heartbeats until the test says stop."""

    name = "bad-then-quiet"

    def __init__(self, bad: int = 3, rows: int = 200):
        self.schema = tiny_schema()
        self.bad, self.rows = bad, rows
        self.done = threading.Event()

    def read(self, position):
        start = (position or {"row": 0})["row"]
        for i in range(start, self.bad):
            yield SourceBatch(_unlabelled(self.rows, i), {"row": i}, {"row": i + 1})
        while not self.done.is_set():
            yield SourceBatch(None, {"row": self.bad}, {"row": self.bad})  # heartbeat
            time.sleep(0.05)


class Seen(WindowObserver):
    def __init__(self):
        self.read_rows, self.rejected_rows = 0, 0

    def read(self, rows):
        self.read_rows += rows

    def rejected(self, rejected, rows):
        self.rejected_rows += rows


def test_a_stream_in_which_nothing_decodes_closes_an_empty_window_on_idle_timeout():
    src, seen = BadThenQuiet(), Seen()
    windows = Windower(src, Decoder(src.schema), 3600, idle_timeout=0.3, observer=seen).windows()
    w = next(windows)
    src.done.set()
    assert len(w.batch) == 0 and w.rejected_counts == {"null_label": 600} and w.rows_read == 600
    assert seen.read_rows == 600 and seen.rejected_rows == 600  # told before the window closed
    assert w.resume == {"row": 3}  # the rejected input is behind the resume point


def _runner(tmp_path, **kw):
    cfg = RunConfig(
        state_dir=tmp_path,
        windows=1,
        metrics_addr="127.0.0.1:0",
        progress=False,
        control_dim=4,
        model=ModelConfig("fm"),
        **({"arms": ("control",)} | kw),
    )
    cfg.model.interaction_dim = cfg.control_dim
    src = BadThenQuiet()
    arms = [make_arm(s, src.schema, cfg.model) for s in specs(cfg, src.schema.feature_names)]
    return Runner(cfg, src, arms), src


def test_rejected_rows_are_on_metrics_and_on_disk_before_any_window_closes(tmp_path, caplog):
    runner, src = _runner(tmp_path)  # no idle timeout: the window never closes
    thread = threading.Thread(target=runner.run, daemon=True)
    with caplog.at_level(logging.WARNING, logger="dimstream"):
        thread.start()
        deadline = time.time() + 60
        reg = runner.metrics.registry
        while (reg.get_sample_value("dimstream_rows_rejected_total", {"reason": "null_label"}) or 0) < 600:
            assert time.time() < deadline and thread.is_alive()
            time.sleep(0.05)
        assert reg.get_sample_value("dimstream_windows_closed_total") == 0
        assert reg.get_sample_value("dimstream_rows_consumed_total") == 600
        assert reg.get_sample_value("dimstream_rows_rejected_recent_ratio") == 1.0
        open_file = tmp_path / "deadletter" / deadletter.OPEN_FILE
        with pa.OSFile(str(open_file), "rb") as f:
            assert pa.ipc.open_stream(f).read_all().column("reason").to_pylist() == ["null_label"] * 600
        runner.stop_requested = True
        src.done.set()
        thread.join(60)
    warnings = [r.getMessage() for r in caplog.records if "rows were rejected" in r.getMessage()]
    # once (then at most every 30 s), as soon as the first 200 rows were all rejected
    assert len(warnings) == 1 and "200 of the last 200 rows were rejected; top reason null_label" in warnings[0]
    assert not read_log(tmp_path)  # nothing was closed, nothing recorded


def test_a_window_without_a_single_accepted_row_is_recorded_as_such(tmp_path):
    runner, src = _runner(tmp_path, idle_timeout=0.3)
    summary = runner.run()
    src.done.set()
    (record,) = read_log(tmp_path)
    assert record["rows"] == 0 and record["rejected"] == {"null_label": 600}
    assert summary["totals"]["rejected"] == {"null_label": 600}
    rotated = deadletter.read(tmp_path / "deadletter" / "window-000000.arrow")
    assert rotated.num_rows == 600 and not (tmp_path / "deadletter" / deadletter.OPEN_FILE).exists()
