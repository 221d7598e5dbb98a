"""Benchmark of the dimension searches on the default synthetic stream -> benchmarks/results/search.json.

For each seed: train a control arm (DeepFM, width 32 on every field, default ModelConfig) on 12
default windows (50,000 rows each), timing each window's training. Then:

* timing: SSEDS with the daemon's default sample (8,192 rows) against the time to train one
  default window (the search must cost <= 10% of it); HAM's search stage (1,000 steps);
* ground truth: noise fields (rank 0) pruned to 0 and Spearman(true rank, allocated width) over
  the signal fields, kappa = 0.25, for SSEDS ranked by saliency ("full") and by saliency per
  parameter ("per_parameter"), scored on 512 / 2,048 rows (one mini-batch) up to a whole window;
  HAM with the paper's lr = 1e-3 and with lr = 1 (from the paper's grid, section 4.3);
* steadiness: how much the ranking moves when the same control is scored on other windows
  (Spearman between field saliency vectors and between allocations) and across seeds;
* oracle: the exact loss increase of removing each field's embedding (SSEDS eq. 9 at field
  level), i.e. whether the control has learnt the truth at all;
* the held-out field check (search/fieldcheck.py) on the next window (50,000 rows, and 8,192),
  its time, the fields it drops, and SSEDS ("... + check") and HAM ("ham ... + check")
  allocated after it: the ground truth of issue 3 is asked of these.

Run from the repository root:  .venv/bin/python benchmarks/search.py [--seeds 3] [--ham-steps 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.models.evaluation import _ranks, auc
from dimstream.search import Budget, allocate, check_fields, ham_search, split_holdout, sseds_search
from dimstream.search.masks import ctr_model, masked_loss, ones_masks, pooled_embeddings
from dimstream.stream.decode import Decoder
from dimstream.stream.synthetic import TRUTH_COLUMN, SyntheticSource

REPO = Path(__file__).resolve().parents[1]

OUT = REPO / "benchmarks" / "results" / "search.json"
CONTROL_DIM, WINDOWS, KAPPA, SEARCH_ROWS = 32, 12, 0.25, 8192
ROW_SAMPLES = (512, 2048, 8192, 50_000)  # 512 and 2048: one mini-batch (batch_size 2048)


def spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def truth_figures(rank: dict, dims: dict) -> dict:
    noise = [f for f in rank if rank[f] == 0]
    signal = [f for f in rank if rank[f] > 0]
    pruned = sum(dims[f] == 0 for f in noise)
    return {
        "noise_pruned": pruned,
        "noise_fields": len(noise),
        "noise_pruned_share": pruned / len(noise),
        "spearman_rank_dim": spearman([rank[f] for f in signal], [dims[f] for f in signal]),
        "passes": bool(
            pruned >= 0.75 * len(noise) and spearman([rank[f] for f in signal], [dims[f] for f in signal]) >= 0.6
        ),
    }


def train_control(seed: int, log) -> tuple:
    src = SyntheticSource(seed=seed)
    dec = Decoder(src.schema)
    multi = {f.name for f in src.schema.fields if f.kind == "multi"}
    arm = Arm(
        ArmSpec("control", {f: CONTROL_DIM for f in src.schema.feature_names}),
        src.schema.num_embeddings,
        multi,
        ModelConfig("deepfm"),
    )
    batches, seconds = {}, []
    bs = arm.config.batch_size
    for w in range(WINDOWS):
        batch = dec.decode(src.window_table(w)).batch
        t0 = time.perf_counter()
        for s in range(0, len(batch), bs):
            arm.train_step(batch.slice(s, min(s + bs, len(batch))))
        seconds.append(time.perf_counter() - t0)
        if w >= WINDOWS - 2:
            batches[w] = batch
    table = src.window_table(WINDOWS)
    batches[WINDOWS] = dec.decode(table).batch  # the next window, never trained on
    quality = {
        "auc_next_window": auc(batches[WINDOWS].labels, arm.predict(batches[WINDOWS])),
        "bayes_auc_next_window": auc(batches[WINDOWS].labels, table.column(TRUTH_COLUMN).to_numpy()),
    }
    log(
        f"seed {seed}: trained {WINDOWS} windows, median {statistics.median(seconds[1:]):.2f}s/window, "
        f"AUC {quality['auc_next_window']:.4f} (Bayes {quality['bayes_auc_next_window']:.4f})"
    )
    return src, arm, batches, seconds, quality


def oracle_field_drop(arm, batch) -> dict:
    """Exact increase of the mean log-loss when field i's embedding is removed (eq. 9, field level)."""
    m = ctr_model(arm)
    kjt, y = batch.to_kjt(m.feature_names), batch.labels_tensor()
    pooled = pooled_embeddings(m, kjt)
    with torch.no_grad():
        base = float(masked_loss(m, None, y, ones_masks(m.dims), pooled))
        out = {}
        for f in m.feature_names:
            mk = ones_masks(m.dims)
            mk[f] = torch.zeros(m.dims[f])
            out[f] = float(masked_loss(m, None, y, mk, pooled)) - base
    return out


def summarise(values: list[float]) -> dict:
    v = [x for x in values if x == x]
    return {
        "mean": float(np.mean(v)) if v else float("nan"),
        "std": float(np.std(v)) if v else float("nan"),
        "n": len(v),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ham-steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    budget = Budget("params", kappa=KAPPA)
    runs, timing_train, timing_sseds, timing_ham, timing_check = [], [], [], {}, []
    field_sal: dict = {}  # (variant rows) -> {(seed, window): {field: saliency}}
    dims_of: dict = {}  # same keys -> dims
    truth: dict = {}  # (variant rows) -> list of truth figures
    rank = None
    for seed in range(args.seeds):
        src, arm, batches, seconds, quality = train_control(seed, log)
        rank = src.field_rank
        timing_train += seconds[1:]  # window 0 includes one-off warm-up
        recent = batches[WINDOWS - 1]
        # timing: the daemon's default search, repeated
        for _ in range(5):
            timing_sseds.append(sseds_search(arm, recent, budget, rows=SEARCH_ROWS).duration_seconds)
        run = {"seed": seed, "control": quality, "oracle_field_drop": oracle_field_drop(arm, batches[WINDOWS])}
        run["oracle_spearman_rank_drop"] = spearman(
            [rank[f] for f in rank if rank[f] > 0], [run["oracle_field_drop"][f] for f in rank if rank[f] > 0]
        )
        noise = [f for f in rank if rank[f] == 0]
        drops = run["oracle_field_drop"]
        run["oracle_noise_below_every_signal_field"] = sum(
            drops[f] < min(drops[g] for g in rank if rank[g] > 0) for f in noise
        )
        check = check_fields(arm, batches[WINDOWS])
        small = check_fields(arm, batches[WINDOWS].slice(0, SEARCH_ROWS))
        timing_check.append(check.seconds)
        for key, c in (("field_check", check), (f"field_check rows={SEARCH_ROWS}", small)):
            run[key] = {
                "seconds": c.seconds,
                "dropped": c.dropped,
                "delta": c.delta,
                "stderr": c.stderr,
                "noise_dropped": sum(f in c.dropped for f in noise),
                "signal_dropped": [f"{f} (rank {rank[f]})" for f in c.dropped if rank[f] > 0],
            }
        log(f"seed {seed}: field check {check.seconds:.1f}s drops {check.dropped}")
        for rows in (SEARCH_ROWS, 50_000):
            key = f"full rows={rows} + check"
            for w, batch in batches.items():
                if w == WINDOWS:
                    continue  # the check's own rows
                r = sseds_search(arm, batch, budget, rows=rows, field_check=check)
                truth.setdefault(key, []).append(truth_figures(rank, r.dims) | {"seed": seed, "window": w})
        for variant, pp in (("full", False), ("per_parameter", True)):
            for rows in ROW_SAMPLES:
                key = f"{variant} rows={rows}"
                for w, batch in batches.items():
                    r = sseds_search(arm, batch, budget, rows=rows, batch_size=2048, per_parameter=pp)
                    field_sal.setdefault(key, {})[(seed, w)] = {f: sum(v) for f, v in r.saliency.items()}
                    dims_of.setdefault(key, {})[(seed, w)] = r.dims
                    truth.setdefault(key, []).append(truth_figures(rank, r.dims) | {"seed": seed, "window": w})
        # HAM: trains a copy on the next window's first 80%, alpha on its last 20%
        tr, va = split_holdout(batches[WINDOWS], 0.2)
        for lr in (1e-3, 1.0):
            r = ham_search(arm, tr, va, budget, steps=args.ham_steps, lr=lr)
            key = f"ham lr={lr:g}"
            timing_ham.setdefault(key, []).append(r.duration_seconds)
            truth.setdefault(key, []).append(truth_figures(rank, r.dims) | {"seed": seed, "window": WINDOWS})
            run[key] = {
                "dims": r.dims,
                "steps_run": r.details["steps_run"],
                "stopped_early_at": r.details["stopped_early_at"],
                "seconds": r.duration_seconds,
                "trace": [(t["step"], t["spent"], round(t["val_auc"], 4)) for t in r.details["trace"]],
                "field_alpha_sum": {f: float(sum(v)) for f, v in r.saliency.items()},
            }
            log(f"seed {seed} {key}: {r.duration_seconds:.1f}s, {truth[key][-1]}")
            # the same alphas allocated after the field check (what ham_search(field_check=...) does)
            alpha = {f: np.asarray(v) for f, v in r.saliency.items()}
            m = ctr_model(arm)
            gated = allocate(alpha, budget, m.dims, m.num_embeddings, min_score=0.0, keep_fields=check.keep)
            truth.setdefault(f"{key} + check", []).append(
                truth_figures(rank, {f: 0 for f in rank} | gated.dims) | {"seed": seed, "window": WINDOWS}
            )
            log(f"seed {seed} {key} + check: {truth[key + ' + check'][-1]}")
        run["sseds_default"] = {
            "dims": dims_of[f"full rows={SEARCH_ROWS}"][(seed, WINDOWS - 1)],
            "field_saliency": field_sal[f"full rows={SEARCH_ROWS}"][(seed, WINDOWS - 1)],
        }
        runs.append(run)
        log(
            f"seed {seed}: SSEDS default "
            + str(
                next(t for t in truth[f"full rows={SEARCH_ROWS}"] if t["seed"] == seed and t["window"] == WINDOWS - 1)
            )
        )

    # steadiness: same control, other windows; other seeds, same window
    steadiness = {}
    for key, sal in field_sal.items():
        fields = list(rank)
        vec = {k: [v[f] for f in fields] for k, v in sal.items()}
        dvec = {k: [dims_of[key][k][f] for f in fields] for k in sal}
        across_w = [spearman(vec[a], vec[b]) for a, b in combinations(vec, 2) if a[0] == b[0]]
        across_w_dims = [spearman(dvec[a], dvec[b]) for a, b in combinations(dvec, 2) if a[0] == b[0]]
        across_s = [spearman(vec[a], vec[b]) for a, b in combinations(vec, 2) if a[1] == b[1] and a[0] != b[0]]
        steadiness[key] = {
            "field_saliency_across_windows": summarise(across_w),
            "allocation_across_windows": summarise(across_w_dims),
            "field_saliency_across_seeds": summarise(across_s),
        }

    def fig(v):
        return {
            "spearman_rank_dim": summarise([t["spearman_rank_dim"] for t in v]),
            "noise_pruned_share": summarise([t["noise_pruned_share"] for t in v]),
            "passes": sum(t["passes"] for t in v),
            "runs": len(v),
        }

    truth_summary = {k: fig(v) for k, v in truth.items()}
    # SSEDS on rows the control has trained on (the daemon's recent rows) vs the next, fresh window
    truth_by_rows = {
        k: {
            "trained_rows": fig([t for t in v if t["window"] < WINDOWS]),
            "fresh_rows": fig([t for t in v if t["window"] == WINDOWS]),
        }
        for k, v in truth.items()
        if not k.startswith("ham")
    }
    t_train = statistics.median(timing_train)
    t_sseds = statistics.median(timing_sseds)
    full = [k for k in steadiness if k.startswith("full")]
    steadiest = {m: max(full, key=lambda k: steadiness[k][m]["mean"]) for m in steadiness[full[0]]}
    best_truth = max(
        (k for k in truth_summary if not k.startswith("ham")),
        key=lambda k: truth_summary[k]["spearman_rank_dim"]["mean"],
    )
    result = {
        "setup": {
            "control": f"DeepFM, width {CONTROL_DIM} on every field, ModelConfig() defaults",
            "windows_trained": WINDOWS,
            "rows_per_window": 50_000,
            "seeds": args.seeds,
            "kappa": KAPPA,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sseds_rows_default": SEARCH_ROWS,
            "ham_steps": args.ham_steps,
            "synthetic_env": {k: v for k, v in os.environ.items() if k.startswith("DS_")},
        },
        "timing": {
            "train_one_window_seconds_median": t_train,
            "sseds_seconds_median": t_sseds,
            "sseds_rows": SEARCH_ROWS,
            "sseds_over_train_window": t_sseds / t_train,
            "sseds_within_10_percent": bool(t_sseds <= 0.1 * t_train),
            "ham_seconds_median": {k: statistics.median(v) for k, v in timing_ham.items()},
            "ham_over_train_window": {k: statistics.median(v) / t_train for k, v in timing_ham.items()},
            "field_check_seconds_median": statistics.median(timing_check),
            "field_check_rows": 50_000,
            "field_check_over_train_window": statistics.median(timing_check) / t_train,
        },
        "truth": truth_summary,
        "truth_trained_vs_fresh_rows": truth_by_rows,
        "steadiness": steadiness,
        "conclusions": {
            "steadiest_full_saliency_variant": steadiest,
            "note_per_parameter": "per-parameter allocations look steady across windows because dividing by "
            "rows_i (2 .. 200,000) dominates the saliency: small tables get all 32 "
            "columns whatever the rows say, large ones none",
            "note_one_minibatch": "rows=512 and rows=2048 are one mini-batch (the paper's D_b); "
            "larger samples accumulate gradients over 2,048-row mini-batches",
            "best_spearman_rank_dim": best_truth,
            "any_sseds_variant_passes_ground_truth": any(
                truth_summary[k]["passes"] for k in truth_summary if not k.startswith("ham")
            ),
            "ham_passes_ground_truth": {k: truth_summary[k]["passes"] for k in truth_summary if k.startswith("ham")},
            "with_field_check": {
                k: f"{v['passes']}/{v['runs']} runs pass" for k, v in truth_summary.items() if k.endswith("+ check")
            },
            "oracle_spearman_rank_drop": summarise([r["oracle_spearman_rank_drop"] for r in runs]),
        },
        "runs": runs,
        "truth_runs": truth,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    log(f"wrote {args.out}: SSEDS {t_sseds:.3f}s vs {t_train:.2f}s/window ({100 * t_sseds / t_train:.1f}%)")


if __name__ == "__main__":
    main()
