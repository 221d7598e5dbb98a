"""The append-only history log: exactly once across crashes, bounded summary and checkpoint."""

import json
import shutil

from dimstream.models.config import ModelConfig
from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner
from dimstream.ops.history import LOG_FILE, RECENT, History, read_log


def _record(i):
    return {"index": i, "rows": 10 + i, "rejected_rows": 1, "rejected": {"late": 1}, "arms": {}}


def test_resume_cuts_records_the_checkpoint_does_not_name(tmp_path):
    h = History(tmp_path)
    for i in range(5):
        h.append(_record(i))
    h = History(tmp_path)
    h.resume(3, _record(2))  # the checkpoint of window 2 is the newest that landed
    assert [r["index"] for r in read_log(tmp_path)] == [0, 1, 2]
    assert len(h) == 3 and h.totals["rows"] == 10 + 11 + 12 and h.totals["rejected"] == {"late": 3}
    h.append(_record(3))
    assert [r["index"] for r in read_log(tmp_path)] == [0, 1, 2, 3]


def test_resume_re_appends_the_record_of_a_checkpoint_that_landed_before_its_log_line(tmp_path):
    h = History(tmp_path)
    h.append(_record(0))
    History(tmp_path).resume(2, _record(1))  # killed between checkpoint 1 and its log line
    assert [r["index"] for r in read_log(tmp_path)] == [0, 1]


def test_a_torn_last_line_is_skipped_and_cut(tmp_path):
    h = History(tmp_path)
    h.append(_record(0))
    with open(tmp_path / LOG_FILE, "ab") as f:
        f.write(b'{"index": 1, "ro')  # killed mid-write
    assert [r["index"] for r in read_log(tmp_path)] == [0]
    History(tmp_path).resume(1, _record(0))
    assert (tmp_path / LOG_FILE).read_bytes().count(b"\n") == 1


def test_the_summary_keeps_a_recent_span_and_totals(tmp_path):
    h = History(tmp_path)
    for i in range(RECENT + 5):
        h.append(_record(i))
    assert len(h.recent) == RECENT and h.recent[0]["index"] == 5
    assert h.totals["windows"] == RECENT + 5 and len(read_log(tmp_path)) == RECENT + 5


def _cfg(state, windows):
    return RunConfig(
        arms=("control",),
        windows=windows,
        rows_per_window=1000,
        state_dir=state,
        metrics_addr="127.0.0.1:0",
        progress=False,
        control_dim=4,
        model=ModelConfig("fm"),
    )


def test_a_window_whose_checkpoint_never_landed_is_logged_once_after_the_restart(tmp_path):
    Runner.from_config(_cfg(tmp_path, 3)).run()
    ckpts = tmp_path / "checkpoints"
    # as if the process died after window 2's log line but its checkpoint never became durable
    shutil.rmtree(ckpts / "ckpt-000002")
    (ckpts / "LATEST").write_text("ckpt-000001")
    assert [r["index"] for r in read_log(tmp_path)] == [0, 1, 2]
    summary = Runner.from_config(_cfg(tmp_path, 4)).run()
    log = read_log(tmp_path)
    assert [r["index"] for r in log] == [0, 1, 2, 3]
    assert [w["index"] for w in summary["windows"]] == [0, 1, 2, 3]
    assert summary["totals"]["windows"] == 4 and summary["totals"]["rows"] == 4000


def test_the_checkpoint_holds_the_log_length_not_the_history(tmp_path):
    Runner.from_config(_cfg(tmp_path, 3)).run()
    meta = json.loads((tmp_path / "checkpoints" / "ckpt-000002" / "meta.json").read_text())
    assert meta["history_length"] == 3 and "history" not in meta
    assert meta["last_record"]["index"] == 2


def test_summary_json_joined_from_logged_records_equals_the_summary(tmp_path):
    from dimstream.ops.history import summary

    h = History(tmp_path)
    for i in range(RECENT + 3):
        h.append(_record(i) | {"reallocation": {"source": "daemon"} if i % 7 == 0 else None})
    header = {"source": "synthetic", "model": "fm", "window_seconds": 3600}
    want = summary(header, list(h.recent), h.totals, {"field_rank": {"a": 1}})
    assert json.loads(h.summary_json(header, {"field_rank": {"a": 1}})) == want
