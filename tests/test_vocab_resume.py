"""A managed vocabulary survives a real SIGKILL: `dimstream run` (a subprocess) on a files
source whose ids churn is killed mid-run, restarted on the same state dir, and ends with the
mapping (sorted raw ids, rows, LRU last access / LFU counts, step counter, admission sketch)
of an uninterrupted run of the same windows. Under torchrun on 2 ranks (rank 1 SIGKILLed, the
world restarted) the daemon ends with that same mapping, and its model predicts as the
one-process model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dimstream.models.vocab import vocabs_of
from dimstream.ops import checkpoint
from dimstream.ops.history import read_log
from dimstream.stream.decode import Decoder
from tests.helpers import REPO, kill_rank_1_after_two_windows
from tests.test_distributed import BIN, _port

WINDOWS, ROWS = 8, 3000
SCHEMA = """
[[schema.fields]]
name = "user"
kind = "categorical"
num_embeddings = 1
vocab = "managed"
capacity = 96
eviction = "lru"
admit_after = 2

[[schema.fields]]
name = "item"
kind = "categorical"
num_embeddings = 1
vocab = "managed"
capacity = 64
id_type = "str"

[[schema.fields]]
name = "ad"
kind = "categorical"
num_embeddings = 32
"""


def _data(d):
    """One file per hour: users from a range that moves by 30 ids a window, items by 10."""
    d.mkdir()
    for w in range(WINDOWS):
        rng = np.random.default_rng(w)
        t = pa.table(
            {
                "user": pa.array(rng.integers(30 * w + 1, 30 * w + 151, ROWS)),
                "item": pa.array([f"i{k}" for k in rng.integers(10 * w, 10 * w + 90, ROWS)]),
                "ad": pa.array(rng.integers(0, 20, ROWS)),
                "label": pa.array((rng.random(ROWS) < 0.3).astype(np.int8)),
                "event_time": pa.array(3600 * w + np.sort(rng.integers(0, 3600, ROWS))),
            }
        )
        pq.write_table(t, d / f"part-{w:02d}.parquet")


def _cmd(tmp, state) -> list[str]:
    (tmp / "run.toml").write_text(SCHEMA)
    args = ["run", "--config", str(tmp / "run.toml"), "--source", f"files:{tmp / 'data'}", "--windows", str(WINDOWS)]
    args += ["--arms", "control", "--model", "fm", "--metrics-addr", "127.0.0.1:0", "--no-progress"]
    return [sys.executable, "-m", "dimstream.ops.cli", *args, "--state-dir", str(state)]


def _run(cmd, log):
    with open(log, "w") as err:
        r = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, timeout=300, env=_env())
    assert r.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def _env():
    return os.environ | {"OMP_NUM_THREADS": "1"}


def _vocab_state(state) -> dict[str, dict[str, torch.Tensor]]:
    arm = checkpoint.load_arms(checkpoint.latest(state)).arms["control"]
    return {f: v.state_dict() for f, v in vocabs_of(arm).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The data dir's parent and the state dir of an uninterrupted one-process run."""
    tmp = tmp_path_factory.mktemp("vocab-resume")
    _data(tmp / "data")
    _run(_cmd(tmp, tmp / "reference"), tmp / "reference.log")
    return tmp, tmp / "reference"


def _same_mapping(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() == {"user", "item"}
    for field in want:
        assert got[field].keys() == want[field].keys()
        for k, t in want[field].items():
            assert torch.equal(got[field][k], t), (field, k)


def test_sigkill_mid_run_then_resume_ends_with_the_uninterrupted_mapping(reference):
    tmp_path, ref = reference
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as err:
        p = subprocess.Popen(_cmd(tmp_path, killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=_env())
        try:
            latest, deadline = killed / "checkpoints" / "LATEST", time.monotonic() + 120
            while not (latest.exists() and latest.read_text() >= "ckpt-000001"):  # two windows done
                assert p.poll() is None and time.monotonic() < deadline, "the run ended or stalled before window 2"
                time.sleep(0.05)
            os.kill(p.pid, signal.SIGKILL)
            assert p.wait(timeout=30) == -signal.SIGKILL
        finally:
            if p.poll() is None:
                p.kill()
    last = (killed / "checkpoints" / "LATEST").read_text()
    assert "ckpt-000001" <= last < f"ckpt-{WINDOWS - 1:06d}", last  # killed mid-run, not after the last window
    text = _run(_cmd(tmp_path, killed), tmp_path / "resumed.log")
    assert "resumed from ckpt-" in text, text[-3000:]
    assert [w["index"] for w in read_log(killed)] == list(range(WINDOWS))  # each window once
    want = _vocab_state(ref)
    _same_mapping(_vocab_state(killed), want)
    # the churn filled both tables; LRU evicted every id of window 0, LFU kept its early,
    # frequent ids (their counts, compared above, grew on)
    for field, cap in (("user", 96), ("item", 64)):
        assert len(_live(want, field)) == cap - 1
    assert not _live(want, "user") & set(_first_window_ids(tmp_path, "user"))
    assert want["item"]["mch._mch_counts"][:-1].sum() > ROWS  # more than window 0's lookups


def _live(state, field) -> set[int]:
    raw = state[field]["mch._mch_sorted_raw_ids"]
    return set(raw[raw != torch.iinfo(torch.int64).max].tolist())


def _first_window_ids(tmp, field) -> list[int]:
    """The raw ids of window 0's rows of `field`."""
    from dimstream.stream.decode import raw_ids

    return raw_ids(pq.read_table(tmp / "data" / "part-00.parquet").column(field).combine_chunks(), field).tolist()


def test_two_ranks_with_rank_1_sigkilled_end_with_the_one_process_mapping_and_model(reference):
    """Each step's admission sees both ranks' rows (models/vocab.py): the union is the step of one
    process, so the mapping is its mapping, through a restart of the world from a checkpoint."""
    tmp_path, ref = reference
    state = tmp_path / "two"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--max-restarts", "1", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_port()), "--no-python", str(BIN / "dimstream"), *_cmd(tmp_path, state)[3:]]
    kill_rank_1_after_two_windows(cmd, state, tmp_path / "two.log", _env())
    assert [w["index"] for w in read_log(state)] == list(range(WINDOWS))
    _same_mapping(_vocab_state(state), _vocab_state(ref))
    two, one = (checkpoint.load_arms(checkpoint.latest(s)) for s in (state, ref))
    batch = Decoder(one.schema).decode(pq.read_table(tmp_path / "data" / f"part-{WINDOWS - 1:02d}.parquet")).batch
    np.testing.assert_allclose(two.arms["control"].predict(batch), one.arms["control"].predict(batch), atol=1e-5)
