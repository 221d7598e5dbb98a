"""dimstream side by side with the CTR libraries a user would pick, on identical rows (issue 15).

Four systems train DeepFM, one pass, on the same rows of the Criteo-shaped synthetic stream of
benchmarks/training.py (26 categorical + 13 numeric fields, dim 16, MLP (256, 128), batch 2048):
  - dimstream: `Arm.train_step` on SparseBatch slices, the arm benchmarks/training.py builds
    (its ModelConfig defaults: fused sparse optimizer in backward, Adam on the dense part);
    its default precision is `auto` (bf16 where the CPU computes it natively): there, the same
    arm at fp32 too (dimstream-fp32);
  - handwritten: plain PyTorch, one `EmbeddingBag(sparse=True)` over all fields + SparseAdam,
    Adam on the dense part;
  - deepctr-torch 0.3.0: `DeepFM(...).fit` as its README shows it;
  - fuxictr 2.3.10: its model zoo's DeepFM composition of its own layers (FeatureEmbedding,
    FactorizationMachine, MLP_Block) trained by its `BaseModel.train_epoch` / `train_step`
    (Adam, gradient clipping at norm 10) on tensor batches.
The rows are generated and decoded once by dimstream (hashing ids into table rows, numerics
into 64 log2 buckets) and written to .npy files; every system reads those same files, so all of
them train on the same 39 embedded fields with the same table sizes. Each system runs in its
own process (dimstream and handwritten with dimstream's .venv python, the peers with
benchmarks/peers/.venv's, never dimstream's), interleaved, REPS rounds (the start rotates each
round). Reported per system: rows/s of the one training pass (the whole pass, including each
system's own batching of the arrays), holdout AUC and log-loss (computed here from the child's
predictions, one implementation for all), and the child's peak RSS (getrusage via wait4).

Writes benchmarks/results/peers.json.  Run: make peers-venv && .venv/bin/python benchmarks/peers.py
(`--train-rows`, `--holdout-rows`, `--reps`, `--threads`; `--child` is the children's entry).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEERS_PY = ROOT / "benchmarks" / "peers" / ".venv" / "bin" / "python"
OWN_PY = Path(sys.executable)
BATCH, DIM, MLP = 2048, 16, (256, 128)
LR = 1e-3  # the peers' default Adam learning rate, also the handwritten loop's
SYSTEMS = ("dimstream", "dimstream-fp32", "handwritten", "deepctr-torch", "fuxictr")
OWN = ("dimstream", "dimstream-fp32")  # dimstream at its default precision (auto), and at fp32
BASELINES = ("handwritten", "deepctr-torch", "fuxictr")
PEER_SYSTEMS = ("deepctr-torch", "fuxictr")
DRIVERS = {  # what each system's timed pass runs, from the same arrays in memory
    "dimstream": "Arm.train_step on SparseBatch slices (KJT built per batch), benchmarks/training.py's arm",
    "dimstream-fp32": "the same, ModelConfig.precision 'fp32' (run where the default auto resolves to bf16)",
    "handwritten": "nn.EmbeddingBag(sparse=True) over one offset table + SparseAdam, Adam on the dense part",
    "deepctr-torch": "DeepFM.fit(x dict of numpy columns, batch_size 2048, epochs 1, shuffle False), no L2",
    "fuxictr": "model zoo DeepFM from fuxictr layers; BaseModel.train_epoch (Adam, clip 10) on tensor dicts",
}
TARGETS = {"deepctr-torch": 4.0, "fuxictr": 4.0, "handwritten": 2.5}  # issue 15: dimstream rows/s at least


# ---------------------------------------------------------------- rows (parent, dimstream venv)


def write_rows(folder: Path, train_rows: int, holdout_rows: int) -> dict:
    """Decode the stream's first `train_rows` rows (training) and the first `holdout_rows` of the
    next window (holdout) into table-row ids [N, F], written as .npy files every child reads."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from training import criteo_source

    from dimstream.stream.decode import Decoder

    src = criteo_source()
    names = src.schema.feature_names
    decoder = Decoder(src.schema)
    train_windows = -(-train_rows // src.rows_per_window)

    def window(w: int, rows: int):
        sb = decoder.decode(src.window_table(w).slice(0, rows)).batch
        for k in names:  # every field of this stream has exactly one id per row
            assert np.array_equal(np.diff(sb.offsets[k]), np.ones(len(sb), np.int64)), k
        return np.stack([sb.values[k] for k in names], axis=1), sb.labels

    parts = [window(w, min(src.rows_per_window, train_rows - w * src.rows_per_window)) for w in range(train_windows)]
    ids, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    hold_ids, hold_labels = window(train_windows, holdout_rows)
    arrays = {"train_ids": ids, "train_labels": labels, "holdout_ids": hold_ids, "holdout_labels": hold_labels}
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(a))
    meta = {
        "fields": names,
        "vocab": [int(src.schema.num_embeddings[k]) for k in names],
        "train_rows": len(labels),
        "holdout_rows": len(hold_labels),
        "train_windows": list(range(train_windows)),
        "holdout_window": train_windows,
        "train_ctr": float(labels.mean()),
        "holdout_ctr": float(hold_labels.mean()),
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def read_rows(folder: Path) -> tuple[dict, dict]:
    """What every child loads: the arrays and meta.json written by `write_rows`."""
    meta = json.loads((folder / "meta.json").read_text())
    names = ("train_ids", "train_labels", "holdout_ids", "holdout_labels")
    return meta, {n: np.load(folder / f"{n}.npy") for n in names}


def batches(n: int):
    """(start, stop) of every mini-batch of one pass in order; the last one may be short."""
    return [(s, min(s + BATCH, n)) for s in range(0, n, BATCH)]


# ---------------------------------------------------------------- children, one per system


def child_dimstream(meta: dict, rows: dict, precision: str | None = None) -> tuple[float, np.ndarray, dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from training import _arm, criteo_source

    from dimstream.stream.batch import SparseBatch

    src = criteo_source()
    assert src.schema.feature_names == meta["fields"]
    arm = _arm(src, precision=precision)  # benchmarks/training.py's arm: ModelConfig defaults, dim 16, batch 2048

    def sparse(ids, labels):
        n = len(labels)
        offsets = np.arange(n + 1, dtype=np.int64)
        values = {k: np.ascontiguousarray(ids[:, j]) for j, k in enumerate(meta["fields"])}
        return SparseBatch(
            meta["fields"], values, dict.fromkeys(meta["fields"], offsets), labels, np.zeros(n, np.int64)
        )

    train = sparse(rows["train_ids"], rows["train_labels"])
    t0 = time.perf_counter()
    for s, e in batches(len(train)):
        arm.train_step(train.slice(s, e))
    seconds = time.perf_counter() - t0
    probs = arm.predict(sparse(rows["holdout_ids"], rows["holdout_labels"]))
    cfg = arm.config.to_dict()
    return seconds, probs, {"params": _params(arm.model), "config": cfg}


def child_handwritten(meta: dict, rows: dict) -> tuple[float, np.ndarray, dict]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    fields, vocab = len(meta["fields"]), meta["vocab"]
    base = torch.tensor(np.concatenate([[0], np.cumsum(vocab)[:-1]]), dtype=torch.int64)

    class DeepFM(nn.Module):
        """first order + FM + DNN over [B, F * dim]; one table holds every field's rows."""

        def __init__(self):
            super().__init__()
            self.emb = nn.EmbeddingBag(sum(vocab), DIM, mode="sum", sparse=True)
            self.wide = nn.EmbeddingBag(sum(vocab), 1, mode="sum", sparse=True)
            nn.init.uniform_(self.emb.weight, -0.05, 0.05)
            nn.init.zeros_(self.wide.weight)
            sizes = [fields * DIM, *MLP]
            layers = [m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
            self.dnn = nn.Sequential(*layers, nn.Linear(sizes[-1], 1))
            self.bias = nn.Parameter(torch.zeros(1))

        def forward(self, ids):  # ids [B, F], already offset into the one table
            flat = ids.reshape(-1, 1)  # one bag per (row, field)
            v = self.emb(flat).view(len(ids), fields, DIM)
            s = v.sum(dim=1)
            fm = 0.5 * (s * s - (v * v).sum(dim=1)).sum(dim=1)
            wide = self.wide(ids)[:, 0]  # a bag per row: the sum of its fields' scalars
            return self.bias + wide + fm + self.dnn(v.reshape(len(ids), -1)).squeeze(-1)

    model = DeepFM()
    sparse = torch.optim.SparseAdam([model.emb.weight, model.wide.weight], lr=LR)
    dense = torch.optim.Adam(
        [p for n, p in model.named_parameters() if not n.endswith(("emb.weight", "wide.weight"))], lr=LR
    )
    loss_fn = nn.BCEWithLogitsLoss()
    ids, labels = rows["train_ids"], rows["train_labels"]
    t0 = time.perf_counter()
    for s, e in batches(len(labels)):
        x = torch.from_numpy(ids[s:e]) + base
        loss = loss_fn(model(x), torch.from_numpy(labels[s:e]))
        sparse.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        loss.backward()
        sparse.step()
        dense.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        x = torch.from_numpy(rows["holdout_ids"]) + base
        probs = torch.cat([torch.sigmoid(model(x[s:e])) for s, e in batches(len(x))]).numpy()
    return seconds, probs, {"params": _params(model), "recipe": f"SparseAdam lr {LR} (tables) + Adam lr {LR}"}


def child_deepctr(meta: dict, rows: dict) -> tuple[float, np.ndarray, dict]:
    import deepctr_torch
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DeepFM

    cols = [SparseFeat(f, vocabulary_size=v, embedding_dim=DIM) for f, v in zip(meta["fields"], meta["vocab"])]
    # no L2 penalties (its defaults put 1e-5 on tables and linear part): dimstream has none either
    model = DeepFM(
        cols, cols, dnn_hidden_units=MLP, l2_reg_linear=0, l2_reg_embedding=0, dnn_dropout=0, device="cpu", seed=0
    )
    model.compile("adam", "binary_crossentropy")  # torch.optim.Adam, lr 1e-3

    def x(ids):
        return {f: ids[:, j] for j, f in enumerate(meta["fields"])}

    t0 = time.perf_counter()
    model.fit(x(rows["train_ids"]), rows["train_labels"], batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    seconds = time.perf_counter() - t0
    probs = model.predict(x(rows["holdout_ids"]), batch_size=8192).reshape(-1)
    return seconds, probs, {"params": _params(model), "version": deepctr_torch.__version__}


def child_fuxictr(meta: dict, rows: dict) -> tuple[float, np.ndarray, dict]:
    import logging
    from collections import OrderedDict

    import fuxictr
    import torch
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    logging.disable(logging.INFO)
    fmap = FeatureMap("peers", tempfile.gettempdir())
    fmap.features = OrderedDict(
        (f, {"type": "categorical", "source": "", "vocab_size": v}) for f, v in zip(meta["fields"], meta["vocab"])
    )
    fmap.labels, fmap.default_emb_dim = ["label"], DIM
    fmap.num_fields = fmap.get_num_fields()
    fmap.set_column_index()

    class DeepFM(BaseModel):
        """The model zoo's DeepFM (model_zoo/DeepFM/DeepFM_torch), which the pip wheel leaves out:
        FM (LR part included) over its FeatureEmbedding plus an MLP_Block on the flattened embeddings."""

        def __init__(self, feature_map, **kwargs):
            super().__init__(feature_map, model_id="DeepFM", gpu=-1, **kwargs)
            self.embedding_layer = FeatureEmbedding(feature_map, DIM)
            self.fm = FactorizationMachine(feature_map)
            self.mlp = MLP_Block(
                input_dim=feature_map.sum_emb_out_dim(),
                output_dim=1,
                hidden_units=list(MLP),
                hidden_activations="ReLU",
                output_activation=None,
                dropout_rates=0,
                batch_norm=False,
            )
            self.compile(kwargs["optimizer"], kwargs["loss"], LR)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            emb = self.embedding_layer(X)
            y = self.fm(X, emb) + self.mlp(emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(y)}

    torch.manual_seed(0)
    model = DeepFM(
        fmap, optimizer="adam", loss="binary_crossentropy", verbose=0, model_root=tempfile.gettempdir(), metrics=["AUC"]
    )

    def gen(ids, labels):
        for s, e in batches(len(labels)):
            part = {f: torch.from_numpy(ids[s:e, j]) for j, f in enumerate(meta["fields"])}
            yield part | {"label": torch.from_numpy(labels[s:e])}

    # what fit() sets before its epochs, less the validation and checkpoint it needs a loader for
    model._max_gradient_norm, model._eval_steps, model._total_steps, model._stop_training = 10.0, 1 << 62, 0, False
    t0 = time.perf_counter()
    model.train_epoch(gen(rows["train_ids"], rows["train_labels"]))
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        probs = torch.cat(
            [model(b)["y_pred"].reshape(-1) for b in gen(rows["holdout_ids"], rows["holdout_labels"])]
        ).numpy()
    return (
        seconds,
        probs,
        {"params": _params(model), "version": fuxictr.__version__, "recipe": f"Adam lr {LR}, clip norm 10"},
    )


CHILDREN = {
    "dimstream": child_dimstream,
    "dimstream-fp32": lambda meta, rows: child_dimstream(meta, rows, "fp32"),
    "handwritten": child_handwritten,
    "deepctr-torch": child_deepctr,
    "fuxictr": child_fuxictr,
}


def _params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def child_main(system: str, folder: Path, out: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    meta, rows = read_rows(folder)
    seconds, probs, info = CHILDREN[system](meta, rows)
    np.save(out.with_suffix(".npy"), np.asarray(probs, np.float32).reshape(-1))
    info |= {
        "seconds": seconds,
        "rows": meta["train_rows"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(info))


# ---------------------------------------------------------------- parent


def run_child(system: str, folder: Path, threads: int) -> dict:
    """One training run in its own process; peak RSS from the child's own rusage (wait4)."""
    py = PEERS_PY if system in PEER_SYSTEMS else OWN_PY
    out = folder / f"{system}.json"
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"}
    cmd = [str(py), str(Path(__file__).resolve()), "--child", system, "--data", str(folder), "--out", str(out)]
    load = _load()
    proc = subprocess.Popen([*cmd, "--threads", str(threads)], env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{system} failed (exit {proc.returncode}): {' '.join(cmd)}")
    info = json.loads(out.read_text())
    info["probs"] = np.load(out.with_suffix(".npy"))
    info["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    info["load_average_before_after"] = [load, _load()]
    return info


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main(args) -> None:
    if not PEERS_PY.exists():
        raise SystemExit(f"the peers' venv is missing ({PEERS_PY.parent.parent}): run `make peers-venv` first")
    from dimstream.models.config import ModelConfig, resolve_precision
    from dimstream.models.evaluation import auc, logloss

    threads = args.threads or (1 if (_load() or 0) >= 1.0 else os.cpu_count())
    # an fp32 child too where the default (auto) resolves to bf16: the precision's share
    default = resolve_precision(ModelConfig().precision, "cpu")
    systems = [s for s in SYSTEMS if s != "dimstream-fp32" or default != "fp32"]
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="dimstream-peers-") as tmp:
        folder = Path(tmp)
        meta = write_rows(folder, args.train_rows, args.holdout_rows)
        labels = np.load(folder / "holdout_labels.npy")
        order = []
        for rep in range(args.reps):
            for system in systems[rep % len(systems) :] + systems[: rep % len(systems)]:
                info = run_child(system, folder, threads)
                probs = info.pop("probs")
                info |= {"holdout_auc": auc(labels, probs), "holdout_logloss": logloss(labels, probs)}
                info["rows_per_s"] = info["rows"] / info["seconds"]
                runs[system].append(info)
                order.append(system)
                line = f"{info['rows_per_s']:9.0f} rows/s  AUC {info['holdout_auc']:.4f}"
                print(f"rep {rep}: {system:14s} {line}  RSS {info['peak_rss_mib']:.0f} MiB", flush=True)
    result = report(runs, meta, threads, order, args)
    out = args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("systems", "ratios", "checks")}, indent=1))


def report(runs: dict, meta: dict, threads: int, order: list[str], args) -> dict:
    systems = {}
    for s, infos in runs.items():
        first = {
            k: v for k, v in infos[0].items() if k in ("params", "config", "recipe", "version", "torch", "threads")
        }
        systems[s] = first | {
            "driver": DRIVERS[s],
            "rows_per_s": summary([i["rows_per_s"] for i in infos]),
            "holdout_auc": summary([i["holdout_auc"] for i in infos]),
            "holdout_logloss": summary([i["holdout_logloss"] for i in infos]),
            "peak_rss_mib": summary([i["peak_rss_mib"] for i in infos]),
            "load_average_before_after": [i["load_average_before_after"] for i in infos],
        }
    speed = {s: v["rows_per_s"]["median"] for s, v in systems.items()}
    auc = {s: v["holdout_auc"]["median"] for s, v in systems.items()}
    best_peer_auc = max(auc[s] for s in BASELINES)
    ratios, checks = {}, {}
    for own in (s for s in OWN if s in systems):
        name, tag = own.replace("-", "_"), "" if own == "dimstream" else "fp32_"
        ratios |= {f"{name}_over_{s}": speed[own] / speed[s] for s in BASELINES}
        ratios |= {f"{name}_auc_minus_{s}": auc[own] - auc[s] for s in BASELINES}
        ratios[f"{name}_auc_minus_best_peer"] = auc[own] - best_peer_auc
        checks |= {f"{tag}at_least_{t}x_{s}": speed[own] >= t * speed[s] for s, t in TARGETS.items()}
        checks[f"{tag}auc_at_least_best_peer"] = auc[own] >= best_peer_auc
    return {
        "what": (
            "DeepFM, one pass over identical rows of the Criteo-shaped synthetic stream (26 categorical"
            " + 13 numeric fields, all 39 embedded as table rows decoded by dimstream), dim 16, MLP (256, 128),"
            " batch 2048; each system in its own process, interleaved; rows/s of the whole training pass"
        ),
        "params_note": (
            "same architecture: dimstream's count is higher only because its first-order weights are width-4"
            " tables whose 4 columns are summed (FBGEMM's fused kernels need widths in multiples of 4)"
        ),
        "command": ".venv/bin/python benchmarks/peers.py"
        + (f" --train-rows {args.train_rows} --holdout-rows {args.holdout_rows} --reps {args.reps}")
        + (f" --threads {args.threads}" if args.threads else ""),
        "sizes": meta | {"batch": BATCH, "dim": DIM, "mlp": list(MLP), "reps": args.reps},
        "machine": {
            "cpus": os.cpu_count(),
            "threads_per_child": threads,
            "python": platform.python_version(),
            "processor": _cpu_model(),
            "load_average_at_end": _load(),
        },
        "order": order,
        "systems": systems,
        "ratios": ratios,
        "targets": {"rows_per_s_at_least_x": TARGETS, "auc": "dimstream's holdout AUC at least the best peer's"},
        "checks": checks,
    }


def _load() -> float | None:
    """1-minute load average: other processes on the machine slow every figure down."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    except OSError:
        return ""


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, default=500_000)
    p.add_argument("--holdout-rows", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads per child (0: 1 if the load average >= 1, else all cores)"
    )
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json", help="where to write")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse()
    if ns.child:
        child_main(ns.child, ns.data, ns.out, ns.threads or 1)
    else:
        main(ns)
