"""Small builders shared by the tests (real TorchRec, real Arrow; no mocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from dimstream.stream.schema import FieldSpec, Schema

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k"


def tiny_schema() -> Schema:
    return Schema(
        [
            FieldSpec("user", "categorical", 50),
            FieldSpec("item", "categorical", 40),
            FieldSpec("tags", "multi", 20),
            FieldSpec("price", "numeric", 16),
        ]
    )


def tiny_batch(n: int = 64, seed: int = 0, t0: int = 0, ids: np.ndarray | None = None) -> pa.RecordBatch:
    """`n` rows of `tiny_schema`; with `ids`, also a column "row_id" the schema does not declare
    (the decoder passes it through: DIMSTREAM_TRAINED_IDS audits it)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.record_batch(
        {
            "user": pa.array(rng.integers(0, 30, n)),
            "item": pa.array(rng.integers(0, 25, n).astype(str)),
            "tags": pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, 9, offsets[-1]))),
            "price": pa.array(rng.lognormal(1, 1, n)),
            "label": pa.array((rng.random(n) < 0.3).astype(np.int8)),
            "event_time": pa.array(t0 + np.sort(rng.integers(0, 3600, n))),
        }
        | ({} if ids is None else {"row_id": pa.array(np.asarray(ids, np.int64))})
    )


def managed_files(tmp_path: Path, rows: int, capacity: int) -> tuple[Path, dict]:
    """Two hourly parquet files of `tiny_batch` rows and a [schema] whose `user` field is
    managed (`capacity` rows) and whose `item` ids are strings: (data dir, schema)."""
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    for w in range(2):
        pq.write_table(pa.Table.from_batches([tiny_batch(rows, seed=w, t0=3600 * w)]), data / f"part-{w}.parquet")
    rows_of = {"num_embeddings": capacity, "capacity": capacity}
    schema = {
        "fields": [
            {"name": "user", "kind": "categorical", "vocab": "managed", **rows_of},
            {"name": "item", "kind": "categorical", "num_embeddings": 40, "id_type": "str"},
            {"name": "tags", "kind": "multi", "num_embeddings": 20},
            {"name": "price", "kind": "numeric", "num_embeddings": 16},
        ]
    }
    return data, schema


def kafka_run_config(source, state, windows, **kw):
    """The Kafka tests' daemon: one-day windows (`window_seconds` overrides), control only
    unless `arms` says otherwise, FM, seed 0, a free metrics port, no progress bars."""
    from dimstream.models.config import ModelConfig
    from dimstream.ops.config import RunConfig

    return RunConfig(
        source=source,
        window_seconds=kw.pop("window_seconds", 86400),
        windows=windows,
        state_dir=state,
        seed=0,
        metrics_addr="127.0.0.1:0",
        progress=False,
        model=ModelConfig("fm"),
        **({"arms": ("control",)} | kw),
    )


def autosrh_run_config(state, rows_per_window, windows, search_rows, model=None, **kw):
    """The AutoSrh daemon tests' run: synthetic, control and slim, `--search autosrh`, FM, a
    free metrics port, no progress bars (`tiers` and the rest through `kw`)."""
    from dimstream.models.config import ModelConfig
    from dimstream.ops.config import RunConfig

    return RunConfig(
        source="synthetic",
        rows_per_window=rows_per_window,
        windows=windows,
        arms=("control", "slim"),
        search="autosrh",
        search_rows=search_rows,
        metrics_addr="127.0.0.1:0",
        progress=False,
        state_dir=state,
        model=model or ModelConfig("fm"),
        **kw,
    )


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of rank `rank` (its child with RANK=<rank>)."""
    for child in Path("/proc").glob("[0-9]*"):
        try:
            stat = (child / "stat").read_text()
            env = (child / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(child.name)
    return None


def _act_after_checkpoint(cmd: list[str], state: Path, index: int, log: Path, env: dict, act, wait_s: int) -> str:
    """Run `cmd` (a daemon or torchrun), call `act(process)` once window `index`'s checkpoint is
    complete, and wait up to `wait_s` for it to stop. Asserts it ended 0; returns its stderr."""
    import subprocess
    import time

    with open(log, "w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        try:
            latest = state / "checkpoints" / "LATEST"
            deadline = time.monotonic() + 150
            while not (latest.exists() and latest.read_text() >= f"ckpt-{index:06d}"):
                assert p.poll() is None and time.monotonic() < deadline, f"the run ended or stalled in window {index}"
                time.sleep(0.05)
            act(p)
            rc = p.wait(timeout=wait_s)
        finally:
            if p.poll() is None:
                p.kill()
        err.seek(0)
        text = err.read()
    assert rc == 0, text[-4000:]
    return text


def kill_rank_1_after_two_windows(cmd: list[str], state: Path, log: Path, env: dict) -> str:
    """Run torchrun `cmd` (with --max-restarts), SIGKILL rank 1 once window 1's checkpoint is
    complete (so in a later window's training or checkpoint), and wait for the restarted world
    to finish. Asserts it ended 0 and resumed from a checkpoint; returns torchrun's stderr."""
    import os
    import signal

    def kill_rank_1(p):
        victim = rank_pid(p.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)

    text = _act_after_checkpoint(cmd, state, 1, log, env, kill_rank_1, wait_s=200)
    assert "resumed from ckpt-" in text, text[-3000:]
    return text


def sigterm_after_window(cmd: list[str], state: Path, index: int, log: Path, env: dict) -> str:
    """Run `cmd` (a daemon), SIGTERM it once window `index`'s checkpoint is complete, and wait
    for it to stop. Asserts it ended 0; returns its stderr."""
    import signal

    return _act_after_checkpoint(cmd, state, index, log, env, lambda p: p.send_signal(signal.SIGTERM), wait_s=120)


def run_collecting(cfg, column: str) -> list[np.ndarray]:
    """Run the daemon on `cfg` to its end; per trained window, in order, its rows' `column`."""
    from dimstream.ops.daemon import Runner  # here: most helpers need no model stack

    runner = Runner.from_config(cfg)
    trained: list[np.ndarray] = []
    runner.observers.append(lambda r, w, rec: trained.append(w.table.column(column).to_numpy()))
    runner.run()
    return trained
