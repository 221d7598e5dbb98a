"""Decode and training throughput for DeepFM on a Criteo-shaped synthetic stream.

Criteo shape: 26 categorical + 13 numeric fields, embedding dim 16, batch 2048. Measures
  - decode rows/s: Arrow RecordBatch -> SparseBatch -> KeyedJaggedTensors (batch 2048),
  - bare rows/s: TorchRec forward/backward/fused update on pre-built KJTs (nothing else),
  - loop rows/s: the daemon's window loop (decode, test-then-train, dead letters,
    checkpoint, summary and plot) over the same stream, counting every second it spends
    except the source's own time generating rows (a broker's job in production; see
    benchmarks/kafka_ingest.py for ingest).
Writes benchmarks/results/training.json.  Run: .venv/bin/python benchmarks/training.py
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner, make_arm
from dimstream.stream.decode import Decoder
from dimstream.stream.synthetic import SyntheticField, SyntheticSource

ROOT = Path(__file__).resolve().parents[1]

# An hour of Criteo-scale traffic is ~2M rows; 250k-row windows keep the run short while
# per-window bookkeeping (checkpoint, summary) is amortised as it would be in production.
BATCH, DIM, ROWS, WINDOWS = 2048, 16, 250_000, 3
CRITEO_FIELDS = tuple(
    [
        SyntheticField(f"C{i}", c, r)
        for i, (c, r) in enumerate(
            [
                (100_000, 8),
                (50_000, 4),
                (20_000, 4),
                (10_000, 8),
                (5_000, 2),
                (2_000, 4),
                (1_000, 8),
                (500, 4),
                (300, 2),
                (200, 4),
                (100, 2),
                (50, 2),
                (30, 1),
                (20, 1),
                (10, 2),
                (5, 1),
                (3, 1),
                (2, 1),
                (100_000, 0),
                (20_000, 0),
                (5_000, 0),
                (1_000, 0),
                (100, 0),
                (10, 0),
                (4, 0),
                (2, 0),
            ],
            start=1,
        )
    ]
    + [SyntheticField(f"I{i}", 0, 1 if i <= 8 else 0, kind="numeric") for i in range(1, 14)]
)


def criteo_source(**kw) -> SyntheticSource:
    return SyntheticSource(seed=0, rows_per_window=ROWS, fields=CRITEO_FIELDS, **kw)


def bench_decode(src: SyntheticSource) -> float:
    dec = Decoder(src.schema)
    table = src.window_table(0)
    batches = table.to_batches(max_chunksize=BATCH * 8)
    t0 = time.perf_counter()
    for rb in batches:
        sb = dec.decode(rb).batch
        for s in range(0, len(sb), BATCH):
            sb.slice(s, min(s + BATCH, len(sb))).to_kjt()
    return table.num_rows / (time.perf_counter() - t0)


def bench_bare(src: SyntheticSource) -> float:
    arm = Arm(
        ArmSpec("control", {f: DIM for f in src.schema.feature_names}),
        src.schema.num_embeddings,
        set(),
        ModelConfig("deepfm", batch_size=BATCH),
    )
    kjts = []
    for w in range(WINDOWS):  # the same rows the loop trains on, as ready-made tensors
        sb = Decoder(src.schema).decode(src.window_table(w)).batch
        kjts += [
            (
                sb.slice(s, min(s + BATCH, len(sb))).to_kjt(arm.feature_names),
                sb.slice(s, min(s + BATCH, len(sb))).labels_tensor(),
            )
            for s in range(0, len(sb), BATCH)
        ]
    t0 = time.perf_counter()
    for kjt, y in kjts:
        _step(arm, kjt, y)
    return sum(len(y) for _, y in kjts) / (time.perf_counter() - t0)


def _step(arm, kjt, y):
    loss = arm.loss_fn(arm.model(kjt), y)
    arm.dense_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    arm.dense_optimizer.step()


def bench_loop() -> dict:
    with tempfile.TemporaryDirectory() as state:
        cfg = RunConfig(
            windows=WINDOWS,
            state_dir=Path(state),
            metrics_addr="127.0.0.1:0",
            progress=False,
            rows_per_window=ROWS,
            control_dim=DIM,
            model=ModelConfig("deepfm", batch_size=BATCH),
        )
        source = criteo_source()
        arm = make_arm(ArmSpec("control", {f: DIM for f in source.schema.feature_names}), source.schema, cfg.model)
        runner = Runner(cfg, source, [arm])
        t0 = time.perf_counter()
        summary = runner.run()
        # the source's own cost (generating rows here, a broker in production) is not the loop's
        elapsed = time.perf_counter() - t0 - runner.source.generate_seconds
    rows = sum(w["rows"] for w in summary["windows"])
    train = [w["arms"]["control"]["train_rows_per_s"] for w in summary["windows"]]
    phases = {
        k: sum(w.get(k, 0.0) for w in summary["windows"])
        for k in ("read_seconds", "checkpoint_seconds", "summary_seconds")
    }
    return {
        "rows": rows,
        "seconds_excluding_source": elapsed,
        "source_seconds": runner.source.generate_seconds,
        "rows_per_s": rows / elapsed,
        "train_only_rows_per_s": train,
        "phase_seconds": phases,
    }


def main() -> None:
    torch.manual_seed(0)
    src = criteo_source()
    decode = bench_decode(src)
    bare = bench_bare(src)
    loop = bench_loop()
    overhead = bare / loop["rows_per_s"] - 1
    result = {
        "what": "DeepFM, Criteo-shaped synthetic stream (26 categorical + 13 numeric fields), dim 16, batch 2048",
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
        "decode_rows_per_s": decode,
        "bare_train_rows_per_s": bare,
        "loop_rows_per_s": loop["rows_per_s"],
        "loop": loop,
        "loop_overhead_vs_bare": overhead,
        "decode_over_train": decode / bare,
        "checks": {"loop_overhead_at_most_20pct": overhead <= 0.20, "decode_at_least_5x_training": decode >= 5 * bare},
    }
    out = ROOT / "benchmarks" / "results" / "training.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
