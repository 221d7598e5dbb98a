"""AdaS&S on the default synthetic stream -> benchmarks/results/adass.json.

Two parts (issue 14, AdaS&S):

* "stream": a control arm (DeepFM, width 32, default ModelConfig) and the supernet
  (models/supernet.py) train test-then-train side by side on `--windows` windows of
  `--rows` rows: per window each one's training seconds and progressive AUC (the supernet's
  over its sampled subnets). Then the RL search (search/adass.py, default knobs) on the last
  window's rows with that supernet: its seconds against one window's training of the control
  (the paper's claim that the search is light next to training), the allocation, the noise
  fields it gives 0 and Spearman(true rank, width) over the signal fields; and the same search
  on the supernet bootstrapped from the control (`dimstream search` without a daemon supernet).
* "ab" (with --ab-windows > 0): the daemon itself, `--arms control,slim,uniform --search adass
  --budget KAPPA`, over --ab-windows windows of --ab-rows rows; progressive AUC per arm averaged
  over the second half of the windows, slim - uniform (acceptance: >= -0.002 at kappa 0.25 on
  the default 24 x 50,000; `benchmarks/arms.py --search adass` runs exactly that), and the
  supernet's own progressive AUC (record "supernet").

Run from the repository root:
    .venv/bin/python benchmarks/adass.py [--windows 6] [--rows 50000] [--ab-windows 24 --ab-rows 50000]
(--windows 0 skips the first part; --ab-search-every N searches every N windows).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.models.evaluation import _ranks, window_metrics
from dimstream.models.supernet import Supernet
from dimstream.search.adass import adass_search
from dimstream.search.budget import Budget
from dimstream.stream.decode import Decoder
from dimstream.stream.synthetic import SyntheticSource

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "adass.json"


def spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def truth(rank: dict, dims: dict) -> dict:
    noise = [f for f, r in rank.items() if r == 0]
    signal = [f for f, r in rank.items() if r > 0]
    return {
        "noise_fields_zeroed": sum(dims[f] == 0 for f in noise),
        "noise_fields": len(noise),
        "spearman_rank_dim": spearman([rank[f] for f in signal], [dims[f] for f in signal]),
    }


def _train(model, batch, bs: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    probs = np.concatenate(
        [model.train_step(batch.slice(s, min(s + bs, len(batch)))) for s in range(0, len(batch), bs)]
    )
    return probs, time.perf_counter() - t0


def stream_part(seed: int, windows: int, rows: int, kappa: float, log) -> dict:
    src = SyntheticSource(seed=seed, rows_per_window=rows)
    dec = Decoder(src.schema)
    cfg = ModelConfig("deepfm", seed=seed)
    fields = src.schema.feature_names
    control = Arm(ArmSpec("control", {f: 32 for f in fields}), src.schema.num_embeddings, src.schema.multi_valued, cfg)
    net = Supernet(src.schema.num_embeddings, src.schema.multi_valued, cfg, 32)
    per_window = []
    for w in range(windows):
        batch = dec.decode(src.window_table(w)).batch
        pc, sc = _train(control, batch, cfg.batch_size)
        ps, ss = _train(net, batch, cfg.batch_size)
        mc, ms = window_metrics(batch.labels, pc), window_metrics(batch.labels, ps)
        per_window.append(
            {"control_seconds": sc, "supernet_seconds": ss, "control_auc": mc["auc"], "supernet_auc": ms["auc"]}
        )
        log(
            f"window {w}: control {mc['auc']:.4f} in {sc:.1f}s, supernet (sampled subnets) {ms['auc']:.4f} in {ss:.1f}s"
        )
    window_seconds = statistics.median(p["control_seconds"] for p in per_window[1:] or per_window)
    out = {"windows": per_window, "control_window_seconds_median": window_seconds}
    rank = src.field_rank
    for name, supernet in (("stream", net), ("bootstrapped", None)):
        r = adass_search(control, batch, Budget("params", kappa), supernet=supernet)
        out[f"search_{name}"] = {
            "seconds": r.duration_seconds,
            "rl_seconds": r.details["rl_seconds"],
            "share_of_window_training": r.duration_seconds / window_seconds,
            "dims": r.dims,
            "argmax_dims": r.details["argmax_dims"],
            "projected": r.details["projected"],
            "params": r.params,
            "control_params": r.control_params,
            "lambda_r_final": r.details["lambda_r_final"],
            "p_f": dict(zip(net.feature_names, r.details["p_f"])),
        } | truth(rank, r.dims)
        o = out[f"search_{name}"]
        log(f"search ({name} supernet): {r.duration_seconds:.1f}s = {o['share_of_window_training']:.1f}x a window; "
            f"{o['noise_fields_zeroed']} of {o['noise_fields']} noise fields 0, "
            f"Spearman {o['spearman_rank_dim']:.2f}")  # fmt: skip
    out["field_rank"] = rank
    return out


def ab_part(seed: int, windows: int, rows: int, kappa: float, log, search_every: int = 1) -> dict:
    from dimstream.ops.config import RunConfig
    from dimstream.ops.daemon import Runner
    from dimstream.ops.history import read_log

    arms = ("control", "slim", "uniform")
    with tempfile.TemporaryDirectory() as d:
        cfg = RunConfig(
            source="synthetic",
            windows=windows,
            rows_per_window=rows,
            state_dir=Path(d),
            metrics_addr="127.0.0.1:0",
            progress=False,
            seed=seed,
            arms=arms,
            search="adass",
            budget=kappa,
            search_every=search_every,
        )
        cfg.model.seed = seed
        t0 = time.perf_counter()
        Runner.from_config(cfg).run()
        seconds = time.perf_counter() - t0
        ws = read_log(d)
    half = ws[len(ws) // 2 :]
    out = {"windows": len(ws), "rows_per_window": rows, "search_every": search_every, "seconds": seconds}
    out |= {"kappa": kappa, "arms": {}}
    for a in arms:
        out["arms"][a] = {
            "auc": statistics.fmean(w["arms"][a]["auc"] for w in half),
            "embedding_params": ws[-1]["arms"][a]["embedding_params"],
            "dims": ws[-1]["arms"][a]["dims"],
        }
    out["supernet_auc"] = statistics.fmean(w["supernet"]["auc"] for w in half if w.get("supernet"))
    out["slim_minus_uniform"] = out["arms"]["slim"]["auc"] - out["arms"]["uniform"]["auc"]
    out["slim_minus_control"] = out["arms"]["slim"]["auc"] - out["arms"]["control"]["auc"]
    out["search_seconds_median"] = statistics.median(w["search"]["seconds"] for w in ws if w.get("search"))
    out["reallocations"] = sum(1 for w in ws if w.get("reallocation"))
    log(
        f"A/B {len(ws)} x {rows}: control {out['arms']['control']['auc']:.4f}, slim {out['arms']['slim']['auc']:.4f}, "
        f"uniform {out['arms']['uniform']['auc']:.4f} (slim - uniform {out['slim_minus_uniform']:+.4f}); "
        f"supernet {out['supernet_auc']:.4f}; {seconds:.0f}s"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--ab-windows", type=int, default=0)
    ap.add_argument("--ab-rows", type=int, default=50_000)
    ap.add_argument("--ab-search-every", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = {
        "setup": {
            "seed": args.seed,
            "windows": args.windows,
            "rows_per_window": args.rows,
            "kappa": args.budget,
            "torch_threads": args.threads,
            "machine": platform.machine(),
            "python": platform.python_version(),
            "command": "python benchmarks/adass.py " + " ".join(sys.argv[1:]),
        },
    }
    if args.windows > 0:
        result["stream"] = stream_part(args.seed, args.windows, args.rows, args.budget, log)
    if args.ab_windows > 0:
        result["ab"] = ab_part(args.seed, args.ab_windows, args.ab_rows, args.budget, log, args.ab_search_every)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float))
    log(f"-> {args.out}")


if __name__ == "__main__":
    main()
