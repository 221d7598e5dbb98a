"""Cost and ground truth of AutoSrh (search/autosrh.py) -> benchmarks/results/autosrh.json.

For each seed: train a control arm (DeepFM, width 32 on every field) on 12 default synthetic
windows (50,000 rows each), timing each window's training (benchmarks/search.py
`train_control`). Then, on the last trained window, run AutoSrh as the daemon does
(`registry.build("autosrh", ...)`, kappa 0.25) at field level (tiers 1) with its defaults
(8,192 rows, 200 steps of 512 rows) and with the whole window, and with tiers 2 and 4, and
record for each: seconds, seconds over one window's training, steps and weight steps, the
ground truth of the synthetic stream (noise fields given 0, Spearman(true rank, width)) of the
field-level allocation, and with tiers the (field, tier) widths of user_id and item_id
(frequent tier first).

Run from the repository root:  .venv/bin/python benchmarks/autosrh.py [--seeds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from dimstream.search import Budget, registry

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "autosrh.json"
KAPPA = 0.25
CONFIGS = {  # name: AutoSrh knobs
    "tiers=1 (defaults: 8192 rows, 200 steps)": {},
    "tiers=1, whole window (50000 rows)": {"rows": None},
    "tiers=2": {"tiers": 2},
    "tiers=4": {"tiers": 4},
}


def _bench_search():
    """benchmarks/search.py as a module (its control training and ground-truth figures)."""
    spec = importlib.util.spec_from_file_location("bench_search", REPO / "benchmarks" / "search.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_seed(seed: int, bs, log) -> dict:
    src, arm, batches, seconds, quality = bs.train_control(seed, log)
    window = batches[bs.WINDOWS - 1]
    train_s = statistics.median(seconds[1:])
    out = {"seed": seed, "train_one_window_seconds_median": train_s, "control": quality, "runs": {}}
    for name, knobs in CONFIGS.items():
        t0 = time.perf_counter()
        r = registry.build("autosrh", **knobs).run(arm, window, Budget("params", kappa=KAPPA))
        sec = time.perf_counter() - t0
        run = {
            "knobs": knobs,
            "seconds": sec,
            "over_train_window": sec / train_s,
            "rows_used": r.rows_used,
            "steps": r.details["steps"],
            "weight_steps": r.details["weight_steps"],
            "params": r.params,
            "control_params": r.control_params,
            "dims": r.dims,
            "truth": bs.truth_figures(src.field_rank, r.dims),
        }
        if "tiers" in r.details:
            t = r.details["tiers"]
            run["tiers"] = {
                "params": t["params"],
                "budget_asked": t["budget_asked"],
                "dims": t["dims"],
                "rows": t["rows"],
                "frequent_tier_wider": {f: t["dims"][f][0] > t["dims"][f][-1] for f in ("user_id", "item_id")},
            }
        out["runs"][name] = run
        log(
            f"seed {seed} {name}: {sec:.1f}s ({sec / train_s:.2f} x one window's training), "
            f"truth {run['truth']}"
            + (
                f", tiers user/item {run['tiers']['dims']['user_id']} {run['tiers']['dims']['item_id']}"
                if "tiers" in run
                else ""
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    bs = _bench_search()
    seeds = [run_seed(s, bs, log) for s in range(args.seeds)]
    summary = {}
    for name in CONFIGS:
        runs = [s["runs"][name] for s in seeds]
        summary[name] = {
            "seconds_median": statistics.median(r["seconds"] for r in runs),
            "over_train_window_median": statistics.median(r["over_train_window"] for r in runs),
            "truth_passes": [r["truth"]["passes"] for r in runs],
            "noise_pruned_share": [r["truth"]["noise_pruned_share"] for r in runs],
            "spearman_rank_dim": [r["truth"]["spearman_rank_dim"] for r in runs],
        }
        if "tiers" in runs[0]:
            summary[name]["frequent_tier_wider"] = [r["tiers"]["frequent_tier_wider"] for r in runs]
    result = {
        "setup": {
            "kappa": KAPPA,
            "control": "DeepFM, width 32, 12 synthetic windows of 50,000 rows",
            "seeds": args.seeds,
            "torch_threads": args.threads,
            "machine": platform.machine(),
            "python": platform.python_version(),
            "command": "python benchmarks/autosrh.py " + " ".join(sys.argv[1:]),
        },
        "summary": summary,
        "seeds": seeds,
    }
    args.out.write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
