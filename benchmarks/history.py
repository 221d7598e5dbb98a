"""Per-window cost and checkpoint size against the daemon's age -> benchmarks/results/history.json.

Runs the daemon in-process on 700 tiny windows of the synthetic stream (control arm, FM, width
4, 200 rows a window) and records, per window:
  * the window-close cost without the checkpoint itself: everything `Runner.close_window` does
    (dead letters, history log, summary, plot, metrics) minus the checkpoint's own seconds;
  * the size of the JSON the checkpoint holds (meta.json).
Checks: the close cost at window 700 (median of windows 690-699) is within 20% of window 10's
(median of 5-14), and meta.json at window 80 is under 1.5x its size at window 10.

Run from the repository root:  .venv/bin/python benchmarks/history.py [--windows 700]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dimstream.models.config import ModelConfig
from dimstream.ops import checkpoint
from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner

OUT = Path(__file__).resolve().parent / "results" / "history.json"


def run(windows: int, rows: int) -> list[dict]:
    per_window: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        cfg = RunConfig(
            arms=("control",),
            windows=windows,
            rows_per_window=rows,
            state_dir=Path(d),
            metrics_addr="127.0.0.1:0",
            progress=False,
            control_dim=4,
            model=ModelConfig("fm"),
        )
        runner = Runner.from_config(cfg)
        close = runner.close_window

        def timed_close(window, record):
            t0 = time.perf_counter()
            close(window, record)
            total = time.perf_counter() - t0
            meta = checkpoint.latest(d) / "meta.json"
            per_window.append(
                {
                    "index": record.index,
                    "close_seconds": total,
                    "checkpoint_seconds": record.checkpoint_seconds,
                    "close_without_checkpoint_seconds": total - record.checkpoint_seconds,
                    "meta_bytes": meta.stat().st_size,
                }
            )
            if record.index % 50 == 0:
                print(
                    f"window {record.index}: close {1e3 * (total - record.checkpoint_seconds):.1f} ms "
                    f"(checkpoint excluded), meta.json {meta.stat().st_size:,} B",
                    flush=True,
                )

        runner.close_window = timed_close
        runner.run()
    return per_window


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=700)
    p.add_argument("--rows", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    ws = run(args.windows, args.rows)
    cost = [w["close_without_checkpoint_seconds"] for w in ws]
    early, late = statistics.median(cost[5:15]), statistics.median(cost[-10:])
    meta10, meta80 = ws[10]["meta_bytes"], ws[min(80, len(ws) - 1)]["meta_bytes"]
    result = {
        "what": f"{args.windows} windows of {args.rows} synthetic rows, control arm, FM, width 4",
        "command": f"python benchmarks/history.py --windows {args.windows} --rows {args.rows}",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "close_without_checkpoint_seconds": {
            "window_10_median": early,
            "last_10_median": late,
            "ratio_last_over_10": late / early,
        },
        "meta_bytes": {"window_10": meta10, "window_80": meta80, "ratio_80_over_10": meta80 / meta10},
        "checks": {
            "close_cost_at_700_within_20pct_of_10": late <= 1.2 * early,
            "meta_at_80_under_1.5x_of_10": meta80 < 1.5 * meta10,
        },
        "per_window": ws,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_window"}, indent=1))


if __name__ == "__main__":
    main()
