"""Noise floors for the default search (issue 14) -> benchmarks/results/noise_floor.json.

The target: on the default synthetic run (`dimstream run`: control, slim, uniform, SSEDS, kappa
0.25, 24 windows) the slim arm's allocation gives 0 columns to at least 75% of the 6 noise fields
(5 of 6), with Spearman(true rank, dim) >= 0.6 over all fields (ops/verdict.py), and slim AUC >=
uniform AUC over the second half (windows 13-24), without the AUC cost of the z = 2 field check.

The daemon's default keeps the check off (`field_check_rows` 0, ops/config.py: with it on the
test suite's daemon runs took twice as long); z 0.5 and the 50,000-row minimum are the defaults
of `--field-check-rows N` when a user turns it on. The JSON's daemon rows say, per variant and
seed, which targets hold.

Three parts:
  * daemon: the daemon itself (benchmarks/arms.run_once) per variant and seed: the verdict's
    noise fields pruned and Spearman of the slim arm's final allocation, control / slim /
    uniform progressive AUC over windows 13-24, and the daemon's seconds;
  * offline (--offline): a control trained on 12 default windows (as benchmarks/search.py),
    then SSEDS on the last 8,192 trained rows with the gradient noise floor of
    search/noisefloor.py at K in {off, 1, 2, 3}: noise pruned and Spearman of each allocation,
    and the floor's seconds;
  * simulated (--trace): the control alone per seed, its per-window held-out checks (mean
    replacement on 8,192 and 16,384 rows, shuffle on 8,192) and SSEDS scores, and the daemon's
    allocation path replayed for each rule of SIMULATED (noise pruned, Spearman, the signal
    fields at 0, and a cost proxy; no AUC). The committed rows stopped after window 18 (CPU).

Run from the repository root (each call merges its rows into the JSON, under a lock, so calls
may run side by side; each row records its command). The committed file came from
    .venv/bin/python benchmarks/noise_floor.py --variants default,fc8192-z0,fc8192-z1,fc8192-z1-w3 --seeds 0,1
    .venv/bin/python benchmarks/noise_floor.py --dataset ml-100k --variants default,fc8192-z0 --seeds 0
    .venv/bin/python benchmarks/noise_floor.py --offline --seeds 0,1
    .venv/bin/python benchmarks/noise_floor.py --variants fc8192-z0.5-min50k --seeds 0   (and 1, 2)
    .venv/bin/python benchmarks/noise_floor.py --dataset ml-100k --variants fc8192-z0.5-min50k --seeds 0
    .venv/bin/python benchmarks/noise_floor.py --trace --seeds 0   (and 1)
(one variant and seed per call, two calls at a time; the rows named default predate issue 14's
defaults: they ran without the check, as no-check does now).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from arms import run_once  # noqa: E402  (benchmarks/arms.py)

from dimstream.ops.verdict import truth_agreement  # noqa: E402
from dimstream.stream.synthetic import DEFAULT_FIELDS  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "noise_floor.json"
TRUE_RANK = {f.name: f.rank for f in DEFAULT_FIELDS}
VARIANTS = {
    # the heads' precision pinned: since session 13 the default is auto (bf16 where native)
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "default": {},  # rows from before issue 14 changed the defaults were field_check_rows 0: "no-check"
    "no-check": {"field_check_rows": 0},
    "fc8192-z2": {"field_check_rows": 8192},  # the existing check, on the search's row count
    "fc8192-z0": {"field_check_rows": 8192, "field_check_z": 0.0},
    "fc8192-z1": {"field_check_rows": 8192, "field_check_z": 1.0},
    # the first search (and check) after 3 windows: an early check on a barely trained control drops user_id
    "fc8192-z1-w3": {"field_check_rows": 8192, "field_check_z": 1.0, "search_warmup": 3},
    "fc50000-z0": {"field_check_rows": 50_000, "field_check_z": 0.0},
    "floor2": {"noise_floor": 2.0},  # SSEDS's gradient null (search/noisefloor.py)
    # the averaged check may drop a field only once it pools >= 50,000 effective held-out rows
    # (about 6 windows of 8,192): the early checks, on a barely trained control, drop nothing
    "fc8192-z0.5-min50k": {"field_check_rows": 8192, "field_check_z": 0.5, "field_check_min_rows": 50_000},
    "fc8192-z1-min50k": {"field_check_rows": 8192, "field_check_z": 1.0, "field_check_min_rows": 50_000},
    # pooled, a memorised noise field's delta falls below 0 and a weak signal field's stays above:
    # z 0 and 0.25 ask less of a weak field (seed 2 lost user_id at z 0.5)
    "fc8192-z0-min50k": {"field_check_rows": 8192, "field_check_z": 0.0, "field_check_min_rows": 50_000},
    "fc8192-z0.25-min50k": {"field_check_rows": 8192, "field_check_z": 0.25, "field_check_min_rows": 50_000},
}


def passes(t: dict, aucs: dict) -> dict:
    pruned, noise = t["noise_pruned"]
    return {
        "noise_pruned_at_least_75pct": pruned >= 0.75 * noise,
        "spearman_at_least_0.6": t["spearman"] == t["spearman"] and t["spearman"] >= 0.6,
        "slim_at_least_uniform": aucs["slim"] >= aucs["uniform"],
    }


def daemon_run(variant: str, seed: int, log, dataset: str = "synthetic") -> dict:
    out = run_once(dataset, seed, "sseds", 0.25, log, **VARIANTS[variant])
    aucs = {a: out["arms"][a]["auc"] for a in out["arms"]}
    if dataset != "synthetic":  # no truth: the AUCs only (arms.py's acceptance: slim >= uniform - 0.002)
        row = {"variant": variant, "dataset": dataset, "options": VARIANTS[variant], "seed": seed}
        row |= {"auc_second_half": aucs, "slim_minus_uniform": aucs["slim"] - aucs["uniform"]}
        row |= {"slim_dims": out["arms"]["slim"]["dims"], "seconds": out["seconds"]}
        log(f"{dataset} {variant} seed {seed}: slim {aucs['slim']:.4f} uniform {aucs['uniform']:.4f}")
        return row
    t = truth_agreement(out["arms"]["slim"]["dims"], TRUE_RANK)
    row = {
        "variant": variant,
        "dataset": dataset,
        "options": VARIANTS[variant],
        "seed": seed,
        "auc_second_half": aucs,
        "slim_minus_uniform": aucs["slim"] - aucs["uniform"],
        "noise_pruned": t["noise_pruned"],
        "noise_kept": t["noise_kept"],
        "spearman": t["spearman"],
        "slim_dims": out["arms"]["slim"]["dims"],
        "seconds": out["seconds"],
        "search_seconds_median": out["search_seconds_median"],
        "reallocations": len(out["reallocations"]),
    }
    row["target"] = passes(t, aucs)
    log(
        f"{variant} seed {seed}: noise pruned {t['noise_pruned']}, Spearman {t['spearman']:.2f}, "
        f"slim {aucs['slim']:.4f} uniform {aucs['uniform']:.4f} control {aucs['control']:.4f}, {out['seconds']:.0f} s"
    )
    return row


def offline_runs(seed: int, log) -> list[dict]:
    import numpy as np

    from dimstream.search import Budget, sseds_search
    from search import SEARCH_ROWS, train_control  # benchmarks/search.py

    _, arm, batches, _, _ = train_control(seed, log)
    trained = batches[max(k for k in batches if k < max(batches))]
    rows = trained.slice(len(trained) - SEARCH_ROWS, len(trained))
    out = []
    for k in (None, 1.0, 2.0, 3.0):
        t0 = time.perf_counter()
        r = sseds_search(arm, rows, Budget("params", kappa=0.25, fill=True), rows=SEARCH_ROWS, noise_floor=k)
        t = truth_agreement(r.dims, TRUE_RANK)
        floor = r.details.get("noise_floor") or {}
        out.append(
            {
                "seed": seed,
                "noise_floor": k,
                "noise_pruned": t["noise_pruned"],
                "noise_kept": t["noise_kept"],
                "spearman": None if np.isnan(t["spearman"]) else t["spearman"],
                "dims": r.dims,
                "floored_fields": floor.get("floored", []),
                "seconds": time.perf_counter() - t0,
            }
        )
        log(f"offline seed {seed} floor {k}: noise pruned {t['noise_pruned']}, Spearman {t['spearman']:.2f}")
    return out


def trace_control(seed: int, log, windows: int = 24) -> dict:
    """The control alone (as benchmarks/search.train_control), window by window: before it trains
    on window w, the held-out check of every field on w's last 16,384 rows (mean replacement:
    delta and stderr on all of them and on the last 8,192) and the shuffle check on the last
    8,192; after, SSEDS's eq. 11 scores on the last 8,192 trained rows. The control does not
    depend on the search, so `simulate` replays any check rule's allocations from this."""
    import numpy as np

    from dimstream.models.arm import Arm, ArmSpec
    from dimstream.models.config import ModelConfig
    from dimstream.search.fieldcheck import ablation_diffs
    from dimstream.search.sseds import saliency_scores
    from dimstream.stream.decode import Decoder
    from dimstream.stream.synthetic import SyntheticSource

    src, out = SyntheticSource(seed=seed), []
    dec, multi = Decoder(src.schema), {f.name for f in src.schema.fields if f.kind == "multi"}
    cfg = ModelConfig("deepfm", seed=seed)
    arm = Arm(ArmSpec("control", {f: 32 for f in src.schema.feature_names}), src.schema.num_embeddings, multi, cfg)

    def stats(d):
        return [float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))]

    for w in range(windows):
        batch, rec = dec.decode(src.window_table(w)).batch, {"window": w}
        if w:
            tail = batch.slice(len(batch) - 16384, len(batch))
            diffs = ablation_diffs(arm, tail, "mean", seed=w)
            rec["mean"] = {f: {"all": stats(d), "last8192": stats(d[-8192:])} for f, d in diffs.items()}
            diffs = ablation_diffs(arm, tail.slice(8192, 16384), "shuffle", seed=w)
            rec["shuffle"] = {f: {"last8192": stats(d)} for f, d in diffs.items()}
        for s in range(0, len(batch), arm.config.batch_size):
            arm.train_step(batch.slice(s, min(s + arm.config.batch_size, len(batch))))
        rec["saliency"] = {
            f: v.tolist() for f, v in saliency_scores(arm, batch.slice(len(batch) - 8192, len(batch)))[1].items()
        }
        out.append(rec)
        log(f"trace seed {seed}: window {w}")
    return {"seed": seed, "num_embeddings": dict(src.schema.num_embeddings), "windows": out}


def simulate(trace: dict, how="mean", rows="last8192", z=0.5, min_rows=50_000, decay=0.8) -> dict:
    """The daemon's allocation path (search/policy.py: averaged check, moving average of the
    scores, gate) replayed on a trace; the AUC needs the daemon itself. `cost`: the mean over
    windows 12+ of the summed held-out loss increase (x 1e4) of the fields the slim arm lacks."""
    from types import SimpleNamespace

    import numpy as np

    from dimstream.search.fieldcheck import FieldCheck
    from dimstream.search.policy import AllocationPolicy

    ne, n = trace["num_embeddings"], 8192 if rows == "last8192" else 16384
    policy, current, costs = AllocationPolicy(0.25, decay, 0.0, fill=True), {f: list(range(32)) for f in ne}, []
    for rec in trace["windows"]:
        keep = None
        if how in rec:
            shot = FieldCheck.decide(
                *({f: v[rows][i] for f, v in rec[how].items()} for i in (0, 1)), z, n, 0.0, min_rows
            )
            check = policy.average_check(shot)
            keep = check.keep if any(check.keep.values()) else None
        proposal = SimpleNamespace(method="sseds", saliency=rec["saliency"], dims={}, kept_columns={})
        decision = policy.decide(proposal, {f: 32 for f in ne}, ne, current, keep=keep)
        current = decision.kept_columns if decision.reshape else current
        if rec["window"] >= 12 and "mean" in rec:
            costs.append(1e4 * sum(rec["mean"][f]["all"][0] for f in ne if not current[f]))
    dims = {f: len(c) for f, c in current.items()}
    t = truth_agreement(dims, TRUE_RANK)
    lost = [f for f in dims if dims[f] == 0 and TRUE_RANK[f] > 0]
    return {
        "noise_pruned": t["noise_pruned"],
        "spearman": t["spearman"],
        "signal_pruned": lost,
        "cost": float(np.mean(costs)),
    }


SIMULATED = [  # (how, rows, z, min_rows): the check rules replayed on each trace
    ("mean", "last8192", z, m) for z in (0.0, 0.5, 1.0, 2.0) for m in (0, 50_000)
] + [("mean", "all", 0.5, 50_000), ("shuffle", "last8192", 1.0, 50_000)]


def simulated_rows(trace: dict) -> list[dict]:
    windows = len(trace["windows"])
    keys = ("how", "rows", "z", "min_rows")
    return [{"seed": trace["seed"], "windows": windows} | dict(zip(keys, r)) | simulate(trace, *r) for r in SIMULATED]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="default,fc8192-z0", help=f"comma-separated of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--dataset", default="synthetic", choices=["synthetic", "ml-100k"])
    ap.add_argument("--offline", action="store_true", help="the offline gradient-floor part instead")
    ap.add_argument("--trace", action="store_true", help="trace the control per seed, replay check rules on it")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    seeds = [int(s) for s in args.seeds.split(",")]
    cmd = "python benchmarks/noise_floor.py " + " ".join(sys.argv[1:])
    if args.trace:
        for seed in seeds:
            rows = simulated_rows(trace_control(seed, log))
            merge(
                Path(args.out),
                "simulated",
                [r | {"command": cmd} for r in rows],
                lambda r, s=seed: r["seed"] == s,
                args.threads,
            )
    elif args.offline:
        for seed in seeds:
            runs = offline_runs(seed, log)
            merge(Path(args.out), "offline", runs, lambda r, s=seed: r["seed"] == s, args.threads)
    else:
        for variant in args.variants.split(","):
            for seed in seeds:
                row = daemon_run(variant, seed, log, args.dataset) | {"command": cmd}
                key = (variant, seed, args.dataset)
                same = lambda r, k=key: (r["variant"], r["seed"], r.get("dataset", "synthetic")) == k  # noqa: E731
                merge(Path(args.out), "daemon", [row], same, args.threads)  # after every run
    log(f"wrote {args.out}")


def merge(path: Path, part: str, rows: list[dict], replaces, threads: int) -> None:
    """Add `rows` to `part` of the JSON at `path` (dropping the rows they `replaces`), under a
    lock: several invocations may run side by side, each with its own variants."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = json.loads(path.read_text()) if path.exists() else {}
        for key in ("daemon", "offline", "simulated"):
            result.setdefault(key, [])
        result[part] = [r for r in result[part] if not replaces(r)] + rows
        result["setup"] = {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch_threads": threads,
            "daemon": "benchmarks/arms.run_once: synthetic, 24 windows, sseds, kappa 0.25, AUC over windows 13-24",
            "offline": "benchmarks/search.train_control (12 windows), SSEDS on the last 8,192 trained rows",
        }
        path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
