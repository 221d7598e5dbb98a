"""AutoSrh's frequency tiers in the slim arm (`--tiers L`, models/tiers.py) -> benchmarks/results/tiers.json.

The daemon on the synthetic stream, as benchmarks/methods.py runs it in its quick mode (9
windows of 4,000 rows, a search every 3 windows, AutoSrh with 100 steps, kappa 0.25, arms
control, slim and uniform), once per L in --tiers (default 1 and 2). Per run, over the second
half of the windows: progressive AUC of every arm, slim minus uniform with its DeLong interval
(methods.py `summarise`), embedding parameters, seconds per search; and from the last
re-allocation the (frequent, ..., tail) widths of user_id and item_id and whether the frequent
tier is wider than the tail.

Run from the repository root:  .venv/bin/python benchmarks/tiers.py [--tiers 1 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "tiers.json"
KAPPA = 0.25
ID_FIELDS = ("user_id", "item_id")


def _methods():
    spec = importlib.util.spec_from_file_location("bench_methods", REPO / "benchmarks" / "methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _with_tiers(summarise):
    """methods.py's summary plus the last re-allocation's tier widths of the id fields."""

    def wrapped(ws, summary, proposals):
        out = summarise(ws, summary, proposals)
        last = next((w["reallocation"] for w in reversed(ws) if w.get("reallocation")), {})
        dims = {f: last.get("tier_dims", {}).get(f) for f in ID_FIELDS}
        out["tier_dims_last"] = dims
        out["frequent_tier_wider"] = {f: (d[0] > d[-1]) if d else None for f, d in dims.items()}
        return out

    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    m = _methods()
    m.summarise = _with_tiers(m.summarise)
    m.tiers_search = lambda *a, **k: None  # the tiers are in the daemon's own search here
    shape = m.sizes("quick")["synthetic"]
    runs = {}
    for tiers in args.tiers:
        knobs = m.method_knobs("quick")["autosrh"] | ({"tiers": tiers} if tiers > 1 else {})
        run = m.run_once("synthetic", shape | {"tiers": tiers}, "autosrh", KAPPA, args.seed, knobs, log)
        runs[f"tiers={tiers}"] = run
        log(f"tiers {tiers}: last tier widths {run['tier_dims_last']}, slim arm {run['arms']['slim']}")
    result = {
        "setup": {
            "kappa": KAPPA,
            "shape": shape,
            "method": "autosrh",
            "knobs": m.method_knobs("quick")["autosrh"],
            "seed": args.seed,
            "torch_threads": 1,
            "machine": platform.machine(),
            "python": platform.python_version(),
            "command": "python benchmarks/tiers.py " + " ".join(sys.argv[1:]),
        },
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=1, default=float))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
