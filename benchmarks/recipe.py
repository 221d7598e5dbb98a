"""Which part of FuxiCTR's recipe makes its holdout AUC (issue 15)?

benchmarks/peers.py shows FuxiCTR's DeepFM at about 0.804 holdout AUC against dimstream's 0.791 on
the same rows. The two recipes differ in: the sparse optimizer (FuxiCTR: one torch Adam over all
parameters, with dense, non-lazy gradients on the embeddings; dimstream: FBGEMM's fused Adagrad
lr 0.02 in backward), the initialisation (FuxiCTR: embeddings normal std 1e-4, Linear layers
xavier-normal; dimstream: tables uniform +-0.05, PyTorch's default Linear init), gradient
clipping (FuxiCTR: norm 10) and nothing else of note (same model, dim, MLP, batch, one pass).

Each ingredient is measured alone on dimstream's Arm (config fields, or a monkeypatch applied in
the child process only: models/* is untouched), then in combination; the lazy-vs-dense Adam
question is asked of a plain PyTorch DeepFM too, where both are possible (SparseAdam on
`EmbeddingBag(sparse=True)` against Adam on dense gradients). Rows, holdout and the process per
run are peers.py's (`write_rows`, `read_rows`, `batches`, `run_child`-like wait4): every variant
trains once, one pass, in its own process with 1 thread, in sequence; the baseline runs first
and last, to show the machine's drift. Reported per variant: holdout AUC and log-loss, rows/s of
the training pass, and for clipped variants the share of steps the clip bit.

Then `--stream-check` compares today's defaults with the chosen recipe on the synthetic default
stream (3 seeds) and MovieLens-100k: progressive (test-then-train) AUC over a one-pass run of
the daemon's arm (ops/daemon.py `make_arm`), batch 512, as tests/test_precision.py does.

Writes benchmarks/results/recipe.json.
Run: make peers-venv && .venv/bin/python benchmarks/recipe.py [--variants a,b] [--stream-check]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (benchmarks/ is not a package)

ROOT = peers.ROOT
OUT = ROOT / "benchmarks" / "results" / "recipe.json"
FUXI_EMB_STD = 1e-4  # fuxictr FeatureEmbeddingDict's default: partial(nn.init.normal_, std=1e-4)

# ---------------------------------------------------------------- variants
# An Arm variant: `config` overrides ModelConfig; `sparse` replaces models/arm.py's
# `_sparse_optimizer` by (torchrec.optim or torch.optim class name, kwargs); `init` redraws the
# deep tables ("normal:<std>" or "xavier": uniform +-sqrt(6 / (rows + dim)), Glorot's bound for
# a [rows, dim] matrix); `dense_init` "xavier" redraws every Linear of the head xavier-normal with
# zero bias (fuxictr BaseModel.reset_parameters); `clip` clips the dense gradients' norm.
# A "hand" variant is the plain PyTorch DeepFM below with `sparse` (True: SparseAdam on sparse
# gradients; False: Adam on dense ones), `init` and `clip` (over all parameters, as FuxiCTR).
BASE = {"kind": "arm", "config": {}}
VARIANTS: dict[str, dict] = {
    "baseline": BASE,  # today's defaults: fused Adagrad lr 0.02, uniform 0.05, dense Adam 1e-3
    "adagrad-0.005": BASE | {"config": {"sparse_lr": 0.005}},
    "adagrad-0.01": BASE | {"config": {"sparse_lr": 0.01}},
    "adagrad-0.05": BASE | {"config": {"sparse_lr": 0.05}},
    "adagrad-0.1": BASE | {"config": {"sparse_lr": 0.1}},
    "rowwise-adagrad-0.01": BASE | {"sparse": ("RowWiseAdagrad", {"lr": 0.01, "eps": 1e-8})},
    "rowwise-adagrad-0.02": BASE | {"sparse": ("RowWiseAdagrad", {"lr": 0.02, "eps": 1e-8})},
    "rowwise-adagrad-0.05": BASE | {"sparse": ("RowWiseAdagrad", {"lr": 0.05, "eps": 1e-8})},
    "rowwise-adagrad-0.1": BASE | {"sparse": ("RowWiseAdagrad", {"lr": 0.1, "eps": 1e-8})},
    "rowwise-adam-0.001": BASE | {"config": {"sparse_optimizer": "rowwise_adam", "sparse_lr": 1e-3}},
    "rowwise-adam-0.003": BASE | {"config": {"sparse_optimizer": "rowwise_adam", "sparse_lr": 3e-3}},
    "rowwise-adam-0.01": BASE | {"config": {"sparse_optimizer": "rowwise_adam", "sparse_lr": 1e-2}},
    # FBGEMM's CPU kernels run only (row-wise) Adagrad and SGD: these fail on a CPU (recorded)
    "adam-0.001": BASE | {"sparse": ("Adam", {"lr": 1e-3})},
    "init-uniform-0.01": BASE | {"config": {"init_range": 0.01}},
    "init-normal-1e-4": BASE | {"init": f"normal:{FUXI_EMB_STD}"},
    "init-xavier": BASE | {"init": "xavier"},
    "dense-xavier": BASE | {"dense_init": "xavier"},
    "clip-10": BASE | {"clip": 10.0},
    "dense-lr-0.0005": BASE | {"config": {"dense_lr": 5e-4}},
    "dense-lr-0.002": BASE | {"config": {"dense_lr": 2e-3}},
    "fuxi-init-clip": BASE | {"init": f"normal:{FUXI_EMB_STD}", "dense_init": "xavier", "clip": 10.0},
    # combinations, and the init as the config can set it (uniform +-init_range)
    "fuxi-init": BASE | {"init": f"normal:{FUXI_EMB_STD}", "dense_init": "xavier"},
    "init-uniform-1e-4": BASE | {"config": {"init_range": 1e-4}},
    "init-uniform-1e-3": BASE | {"config": {"init_range": 1e-3}},
    "init-uniform-1e-4+dense-xavier": BASE | {"config": {"init_range": 1e-4}, "dense_init": "xavier"},
    "init-uniform-1e-3+dense-xavier": BASE | {"config": {"init_range": 1e-3}, "dense_init": "xavier"},
    "init-1e-4+xavier+adagrad-0.01": BASE | {"config": {"init_range": 1e-4, "sparse_lr": 0.01}, "dense_init": "xavier"},
    "init-1e-4+xavier+adagrad-0.05": BASE | {"config": {"init_range": 1e-4, "sparse_lr": 0.05}, "dense_init": "xavier"},
    "init-1e-4+xavier+rowwise-0.05": BASE
    | {"config": {"init_range": 1e-4}, "dense_init": "xavier", "sparse": ("RowWiseAdagrad", {"lr": 0.05, "eps": 1e-8})},
    "init-1e-4+xavier+dense-lr-0.002": BASE
    | {"config": {"init_range": 1e-4, "dense_lr": 2e-3}, "dense_init": "xavier"},
    # the recommendation (see the report): tables uniform +-1e-4, head Linear layers xavier-normal
    "best": BASE | {"config": {"init_range": 1e-4}, "dense_init": "xavier"},
    # the same at other seeds (the model's init; the rows stay the same)
    **{f"baseline-seed{s}": BASE | {"config": {"seed": s}} for s in (1, 2)},
    **{f"best-seed{s}": BASE | {"config": {"init_range": 1e-4, "seed": s}, "dense_init": "xavier"} for s in (1, 2)},
    "hand-peers": {"kind": "peers", "system": "handwritten"},  # peers.py's own loop, as a check
    "hand-sparseadam": {"kind": "hand", "sparse": True, "init": "uniform:0.05"},
    "hand-denseadam": {"kind": "hand", "sparse": False, "init": "uniform:0.05"},
    "hand-sparseadam-normal": {"kind": "hand", "sparse": True, "init": f"normal:{FUXI_EMB_STD}"},
    "hand-denseadam-normal": {"kind": "hand", "sparse": False, "init": f"normal:{FUXI_EMB_STD}"},
    "fuxictr": {"kind": "peers", "system": "fuxictr"},
}


# ---------------------------------------------------------------- children: dimstream's Arm


def arm_for(v: dict, schema, seed: int = 0, batch_size: int = peers.BATCH, dims: int = peers.DIM):
    """dimstream's arm as peers.py's dimstream child builds it (ModelConfig defaults, dim 16,
    k 16), with variant `v`'s changes; fp32 pinned so that only the recipe differs."""
    from dimstream.models import arm as arm_mod
    from dimstream.models.arm import ArmSpec
    from dimstream.models.config import ModelConfig
    from dimstream.ops.daemon import make_arm

    kw = {"batch_size": batch_size, "interaction_dim": dims, "precision": "fp32", "seed": seed}
    cfg = ModelConfig("deepfm", **(kw | v.get("config", {})))
    original = arm_mod._sparse_optimizer
    if "sparse" in v:
        arm_mod._sparse_optimizer = lambda _cfg: (_optimizer_class(v["sparse"][0]), dict(v["sparse"][1]))
    try:
        arm = make_arm(ArmSpec("control", dict.fromkeys(schema.feature_names, dims)), schema, cfg)
    finally:
        arm_mod._sparse_optimizer = original
    if "init" in v:
        redraw_tables(arm, v["init"], cfg.seed)
    if v.get("dense_init") == "xavier":
        xavier_dense(arm)
    return arm


def _optimizer_class(name: str):
    import torch
    import torchrec.optim

    return getattr(torchrec.optim, name, None) or getattr(torch.optim, name)


def redraw_tables(arm, init: str, seed: int) -> None:
    """Redraw every deep table (emb_*) whole, into its (table-wise) shards; wide tables keep
    their +-1e-3."""
    import torch

    from dimstream.models.embedding import _write_rows

    g = torch.Generator().manual_seed(seed + 7)
    for key, t in arm.model.state_dict().items():
        if ".deep." not in key or not key.endswith(".weight"):
            continue
        rows, dim = t.size()
        fresh = _draw(init, rows, dim, g)
        _write_rows(t, torch.arange(rows), fresh)


def _draw(init: str, rows: int, dim: int, g):
    import torch

    kind, _, arg = init.partition(":")
    if kind == "normal":
        return torch.empty(rows, dim).normal_(0.0, float(arg), generator=g)
    if kind == "uniform":
        return torch.empty(rows, dim).uniform_(-float(arg), float(arg), generator=g)
    if kind == "xavier":  # Glorot & Bengio 2010, eq. 16: U[-sqrt(6/(n_in+n_out)), +]
        bound = math.sqrt(6.0 / (rows + dim))
        return torch.empty(rows, dim).uniform_(-bound, bound, generator=g)
    raise ValueError(init)


def xavier_dense(arm) -> None:
    import torch

    for m in arm.model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_normal_(m.weight)
            torch.nn.init.zeros_(m.bias)


def clipped_step(arm, batch, clip: float) -> tuple[np.ndarray, float]:
    """Arm.train_step with the dense gradients' norm clipped at `clip` before Adam's step (the
    tables' fused update has already run inside backward: FBGEMM's gradients never surface)."""
    import torch

    logits = arm.model(arm.kjt(batch))
    loss = arm.loss_fn(logits, batch.labels_tensor())
    arm.dense_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for grp in arm.dense_optimizer.param_groups for p in grp["params"]]
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    arm.dense_optimizer.step()
    return torch.sigmoid(logits.detach()).numpy(), norm


def child_arm(v: dict, meta: dict, rows: dict) -> tuple[float, np.ndarray, dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from training import criteo_source

    from dimstream.stream.batch import SparseBatch

    src = criteo_source()
    assert src.schema.feature_names == meta["fields"]
    arm = arm_for(v, src.schema)

    def sparse(ids, labels):  # as peers.py's dimstream child: one id per row and field
        n = len(labels)
        offsets = np.arange(n + 1, dtype=np.int64)
        values = {k: np.ascontiguousarray(ids[:, j]) for j, k in enumerate(meta["fields"])}
        return SparseBatch(
            meta["fields"], values, dict.fromkeys(meta["fields"], offsets), labels, np.zeros(n, np.int64)
        )

    train, norms = sparse(rows["train_ids"], rows["train_labels"]), []
    t0 = time.perf_counter()
    for s, e in peers.batches(len(train)):
        if "clip" in v:
            norms.append(clipped_step(arm, train.slice(s, e), v["clip"])[1])
        else:
            arm.train_step(train.slice(s, e))
    seconds = time.perf_counter() - t0
    probs = arm.predict(sparse(rows["holdout_ids"], rows["holdout_labels"]))
    info = {"config": arm.config.to_dict()}
    if norms:
        info["dense_grad_norm"] = {
            "median": float(np.median(norms)),
            "max": float(np.max(norms)),
            "share_clipped": float(np.mean(np.asarray(norms) > v["clip"])),
        }
    return seconds, probs, info


# ---------------------------------------------------------------- children: plain PyTorch DeepFM


def child_hand(v: dict, meta: dict, rows: dict) -> tuple[float, np.ndarray, dict]:
    """peers.py's hand-written DeepFM (its class is local to its child, so it is rebuilt here:
    one table over all fields, first order + FM + MLP), with the table's gradients sparse
    (SparseAdam, lazy: only the batch's rows move) or dense (Adam over everything, as FuxiCTR:
    every row's moments decay and keep moving it after its last appearance)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    fields, vocab, dim = len(meta["fields"]), meta["vocab"], peers.DIM
    base = torch.tensor(np.concatenate([[0], np.cumsum(vocab)[:-1]]), dtype=torch.int64)
    emb = nn.EmbeddingBag(sum(vocab), dim, mode="sum", sparse=v["sparse"])
    wide = nn.EmbeddingBag(sum(vocab), 1, mode="sum", sparse=v["sparse"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb.weight.copy_(_draw(v["init"], sum(vocab), dim, g))
        nn.init.zeros_(wide.weight)
    sizes = [fields * dim, *peers.MLP]
    dnn = nn.Sequential(*[m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
    dnn.append(nn.Linear(sizes[-1], 1))
    bias = nn.Parameter(torch.zeros(1))

    def forward(ids):
        e = emb(ids.reshape(-1, 1)).view(len(ids), fields, dim)
        s = e.sum(dim=1)
        fm = 0.5 * (s * s - (e * e).sum(dim=1)).sum(dim=1)
        return bias + wide(ids)[:, 0] + fm + dnn(e.reshape(len(ids), -1)).squeeze(-1)

    tables = [emb.weight, wide.weight]
    opts = [torch.optim.Adam([*dnn.parameters(), bias], lr=peers.LR)]
    if v["sparse"]:
        opts.append(torch.optim.SparseAdam(tables, lr=peers.LR))
    else:
        opts[0].add_param_group({"params": tables})
    loss_fn = nn.BCEWithLogitsLoss()
    ids, labels = rows["train_ids"], rows["train_labels"]
    t0 = time.perf_counter()
    for s, e in peers.batches(len(labels)):
        loss = loss_fn(forward(torch.from_numpy(ids[s:e]) + base), torch.from_numpy(labels[s:e]))
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        x = torch.from_numpy(rows["holdout_ids"]) + base
        probs = torch.cat([torch.sigmoid(forward(x[s:e])) for s, e in peers.batches(len(x))]).numpy()
    recipe = ("SparseAdam" if v["sparse"] else "dense Adam") + f" lr {peers.LR} on the tables, init {v['init']}"
    return seconds, probs, {"recipe": recipe}


def child_main(name: str, folder: Path, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    meta, rows = peers.read_rows(folder)
    v = VARIANTS[name]
    if v["kind"] == "peers":
        seconds, probs, info = peers.CHILDREN[v["system"]](meta, rows)
    else:
        seconds, probs, info = (child_arm if v["kind"] == "arm" else child_hand)(v, meta, rows)
    np.save(out.with_suffix(".npy"), np.asarray(probs, np.float32).reshape(-1))
    out.write_text(json.dumps(info | {"seconds": seconds, "rows": meta["train_rows"]}))


# ---------------------------------------------------------------- parent


def run_variant(name: str, folder: Path, label: str) -> dict:
    """One variant in its own process (the peers' venv for FuxiCTR), 1 thread."""
    v = VARIANTS[name]
    py = peers.PEERS_PY if v.get("system") in peers.PEER_SYSTEMS else peers.OWN_PY
    out = folder / f"{label}.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [str(py), str(Path(__file__).resolve()), "--child", name, "--data", str(folder), "--out", str(out)]
    load = peers._load()
    with open(out.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:  # e.g. an optimizer FBGEMM has no CPU kernel for
        lines = out.with_suffix(".err").read_text().strip().splitlines()
        return {"error": next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")}
    info = json.loads(out.read_text())
    info["probs"] = np.load(out.with_suffix(".npy"))
    info["peak_rss_mib"] = usage.ru_maxrss / 1024
    info["load_average_before_after"] = [load, peers._load()]
    return info


def bench_variants(names: list[str], args) -> dict:
    from dimstream.models.evaluation import auc, logloss

    results = {}
    with tempfile.TemporaryDirectory(prefix="dimstream-recipe-") as tmp:
        folder = Path(tmp)
        meta = peers.write_rows(folder, args.train_rows, args.holdout_rows)
        labels = np.load(folder / "holdout_labels.npy")
        meta["holdout_ids_unseen_in_training"] = unseen_share(folder, meta["fields"])
        order = [*names, "baseline"] if "baseline" in names else names  # baseline again last: drift
        for i, name in enumerate(order):
            label = name if name not in results else f"{name}-again"
            info = run_variant(name, folder, label)
            if "error" in info:
                results[label] = info | {"spec": VARIANTS[name]}
                print(f"{i:2d} {label:24s} failed: {info['error']}", flush=True)
                continue
            probs = info.pop("probs")
            info |= {"holdout_auc": auc(labels, probs), "holdout_logloss": logloss(labels, probs)}
            info["rows_per_s"] = info["rows"] / info["seconds"]
            info["spec"] = {k: v for k, v in VARIANTS[name].items()}
            results[label] = info
            print(f"{i:2d} {label:24s} AUC {info['holdout_auc']:.4f}  {info['rows_per_s']:8.0f} rows/s", flush=True)
    return {"sizes": meta, "variants": results, "order": order}


def unseen_share(folder: Path, fields: list[str]) -> dict:
    """Per field, the share of holdout rows whose id no training row has: its table row is still
    at its initial draw when the holdout is scored, so the init range is noise there."""
    train, hold = np.load(folder / "train_ids.npy"), np.load(folder / "holdout_ids.npy")
    share = {f: float(np.mean(~np.isin(hold[:, j], train[:, j]))) for j, f in enumerate(fields)}
    per_row = np.mean([share[f] for f in fields])
    return {"mean_over_fields": float(per_row), "per_field": share}


# ---------------------------------------------------------------- stream check (progressive AUC)


def progressive(schema, batch, v: dict, seed: int, batch_size: int) -> dict:
    """Test-then-train AUC of the daemon's arm over one pass, and its training rows/s."""
    from dimstream.models.evaluation import window_metrics

    arm = arm_for(v, schema, seed=seed, batch_size=batch_size)
    steps = [(lo, min(lo + batch_size, len(batch))) for lo in range(0, len(batch), batch_size)]
    t0 = time.perf_counter()
    if "clip" in v:
        probs = [clipped_step(arm, batch.slice(lo, hi), v["clip"])[0] for lo, hi in steps]
    else:
        probs = [arm.train_step(batch.slice(lo, hi)) for lo, hi in steps]
    seconds = time.perf_counter() - t0
    m = window_metrics(batch.labels, np.concatenate(probs))
    return {"auc": m["auc"], "logloss": m["logloss"], "rows_per_s": len(batch) / seconds}


def stream_data(rows: int):
    from dimstream.stream.decode import Decoder
    from dimstream.stream.sources.movielens import load_movielens, movielens_schema
    from dimstream.stream.synthetic import SyntheticSource

    for seed in (0, 1, 2):
        src = SyntheticSource(seed=seed, rows_per_window=rows)
        yield f"synthetic-seed{seed}", seed, src.schema, Decoder(src.schema).decode(src.window_table(0)).batch
    ml = ROOT.parent / "shared" / "data" / "ml-100k"
    if (ml / "u.data").exists():
        schema = movielens_schema()
        yield "ml-100k", 0, schema, Decoder(schema).decode(load_movielens(ml)).batch


def stream_check(names: list[str], args) -> dict:
    import torch

    torch.set_num_threads(1)
    out = {}
    for data, seed, schema, batch in stream_data(args.stream_rows):
        out[data] = {"rows": len(batch)}
        for name in names:
            r = progressive(schema, batch, VARIANTS[name], seed, args.stream_batch)
            out[data][name] = r
            print(f"{data:16s} {name:24s} prog AUC {r['auc']:.4f}  {r['rows_per_s']:7.0f} rows/s", flush=True)
    return out


def merge_runs(old: dict | None, new: dict) -> dict:
    """Add a run's variants to the earlier runs' on the same rows (each tagged with its run; a
    name run again gets `@run<n>`): rows/s compare within a run, AUC across runs."""
    if not old or old.get("sizes", {}).get("train_rows") != new["sizes"]["train_rows"]:
        old = {"variants": {}, "runs": []}
    old["sizes"] = old.get("sizes", {}) | new["sizes"]
    n = len(old.setdefault("runs", []))
    for label, info in new["variants"].items():
        old["variants"][label if label not in old["variants"] else f"{label}@run{n}"] = info | {"run": n}
    old["runs"].append(new["order"])
    old.pop("order", None)
    return old


def table(variants: dict) -> list[dict]:
    """Holdout AUC per variant, best first, with its rows/s and the baseline of its own run
    (rows/s compare within a run only: the machine is shared)."""
    base = {v["run"]: v["rows_per_s"] for k, v in variants.items() if k.split("@")[0] == "baseline"}
    rows = []
    for name, v in variants.items():
        if "error" in v:
            rows.append({"variant": name, "error": v["error"]})
            continue
        speed = v["rows_per_s"] / base[v["run"]] if v.get("run") in base else None
        rows.append(
            {"variant": name, "holdout_auc": round(v["holdout_auc"], 4), "rows_per_s": round(v["rows_per_s"])}
            | {"rows_per_s_over_baseline_same_run": speed and round(speed, 2), "run": v.get("run")}
        )
    return sorted(rows, key=lambda r: -r.get("holdout_auc", 0))


def main(args) -> None:
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result |= {"what": __doc__.split("\n\n")[0], "command": " ".join(["benchmarks/recipe.py", *sys.argv[1:]])}
    result["machine"] = {"cpus": os.cpu_count(), "threads_per_child": 1, "processor": peers._cpu_model()}
    if args.variants != "none":
        names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
        if any(VARIANTS[n].get("system") in peers.PEER_SYSTEMS for n in names) and not peers.PEERS_PY.exists():
            raise SystemExit("the peers' venv is missing: run `make peers-venv` first")
        result["holdout"] = merge_runs(result.get("holdout"), bench_variants(names, args))
    if args.stream_check:
        names = args.stream_variants.split(",")
        result["stream_check"] = {
            "what": f"progressive AUC, one pass, batch {args.stream_batch}, 1 thread, the daemon's make_arm",
            "variants": {n: VARIANTS[n] for n in names},
            "results": stream_check(names, args),
        }
    if "holdout" in result:
        result["table"] = table(result["holdout"]["variants"])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {OUT}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, default=500_000)
    p.add_argument("--holdout-rows", type=int, default=100_000)
    p.add_argument("--variants", default="all", help="comma-separated names, 'all' or 'none'")
    p.add_argument("--stream-check", action="store_true")
    p.add_argument("--stream-variants", default="baseline,best")
    p.add_argument("--stream-rows", type=int, default=50_000)
    p.add_argument("--stream-batch", type=int, default=512)
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse()
    if ns.child:
        child_main(ns.child, ns.data, ns.out)
    else:
        main(ns)
