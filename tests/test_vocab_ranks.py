"""Managed vocabularies over ranks: torchrun with 2 real processes (gloo, CPU) against one process.

Every training step admits from the union of the ranks' ids (models/vocab.py `gather_step_ids`),
so both ranks hold one mapping, and it is the mapping one process makes from the same rows. The
worker is tests/vocab_ranks_worker.py: two managed fields (LFU; LRU with admit_after = 2) on an
id-churning stream, one arm planned table-wise and one column-wise (the managed tables split in
4-column shards over both ranks, so an evicted row is re-drawn in two shards)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import vocab_ranks_worker as worker
from tests.test_distributed import BIN, torchrun

SENTINEL = 2**63 - 1
pytestmark = pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun not installed in .venv")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{1: [rank 0's report], 2: [rank 0's, rank 1's]}: the worker in this process, then under
    torchrun on 2 ranks."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    worker.main([str(one)])
    torchrun(2, worker.__file__, two)
    read = lambda d, r: json.loads((d / f"rank{r}.json").read_text())  # noqa: E731
    return {1: [read(one, 0)], 2: [read(two, 0), read(two, 1)]}


def test_the_column_wise_plan_splits_the_managed_tables_over_both_ranks(runs):
    r0 = runs[2][0]
    assert r0["world_size"] == 2
    for table in ("emb_user", "emb_item"):
        kind, shards = r0["plan"]["cw"][table]
        assert kind == "column_wise" and sorted(rank for rank, _ in shards) == [0, 1], shards
        assert r0["plan"]["tw"][table][0] == "table_wise"


def test_two_ranks_hold_one_mapping_which_is_the_one_process_mapping(runs):
    (one,), (r0, r1) = runs[1], runs[2]
    for arm in worker.PLANS:
        for field in worker.SCHEMA.managed:
            a, b, ref = (r["vocab"][arm][field] for r in (r0, r1, one))
            assert a == b, (arm, field)  # ids, rows, counts / last access, step, sketch
            assert a == ref, (arm, field)
            raw = np.array(a["mch._mch_sorted_raw_ids"], dtype=np.int64)
            rows = np.array(a["mch._mch_remapped_ids_mapping"])[raw != SENTINEL]
            assert len(rows) == len(set(rows.tolist())) > 0, "two live ids share a row"
            assert (rows < worker.SCHEMA.num_embeddings[field] - 1).all()  # never the default row
        # the churn made the policies evict (so rows were re-drawn), the same on both ranks
        evictions = [w["item"]["evictions"] for w in r0["stats"][arm]]
        assert sum(evictions) > 10 and evictions == [w["item"]["evictions"] for w in one["stats"][arm]]
        assert sum(w["user"]["evictions"] for w in r0["stats"][arm]) > 0


def test_two_ranks_predict_and_redraw_rows_as_one_process(runs):
    (one,), (r0, r1) = runs[1], runs[2]
    for arm in worker.PLANS:
        np.testing.assert_allclose(r0["predictions"][arm], one["predictions"][arm], atol=1e-5, rtol=0, err_msg=arm)
        assert r0["predictions"][arm] == r1["predictions"][arm]
        # the managed fields' tables, gathered whole: the evicted rows' re-draws and the trained
        # rows alike, whichever rank's shard holds their columns
        for table, full in one["tables"][arm].items():
            np.testing.assert_allclose(r0["tables"][arm][table], full, atol=1e-5, rtol=0, err_msg=f"{arm} {table}")
