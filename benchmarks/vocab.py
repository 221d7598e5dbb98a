"""Managed ids against hashing on a churning synthetic stream -> benchmarks/results/vocab.json.

The stream (stream/synthetic.py with `churn`): a user field and an item field whose ids churn
(a share of their popularity slots takes a new id with a new latent factor every window), and
four small hashed fields. Three DeepFM arms train test-then-train under DMP (world size 1) on
the same rows, with the same embedding tables (rows x width per field, so equal embedding
memory), and differ only in how the churned fields find their rows:
  hash         -- the hashing trick into `--rows-user` / `--rows-item` rows (today's default);
  managed_lfu  -- managed vocab, capacity = those rows, LFU eviction;
  managed_lru  -- the same with LRU eviction;
  managed_lru_admit -- LRU with `admit_after = --admit-after` (an id needs that many
                  occurrences before it may take a row: one-off tail ids stop churning the table).
Per window: progressive AUC and log-loss of each arm, the Bayes AUC (true probabilities),
training rows/s, decode rows/s, and each managed field's rows in use, admissions, evictions and
default-row share. The summary: mean AUC over windows 2.. per arm, its difference to hash, and
the training-throughput cost of managed ids; `remap_cost_user_id`: the vocabulary's own
admit + remap time per mini-batch, measured apart from training. The extra state of a managed field (sorted ids,
row mapping and a count or last access per row: 3 int64 per row) is reported beside the
tables' bytes: that memory is not embedding memory and is not hidden.

Run from the repository root:
    .venv/bin/python benchmarks/vocab.py [--windows 12] [--rows 20000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.models.distributed import progressive_val_score
from dimstream.models.evaluation import window_metrics
from dimstream.models.vocab import ManagedVocab
from dimstream.stream.decode import Decoder
from dimstream.stream.schema import FieldSpec, Schema
from dimstream.stream.synthetic import TRUTH_COLUMN, SyntheticField, SyntheticSource

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "vocab.json"
FIELDS = (
    SyntheticField("user_id", 50_000, 4, zipf=1.1),
    SyntheticField("item_id", 10_000, 4, zipf=1.1),
    SyntheticField("category", 300, 6),
    SyntheticField("hour_of_day", 24, 2, zipf=0.0),
    SyntheticField("os", 20, 2),
    SyntheticField("gender", 2, 1, zipf=0.0),
)
CHURNED = ("user_id", "item_id")
DIM = 16


def schema_for(src: SyntheticSource, rows: dict, vocab: str, eviction: str = "lfu", admit_after: int = 1) -> Schema:
    """The source's schema with the churned fields at `rows` rows, hashed or managed."""
    out = []
    for f in src.schema.fields:
        if f.name not in rows:
            out.append(f)
        elif vocab == "hash":
            out.append(FieldSpec(f.name, f.kind, rows[f.name]))
        else:
            out.append(
                FieldSpec(
                    f.name,
                    f.kind,
                    rows[f.name],
                    vocab="managed",
                    capacity=rows[f.name],
                    eviction=eviction,
                    admit_after=admit_after,
                )
            )
    return Schema(out)


def run(args) -> dict:
    source_kw = dict(seed=args.seed, rows_per_window=args.rows, fields=FIELDS, churn=dict(zip(CHURNED, args.churn)))
    src = SyntheticSource(**source_kw)
    rows = {"user_id": args.rows_user, "item_id": args.rows_item}
    cfg = ModelConfig("deepfm", mlp=(64, 32), batch_size=args.batch_size, seed=args.seed)
    arms = {
        "hash": schema_for(src, rows, "hash"),
        "managed_lfu": schema_for(src, rows, "managed", "lfu"),
        "managed_lru": schema_for(src, rows, "managed", "lru"),
        "managed_lru_admit": schema_for(src, rows, "managed", "lru", args.admit_after),
    }
    built = {}
    for name, schema in arms.items():
        dims = {f: DIM for f in schema.feature_names}
        built[name] = (
            Arm(ArmSpec(name, dims), schema.num_embeddings, schema.multi_valued, cfg, managed=schema.managed),
            Decoder(schema),
        )
    windows = []
    for w in range(args.windows):
        table = src.window_table(w)
        p_true = table.column(TRUTH_COLUMN).to_numpy()
        labels = table.column("label").to_numpy().astype(np.float32)
        rec = {"window": w, "bayes_auc": window_metrics(labels, p_true)["auc"], "arms": {}}
        for name, (arm, dec) in built.items():
            decode_s = []
            for _ in range(2):  # the faster of two decodes: the first also pays Arrow's warm-up
                t0 = time.perf_counter()
                batch = dec.decode(table).batch
                decode_s.append(time.perf_counter() - t0)
            decode_s = min(decode_s)
            m = progressive_val_score([arm], batch, args.batch_size)[name]
            rec["arms"][name] = {
                "auc": m["auc"],
                "logloss": m["logloss"],
                "train_rows_per_s": m["train_rows_per_s"],
                "decode_rows_per_s": len(batch) / decode_s,
                "vocab": arm.vocab_stats(),
            }
        windows.append(rec)
        print(
            w, {n: round(a["auc"], 4) for n, a in rec["arms"].items()}, "bayes", round(rec["bayes_auc"], 4), flush=True
        )
    return {"windows": windows, "rows": rows, "source_kw": source_kw}


def remap_cost(src: SyntheticSource, args, rows: dict) -> dict:
    """The managed vocabulary's own cost, apart from training (less exposed to a shared
    machine's noise than whole-step rows/s): a fresh ManagedVocab per policy fed the last
    window's user ids in mini-batches, the median seconds of one batch's admit + remap (the
    least of three passes)."""
    dec = Decoder(schema_for(src, rows, "managed"))
    ids = torch.from_numpy(dec.decode(src.window_table(args.windows - 1)).batch.values["user_id"])
    out = {}
    for name, eviction, admit in (("lfu", "lfu", 1), ("lru", "lru", 1), ("lru_admit", "lru", args.admit_after)):
        medians = []
        for _ in range(3):  # three fresh passes: the least median, a shared machine's spikes aside
            vocab = ManagedVocab("user_id", rows["user_id"], eviction, admit)
            times = []
            for lo in range(0, len(ids), args.batch_size):
                t0 = time.perf_counter()
                vocab(ids[lo : lo + args.batch_size])
                times.append(time.perf_counter() - t0)
            medians.append(float(np.median(times)))
        med = min(medians)
        out[name] = {"median_seconds_per_batch": med, "ids_per_s": args.batch_size / med, "medians": medians}
    return out


def summary(windows: list[dict], rows: dict) -> dict:
    later = windows[2:] or windows
    out = {}
    for name in windows[0]["arms"]:
        auc = [w["arms"][name]["auc"] for w in later]
        rps = [w["arms"][name]["train_rows_per_s"] for w in later]
        out[name] = {
            "mean_auc_from_window_2": float(np.mean(auc)),
            "mean_train_rows_per_s": float(np.mean(rps)),
            "mean_decode_rows_per_s": float(np.mean([w["arms"][name]["decode_rows_per_s"] for w in later])),
        }
    base = out["hash"]
    for s in out.values():
        s["auc_minus_hash"] = s["mean_auc_from_window_2"] - base["mean_auc_from_window_2"]
        s["train_rows_per_s_vs_hash"] = s["mean_train_rows_per_s"] / base["mean_train_rows_per_s"]
    out["bayes_mean_auc_from_window_2"] = float(np.mean([w["bayes_auc"] for w in later]))
    table_bytes = {f: r * DIM * 4 for f, r in rows.items()}
    out["memory_bytes"] = {
        "churned_field_tables_deep": table_bytes,
        "managed_extra_state_per_field": {f: r * 3 * 8 for f, r in rows.items()},
    }
    return out


def _flags(args) -> list[str]:
    out = []
    for k, v in vars(args).items():
        if k != "out":
            out.append(
                f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--rows-user", type=int, default=4096)
    ap.add_argument("--rows-item", type=int, default=2048)
    ap.add_argument("--churn", type=float, nargs=2, default=(0.15, 0.10), metavar=("USER", "ITEM"))
    ap.add_argument("--admit-after", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    res = run(args)
    result = {
        "command": "benchmarks/vocab.py " + " ".join(_flags(args)),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "stream": {
            "fields": [vars(f) for f in FIELDS],
            "churn": dict(zip(CHURNED, args.churn)),
            "rows_per_window": args.rows,
        },
        "rows": res["rows"],
        "summary": summary(res["windows"], res["rows"]),
        "remap_cost_user_id": remap_cost(SyntheticSource(**res["source_kw"]), args, res["rows"]),
        "windows": res["windows"],
        "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(result["summary"], indent=1, default=float))


if __name__ == "__main__":
    main()
