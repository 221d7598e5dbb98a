"""Run by tests/test_vocab_ranks.py under `torchrun --nproc_per_node N` (or as one process):
managed vocabularies trained over ranks, each rank writing what it holds.

    python tests/vocab_ranks_worker.py OUT

Two arms of one schema with two managed fields (user: LFU; item: LRU, admitted after 2
occurrences) and a hashed one, their tables planned table-wise ("tw") and column-wise ("cw"),
train WINDOWS windows of an id-churning stream, every rank its share of each window's rows
(row i to rank i mod N, as the daemon splits a files/synthetic source). Each rank then writes
OUT/rank<r>.json: per arm and managed field its mapping buffers (sorted raw ids, rows, counts
or last access, the step counter) and the window stats; per arm the predictions on a fixed
batch and the managed fields' whole deep and wide tables (gathered over the ranks)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from dimstream.models import distributed
from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.models.vocab import vocabs_of
from dimstream.stream.decode import Decoder
from dimstream.stream.schema import FieldSpec, Schema

# fp32: two ranks against one process is an identity bf16 holds only to its rounding (README, precision)
CFG = ModelConfig("deepfm", mlp=(8,), interaction_dim=8, batch_size=32, seed=0, precision="fp32")
WINDOWS, ROWS, BATCH = 4, 96, 32
PLANS = {"tw": ["table_wise"], "cw": ["column_wise"]}
SCHEMA = Schema(
    [
        FieldSpec("user", "categorical", 1, vocab="managed", capacity=16, eviction="lfu"),
        FieldSpec("item", "categorical", 1, vocab="managed", capacity=12, eviction="lru", admit_after=2),
        FieldSpec("ad", "categorical", 32),
    ]
)


def window(w: int, rows: int = ROWS, seed: int = 0):
    """Users from a range that moves by 8 ids a window, items by 6: old ids go quiet, new come."""
    rng = np.random.default_rng([w, seed])
    rb = pa.record_batch(
        {
            "user": pa.array(rng.integers(8 * w + 1, 8 * w + 25, rows)),
            "item": pa.array(rng.integers(6 * w + 1, 6 * w + 19, rows)),
            "ad": pa.array(rng.integers(0, 20, rows)),
            "label": pa.array((rng.random(rows) < 0.4).astype(np.int8)),
            "event_time": pa.array(np.arange(rows)),
        }
    )
    return Decoder(SCHEMA).decode(rb).batch


def build(name: str) -> Arm:
    """An arm whose tables TorchRec's planner may place only `PLANS[name]`-wise, column-wise
    shards 4 columns wide (so an 8-wide table is split over 2 ranks: its default block, 128
    columns, would keep it whole)."""
    made = distributed.constraints

    def only(module, device_type):
        return {
            t: dataclasses.replace(c, sharding_types=PLANS[name], min_partition=4)
            for t, c in made(module, device_type).items()
        }

    distributed.constraints = only
    try:
        dims = {"user": 8, "item": 8, "ad": 8}
        return Arm(ArmSpec(name, dims), SCHEMA.num_embeddings, SCHEMA.multi_valued, CFG, managed=SCHEMA.managed)
    finally:
        distributed.constraints = made


def tables(arm: Arm) -> dict[str, list]:
    """The managed fields' whole tables (collective: every rank calls it)."""
    sd = arm.model.state_dict()
    keys = sorted(k for k in sd if any(k.endswith(f"_{f}.weight") for f in SCHEMA.managed))
    return {k.rsplit(".", 2)[-2]: distributed.gather_full(sd[k]).tolist() for k in keys}


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    distributed.ensure_process_group()
    rank, world = distributed.rank(), distributed.world_size()
    arms = [build(name) for name in PLANS]
    stats: dict = {a.name: [] for a in arms}
    for w in range(WINDOWS):
        batch = window(w)
        distributed.progressive_val_score(arms, batch.take(distributed.share_mask(len(batch), rank, world)), BATCH)
        for a in arms:
            stats[a.name].append(a.vocab_stats())
    fixed = window(WINDOWS - 1, 200, seed=1)  # the last window's ids, other rows
    res = {"rank": rank, "world_size": world, "stats": stats, "vocab": {}, "predictions": {}, "tables": {}}
    for a in arms:
        res["vocab"][a.name] = {f: {k: t.tolist() for k, t in v.state_dict().items()} for f, v in vocabs_of(a).items()}
        res["predictions"][a.name] = a.predict(fixed).tolist()
        res["tables"][a.name] = tables(a)
        res.setdefault("plan", {})[a.name] = _plan(a)
    (out / f"rank{rank}.json").write_text(json.dumps(res))


def _plan(arm: Arm) -> dict[str, list]:
    """{table: [sharding type, [(rank, columns) of each shard]]} of the arm's plan."""
    out = {}
    for ps in arm.model.plan.plan.values():
        for t, p in ps.items():
            shards = [(s.placement.rank(), s.shard_sizes[1]) for s in p.sharding_spec.shards]
            out[t] = [p.sharding_type, shards]
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
