"""Stream-long row counts for AutoSrh's tiers (search/counts.py): the count-min sketch's bound on
a Zipf stream, managed rows counted through the vocabulary, and the counts checkpointed by the
daemon and resumed exactly."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.search.counts import CountMinSketch, StreamCounts
from dimstream.stream.decode import Decoder
from dimstream.stream.schema import FieldSpec, Schema


def _zipf(n, vocab, a=1.2, seed=0):
    g = np.random.default_rng(seed)
    ids = g.zipf(a, n)
    return (ids[ids <= vocab] - 1).astype(np.int64)


def test_the_sketch_never_undercounts_and_stays_within_eps_n_on_a_zipf_stream():
    """Cormode & Muthukrishnan, Theorem 1: est >= true always, and est <= true + eps N (eps =
    e / w) for each id with probability >= 1 - delta (delta = e^-k)."""
    ids = _zipf(400_000, 200_000)
    s = CountMinSketch(width=2048, depth=4)
    for part in np.array_split(ids, 7):  # counted in batches, as windows arrive
        s.add(part)
    true = np.bincount(ids)
    seen = np.flatnonzero(true)
    est = s.estimate(seen)
    assert s.total == len(ids) and math.isclose(s.eps, math.e / 2048) and math.isclose(s.delta, math.exp(-4))
    assert np.all(est >= true[seen])
    over = est - true[seen] > s.eps * s.total
    assert over.mean() <= s.delta, (over.mean(), s.delta)
    assert np.any(est > true[seen])  # a sketch this narrow does collide: the test can see errors
    # the head of the stream is ranked where it belongs: the 20 most frequent ids' estimates are
    # the 20 largest of all
    top = seen[np.argsort(-true[seen], kind="stable")[:20]]
    assert set(seen[np.argsort(-est, kind="stable")[:20]]) == set(top)


def test_stream_counts_are_exact_up_to_the_threshold_and_sketched_above():
    big, small = _zipf(50_000, 5000, seed=1), _zipf(50_000, 300, seed=2)
    c = StreamCounts({"big": 5000, "small": 300}, sketch_above=1000, width=4096, depth=4)
    for a, b in zip(np.array_split(big, 3), np.array_split(small, 3)):
        c.add({"big": a, "small": b})
    assert c.kind("small") == "exact" and c.kind("big") == "sketch" and c.windows == 3
    got = c.counts()
    np.testing.assert_array_equal(got["small"], np.bincount(small, minlength=300))
    true = np.bincount(big, minlength=5000)
    assert got["big"].shape == (5000,) and np.all(got["big"] >= true)
    back = StreamCounts.from_state(c.state_dict())
    for f in ("big", "small"):
        np.testing.assert_array_equal(back.counts()[f], got[f])
    with pytest.raises(ValueError, match="decay"):
        StreamCounts({"a": 3}, decay=0)


def test_a_decay_weighs_older_windows_down():
    c = StreamCounts({"a": 3}, decay=0.5)
    c.add({"a": np.array([0] * 8)})
    c.add({"a": np.array([1] * 8)})
    assert c.counts()["a"].tolist() == [4, 8, 0]


def test_a_managed_field_counts_its_mapped_rows_and_forgets_a_row_that_changed_owner():
    from dimstream.ops.searching import looked_up_rows

    schema = Schema(
        [FieldSpec("user", "categorical", 1, vocab="managed", capacity=4), FieldSpec("item", "categorical", 8)]
    )
    cfg = ModelConfig("fm", batch_size=64)
    spec = ArmSpec("control", {"user": 4, "item": 4})
    arm = Arm(spec, schema.num_embeddings, schema.multi_valued, cfg, managed=schema.managed)
    dec = Decoder(schema)

    def batch(users):
        n = len(users)
        rb = pa.record_batch(
            {
                "user": pa.array(users),
                "item": pa.array(np.arange(n) % 8),
                "label": pa.array(np.zeros(n, np.int8)),
                "event_time": pa.array(np.arange(n)),
            }
        )
        return dec.decode(rb).batch

    counts = StreamCounts(schema.num_embeddings)
    owners = {}
    first = batch([11, 11, 11, 12, 13])
    arm.train_step(first)  # admits 11, 12, 13 into rows 0..2 (row 3 is the default row)
    rows = looked_up_rows(arm, first, owners, counts)
    mapping = dict(zip([11, 11, 11, 12, 13], rows["user"].tolist()))  # the raw ids are hashed: by position
    assert len(set(mapping.values())) == 3 and 3 not in mapping.values()
    counts.add(rows)
    got = counts.counts()["user"]
    assert sorted(got.tolist()) == [0, 1, 1, 3] and got[3] == 0
    np.testing.assert_array_equal(counts.counts()["item"], np.bincount(first.values["item"], minlength=8))
    # 14 evicts the least frequent live id (12 or 13): its row's count starts again from 14's
    second = batch([14, 14, 14, 14, 11])
    arm.train_step(second)
    rows = looked_up_rows(arm, second, owners, counts)
    counts.add(rows)
    row14 = int(rows["user"][0])
    assert row14 in (mapping[12], mapping[13]) and int(rows["user"][4]) == mapping[11]
    got = counts.counts()["user"]
    assert got[row14] == 4 and got[mapping[11]] == 4


def _run(state, windows, tiers=2, search_every=0):
    from dimstream.ops.config import RunConfig
    from dimstream.ops.daemon import Runner

    cfg = RunConfig(
        source="synthetic",
        rows_per_window=1500,
        windows=windows,
        arms=("control", "slim"),
        search="autosrh",
        tiers=tiers,
        search_every=search_every,
        search_rows=1000,
        metrics_addr="127.0.0.1:0",
        progress=False,
        state_dir=state,
        model=ModelConfig("fm"),
    )
    runner = Runner.from_config(cfg)
    runner.run()
    return runner


def _checkpointed_counts(state):
    from dimstream.ops import checkpoint

    extra = checkpoint.load_arms(checkpoint.latest(state), ["control"]).extra
    return StreamCounts.from_state(extra["counts"])


def test_the_daemons_counts_survive_a_restart_equal_to_an_uninterrupted_run_and_to_the_stream(tmp_path):
    """--tiers 2: three windows in one run, or two then a restart and a third: the checkpointed
    counts are the same, and they are the exact bincount of the three windows' rows."""
    from dimstream.stream.synthetic import SyntheticSource

    whole = _run(tmp_path / "whole", 3)
    _run(tmp_path / "split", 2)
    assert _checkpointed_counts(tmp_path / "split").windows == 2
    resumed = _run(tmp_path / "split", 3)
    a, b = _checkpointed_counts(tmp_path / "whole"), _checkpointed_counts(tmp_path / "split")
    assert a.windows == b.windows == 3
    src = SyntheticSource(seed=0, rows_per_window=1500)
    dec = Decoder(src.schema)
    batches = [dec.decode(src.window_table(w)).batch for w in range(3)]
    for f, n in src.schema.num_embeddings.items():
        want = sum(np.bincount(x.values[f], minlength=n) for x in batches)
        np.testing.assert_array_equal(a.counts()[f], want, err_msg=f)
        np.testing.assert_array_equal(b.counts()[f], want, err_msg=f)
    for r in (whole, resumed):  # the live counts are the checkpointed ones
        np.testing.assert_array_equal(r.search.counts.counts()["user_id"], a.counts()["user_id"])


def test_without_tiers_the_daemon_keeps_no_counts(tmp_path):
    from dimstream.ops import checkpoint

    runner = _run(tmp_path, 1, tiers=1)
    assert runner.search.counts is None
    assert checkpoint.load_arms(checkpoint.latest(tmp_path), ["control"]).extra == {}


def test_a_checkpoint_written_without_extra_reads_as_empty(tmp_path):
    """Older checkpoints (no extra) restore as before."""
    from dimstream.ops import checkpoint
    from tests.helpers import tiny_schema

    schema = tiny_schema()
    cfg = ModelConfig("fm", batch_size=32)
    arm = Arm(ArmSpec("control", {"user": 4, "item": 4, "tags": 4, "price": 4}), schema.num_embeddings, {"tags"}, cfg)
    meta = {"schema": schema.to_dict(), "model": cfg.to_dict(), "arms": [arm.spec.to_dict()]}
    ckpt = checkpoint.save(tmp_path, 0, meta, [arm])
    assert checkpoint.load_arms(ckpt).extra == {}
    ckpt = checkpoint.save(tmp_path, 1, meta, [arm], extra={"counts": {"x": torch.arange(3)}})
    assert checkpoint.load_arms(ckpt).extra["counts"]["x"].tolist() == [0, 1, 2]
