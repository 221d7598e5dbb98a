"""Run by tests/test_distributed.py under `torchrun --nproc_per_node N` (or as one process):
one job on a state dir, the predictions of the arms on a fixed batch saved by rank 0.

    python tests/distributed_worker.py MODE STATE OUT [--windows W] [--split 3,1]

MODE run: train W windows of the synthetic source (rows split over the ranks, skewed by
  --split), then write OUT with the predictions of the live arms and of the arms reloaded from
  the newest checkpoint on the fixed batch (rows of window 50, which no run trains on).
MODE predict: load the newest checkpoint of STATE at this world size (DCP re-shards it) and
  write OUT with its arms' predictions.
MODE realloc: load the newest checkpoint (its predictions: "loaded"), re-allocate its slim arm
  to a fixed mixed shape (`realloc_dims`, kept columns permuted; "reallocated"), train one pass
  over the fixed batch ("checkpoint"), write OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dimstream.models import distributed
from dimstream.models.arm import ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.models.realloc import reallocate
from dimstream.ops import checkpoint
from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner
from dimstream.stream.decode import Decoder
from dimstream.stream.synthetic import SyntheticSource

ROWS = 2000
FIXED_WINDOW = 50


def config(state: Path, windows: int) -> RunConfig:
    return RunConfig(
        windows=windows,
        rows_per_window=ROWS,
        control_dim=8,
        # fp32: two ranks against one process is an identity bf16 holds only to its rounding
        # (a row near a bf16 rounding boundary may round apart; README, precision)
        model=ModelConfig("deepfm", interaction_dim=8, precision="fp32"),
        metrics_addr="127.0.0.1:0",
        progress=False,
        state_dir=state,
        arms=("control", "slim"),
        search="none",
        seed=3,
    )


def fixed_batch(cfg: RunConfig):
    source = SyntheticSource(seed=cfg.seed, rows_per_window=ROWS)
    table = source.window_table(FIXED_WINDOW).slice(0, 400)
    return source.schema, Decoder(source.schema).decode(table).batch


def predictions(arms, batch) -> dict[str, list[float]]:
    return {a.name: a.predict(batch).tolist() for a in arms}


def realloc_dims(fields: list[str]) -> ArmSpec:
    """A mixed shape: field i keeps widths 8/4/0 in turn, its columns taken in reverse order."""
    widths = [8, 4, 0]
    dims = {f: widths[i % 3] for i, f in enumerate(fields)}
    ids = {f: list(range(8))[::-1] for f in fields}
    return ArmSpec("slim", dims, ids)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["run", "predict", "realloc"])
    p.add_argument("state", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--split", default=None)
    a = p.parse_args(argv)
    cfg = config(a.state, a.windows)
    schema, batch = fixed_batch(cfg)
    out: dict = {"world_size": None}
    if a.mode == "run":
        split = tuple(int(x) for x in a.split.split(",")) if a.split else None
        runner = Runner.from_config(cfg)
        runner.row_split = split
        summary = runner.run()
        out["summary"] = summary
        out["live"] = predictions(runner.arms, batch)
    restored = checkpoint.load_arms(checkpoint.latest(a.state))
    arms = list(restored.arms.values())
    if a.mode == "realloc":
        out["loaded"] = predictions(arms, batch)
        slim, control = restored.arms["slim"], restored.arms["control"]
        new = reallocate(slim, control, realloc_dims(schema.feature_names), lambda s: _build(s, restored))
        out["reallocated"] = predictions([new], batch)
        local = batch.take(distributed.share_mask(len(batch), distributed.rank(), distributed.world_size()))
        distributed.progressive_val_score([new], local, 128)
        arms = [new]
    out["checkpoint"] = predictions(arms, batch)
    out["world_size"] = distributed.world_size()
    if distributed.rank() == 0:
        a.out.write_text(json.dumps(out))


def _build(spec: ArmSpec, restored):
    from dimstream.models.arm import Arm

    return Arm(spec, restored.schema.num_embeddings, restored.schema.multi_valued, restored.model)


if __name__ == "__main__":
    main(sys.argv[1:])
