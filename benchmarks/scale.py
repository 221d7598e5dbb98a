"""Scale-out overhead: training rows/s at world size 1 and 2 under torchrun (gloo, CPU, one
thread per rank), the collectives' share of a step, and the checkpoint and re-shard time.

Per world size, on the synthetic stream (default schema, control width 16, DeepFM, global
batch 512, WINDOW rows per window, each rank training its share, models/distributed.py):
  - train rows/s: rows of all ranks per second of `progressive_val_score` (test-then-train),
    median of WINDOWS windows after one warm-up window;
  - collectives' share: the profiler's self CPU time of the all-to-all (TorchRec's input and
    output dist) and all-reduce (DDP's dense gradients, the metrics' gather) operators over the
    profiled window's wall time, on rank 0;
  - checkpoint seconds: `checkpoint.save` of control and slim (DCP shards + marker);
  - re-shard seconds: the slim arm re-allocated to a mixed shape (a new plan, every table and
    its optimizer state gathered and written into the new shards, models/realloc.py);
  - load seconds: the checkpoint loaded back at this world size (DCP re-sharding).
Two ranks share this machine's 2 cores, so no speed-up is expected: the figures are overheads.
Writes benchmarks/results/scale.json.  Run: .venv/bin/python benchmarks/scale.py
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "scale.json"
WINDOW = 8192
WINDOWS = 3
CONTROL_DIM = 16
BATCH = 512


def _window(source, decoder, i):
    return decoder.decode(source.window_table(i)).batch


def _collective_ms(prof) -> dict[str, float]:
    out = {"all_to_all": 0.0, "all_reduce": 0.0, "other": 0.0}
    for e in prof.key_averages():
        name = e.key.lower()
        if "alltoall" in name or "all_to_all" in name:
            out["all_to_all"] += e.self_cpu_time_total / 1000
        elif "allreduce" in name or "all_reduce" in name or "allgather" in name or "all_gather" in name:
            out["all_reduce"] += e.self_cpu_time_total / 1000
    return out


def worker(out_path: Path, state: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from dimstream.models import distributed as D
    from dimstream.models.arm import Arm, ArmSpec
    from dimstream.models.config import ModelConfig
    from dimstream.models.realloc import reallocate
    from dimstream.ops import checkpoint
    from dimstream.stream.decode import Decoder
    from dimstream.stream.synthetic import SyntheticSource

    D.ensure_process_group()
    source = SyntheticSource(seed=1, rows_per_window=WINDOW)
    schema, decoder = source.schema, Decoder(source.schema)
    cfg = ModelConfig("deepfm", interaction_dim=CONTROL_DIM)
    fields = schema.feature_names

    def build(spec):
        return Arm(spec, schema.num_embeddings, schema.multi_valued, cfg)

    arms = [build(ArmSpec(n, {f: CONTROL_DIM for f in fields})) for n in ("control", "slim")]
    rates = []
    for i in range(WINDOWS + 1):
        batch = _window(source, decoder, i)
        local = batch.take(D.share_mask(len(batch), D.rank(), D.world_size()))
        D.barrier()
        t0 = time.perf_counter()
        D.progressive_val_score(arms, local, BATCH)
        if i:
            rates.append(2 * len(batch) / (time.perf_counter() - t0))  # two arms trained the window
    batch = _window(source, decoder, WINDOWS + 1)
    local = batch.take(D.share_mask(len(batch), D.rank(), D.world_size()))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        D.barrier()
        t0 = time.perf_counter()
        D.progressive_val_score(arms, local, BATCH)
        wall_ms = (time.perf_counter() - t0) * 1000
    coll = _collective_ms(prof)
    D.barrier()
    t0 = time.perf_counter()
    ckpt = checkpoint.save(state, 0, {"bench": True}, arms)
    save_s = time.perf_counter() - t0
    widths = [CONTROL_DIM, CONTROL_DIM // 2, 0, 4]
    spec = ArmSpec("slim", {f: widths[i % 4] for i, f in enumerate(fields)})
    D.barrier()
    t0 = time.perf_counter()
    reallocate(arms[1], arms[0], spec, build)
    reshard_s = time.perf_counter() - t0
    fresh = build(ArmSpec("control", {f: CONTROL_DIM for f in fields}))
    D.barrier()
    t0 = time.perf_counter()
    checkpoint.load_arm_state(fresh, checkpoint.read_tensors(ckpt)["control"])
    load_s = time.perf_counter() - t0
    if D.rank() == 0:
        result = {
            "world_size": D.world_size(),
            "train_rows_per_s": statistics.median(rates),
            "train_rows_per_s_all": rates,
            "profiled_window_ms": wall_ms,
            "all_to_all_ms": coll["all_to_all"],
            "all_reduce_ms": coll["all_reduce"],
            "all_to_all_share": coll["all_to_all"] / wall_ms,
            "all_reduce_share": coll["all_reduce"] / wall_ms,
            "checkpoint_seconds": save_s,
            "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()),
            "reshard_seconds": reshard_s,
            "load_seconds": load_s,
        }
        out_path.write_text(json.dumps(result))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, tmp: Path) -> dict:
    out = tmp / f"world{world}.json"
    cmd = [str(ROOT / ".venv" / "bin" / "torchrun"), "--nproc_per_node", str(world), "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_port()), __file__, "--worker", str(out), str(tmp / f"state{world}")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        sys.exit(f"world size {world} failed:\n{r.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        results = [run(w, Path(d)) for w in (1, 2)]
    one, two = results
    doc = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m_after": os.getloadavg()[0],  # other jobs share the machine
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "setup": {
            "source": "synthetic (default schema)",
            "model": "deepfm",
            "control_dim": CONTROL_DIM,
            "arms": ["control", "slim"],
            "rows_per_window": WINDOW,
            "global_batch": BATCH,
            "threads_per_rank": 1,
            "backend": "gloo",
            "device": "cpu",
        },
        "worlds": results,
        "speedup_2_vs_1": two["train_rows_per_s"] / one["train_rows_per_s"],
        "note": "two ranks share 2 CPU cores (and the machine with other jobs): the point is the overhead, "
        "not a speed-up. The GPU (nccl/cuda) path is untested.",
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
