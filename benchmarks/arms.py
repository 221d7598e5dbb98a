"""The A/B of issue 3: control, slim and equal-budget uniform arms -> benchmarks/results/arms.json.

Runs `dimstream run --arms control,slim,uniform --search SEARCH --budget 0.25` (the daemon
itself, in-process) for several seeds on
  * the default synthetic stream, 24 one-hour windows, progressive AUC averaged over windows
    13-24 (acceptance: slim >= control - 0.003 and slim > uniform, averaged over seeds);
  * MovieLens-100k (GroupLens u.data/u.user/u.item) in one-day windows, progressive AUC
    averaged over the second half of the days (acceptance: slim >= uniform - 0.002);
and records, per dataset, arm and seed: AUC, log-loss, embedding parameters; the allocation
the slim arm ended with; search seconds; and every re-allocation's cost (slim AUC on the window
after a change minus the window before: the "dip").

Run from the repository root:
    .venv/bin/python benchmarks/arms.py [--seeds 3] [--search sseds] [--datasets synthetic,ml-100k]
and, for the daemon before search smoothing (slim 0.7856 on seed 0, re-shaped every hour):
    ... --seeds 1 --datasets synthetic --saliency-decay 0 --realloc-min-gain 0 --out /tmp/arms-raw.json
and with the held-out field check in the daemon (benchmarks/results/arms-field-check.json):
    ... --datasets synthetic --field-check-rows 50000 --out benchmarks/results/arms-field-check.json
and the variants of benchmarks/results/arms-variants.json (a first search after 3 windows, the
budget filled past the ranking's prefix), e.g.
    ... --search-warmup 3 --budget-fill --out /tmp/arms-fw3.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dimstream.ops.config import RunConfig
from dimstream.ops.daemon import Runner
from dimstream.ops.history import read_log, reallocation_costs
from dimstream.search import registry

REPO = Path(__file__).resolve().parents[1]

ARMS = ("control", "slim", "uniform")
ML100K = REPO.parent / "shared" / "data" / "ml-100k"
DATASETS = {
    # name: (source, windows, window_seconds, which windows are scored)
    "synthetic": ("synthetic", 24, None, lambda n: range(12, 24)),
    "ml-100k": (f"ml-100k:{ML100K}", 400, None, lambda n: range(n // 2, n)),
}


def run_once(dataset: str, seed: int, search: str, budget: float, log, **options) -> dict:
    source, windows, window_seconds, scored = DATASETS[dataset]
    precision = options.pop("precision", None)  # a ModelConfig setting, not a RunConfig one
    with tempfile.TemporaryDirectory() as d:
        cfg = RunConfig(
            source=source,
            windows=windows,
            window_seconds=window_seconds,
            state_dir=Path(d),
            metrics_addr="127.0.0.1:0",
            progress=False,
            seed=seed,
            arms=ARMS,
            search=search,
            budget=budget,
            **options,
        )
        cfg.model.seed = seed
        if precision:
            cfg.model.precision = precision
        t0 = time.perf_counter()
        summary = Runner.from_config(cfg).run()
        seconds = time.perf_counter() - t0
        ws = read_log(d)  # every window (the summary holds a bounded recent span)
    idx = list(scored(len(ws)))
    out = {"seed": seed, "windows": len(ws), "scored_windows": [idx[0], idx[-1]], "seconds": seconds, "arms": {}}
    for arm in ARMS:
        rows = [
            ws[i]["arms"][arm]
            for i in idx
            if arm in ws[i]["arms"]
            and ws[i]["arms"][arm].get("auc") is not None
            and ws[i]["arms"][arm]["auc"] == ws[i]["arms"][arm]["auc"]
        ]  # a one-class day has no AUC
        out["arms"][arm] = {
            "auc": statistics.fmean(r["auc"] for r in rows),
            "logloss": statistics.fmean(r["logloss"] for r in rows),
            "embedding_params": ws[-1]["arms"][arm]["embedding_params"],
            "dims": ws[-1]["arms"][arm]["dims"],
        }
    searches = [w["search"]["seconds"] for w in ws if w.get("search")]
    out["search_seconds_median"] = statistics.median(searches) if searches else None
    out["searches"] = len(searches)
    dips = [r for r in reallocation_costs(ws) if r.get("auc_change") is not None]
    out["reallocations"] = dips
    out["reallocation_dip_mean"] = statistics.fmean(r["auc_change"] for r in dips) if dips else None
    if "truth" in summary:
        out["field_rank"] = summary["truth"]["field_rank"]
    log(
        f"{dataset} seed {seed}: "
        + ", ".join(f"{a} {out['arms'][a]['auc']:.4f} ({out['arms'][a]['embedding_params']:,} params)" for a in ARMS)
        + f"; {len(ws)} windows in {seconds:.0f} s"
    )
    return out


def _one_thread(args: tuple) -> dict:
    torch.set_num_threads(1)
    return run_once(*args)


def run_seeds(dataset: str, seeds, search: str, budget: float, workers: int = 2) -> list[dict]:
    """`run_once` per seed at one thread each, `workers` seeds at a time in spawned processes:
    the same runs as one after another (a run at one thread is deterministic), in about
    half the wall time on two cores. Results in seed order."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    jobs = [(dataset, seed, search, budget, print) for seed in seeds]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_one_thread, jobs))


def aggregate(runs: list[dict]) -> dict:
    agg = {}
    for arm in ARMS:
        aucs = [r["arms"][arm]["auc"] for r in runs]
        agg[arm] = {
            "auc_mean": statistics.fmean(aucs),
            "auc_std": statistics.pstdev(aucs),
            "logloss_mean": statistics.fmean(r["arms"][arm]["logloss"] for r in runs),
            "embedding_params_mean": statistics.fmean(r["arms"][arm]["embedding_params"] for r in runs),
        }
    # a day of ml-100k can hold one class only: its AUC is NaN and says nothing about the dip
    dips = [d["auc_change"] for r in runs for d in r["reallocations"] if d["auc_change"] == d["auc_change"]]
    agg["reallocation_auc_change"] = (
        {"mean": statistics.fmean(dips), "min": min(dips), "n": len(dips)} if dips else None
    )
    s = [r["search_seconds_median"] for r in runs if r["search_seconds_median"] is not None]
    agg["search_seconds_median"] = statistics.median(s) if s else None
    return agg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--search", default="sseds", choices=registry.names())
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--datasets", default="synthetic,ml-100k")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--saliency-decay", type=float, default=0.8, help="0: every search alone (no moving average)")
    ap.add_argument(
        "--realloc-min-gain", type=float, default=RunConfig.realloc_min_gain, help="0: re-shape whenever it differs"
    )
    ap.add_argument(
        "--field-check-rows",
        type=int,
        default=0,
        help="held-out field check on this many rows of each search window (0: off)",
    )
    ap.add_argument("--search-warmup", type=int, default=0, help="windows the control trains before the first search")
    ap.add_argument(
        "--budget-fill",
        action=argparse.BooleanOptionalAction,
        default=RunConfig.budget_fill,
        help="spend what the ranking's prefix leaves (Budget.fill)",
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "arms.json"))
    ap.add_argument("--reaggregate", action="store_true", help="recompute the means of an existing --out file")
    args = ap.parse_args()
    if args.reaggregate:
        result = json.loads(Path(args.out).read_text())
        for v in result["datasets"].values():
            v["mean"] = aggregate(v["runs"])
        Path(args.out).write_text(json.dumps(result, indent=1))
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = {
        "setup": {
            "search": args.search,
            "budget": args.budget,
            "arms": ARMS,
            "seeds": args.seeds,
            "saliency_decay": args.saliency_decay,
            "realloc_min_gain": args.realloc_min_gain,
            "field_check_rows": args.field_check_rows,
            "search_warmup": args.search_warmup,
            "budget_fill": args.budget_fill,
            "torch_threads": args.threads,
            "machine": platform.machine(),
            "python": platform.python_version(),
            "command": "python benchmarks/arms.py " + " ".join(sys.argv[1:]),
        },
        "datasets": {},
    }
    for dataset in args.datasets.split(","):
        if dataset == "ml-100k" and not (ML100K / "u.data").exists():
            log(f"skipping ml-100k: {ML100K} not found")
            continue
        runs = [
            run_once(
                dataset,
                seed,
                args.search,
                args.budget,
                log,
                saliency_decay=args.saliency_decay,
                realloc_min_gain=args.realloc_min_gain,
                field_check_rows=args.field_check_rows,
                search_warmup=args.search_warmup,
                budget_fill=args.budget_fill,
            )
            for seed in range(args.seeds)
        ]
        agg = aggregate(runs)
        slim, ctrl, uni = agg["slim"]["auc_mean"], agg["control"]["auc_mean"], agg["uniform"]["auc_mean"]
        checks = (
            {"slim_at_least_control_minus_0.003": slim >= ctrl - 0.003, "slim_above_uniform": slim > uni}
            if dataset == "synthetic"
            else {"slim_at_least_uniform_minus_0.002": slim >= uni - 0.002}
        )
        result["datasets"][dataset] = {"mean": agg, "acceptance": checks, "runs": runs}
        log(f"{dataset}: mean AUC control {ctrl:.4f}, slim {slim:.4f}, uniform {uni:.4f}; {checks}")
    Path(args.out).write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
