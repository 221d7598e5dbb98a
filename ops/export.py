"""`dimstream export` (an arm of the last checkpoint, for serving) and `dimstream predict`."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import torch

from dimstream.ops.config import ConfigError
from dimstream.stream.atomic import fsync_dir


def register(sub) -> None:
    p = sub.add_parser("export", help="write an arm of the last checkpoint in a self-contained serving form")
    p.add_argument("--state-dir", type=Path, default=Path("dimstream-state"))
    p.add_argument("--arm", default="slim")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_export)
    q = sub.add_parser("predict", help="score Arrow IPC or JSON-lines rows with an exported model")
    q.add_argument("--model", type=Path, required=True, help="directory written by dimstream export")
    q.add_argument("--input", type=Path, required=True, help="rows: .arrow (IPC file/stream) or .jsonl")
    q.add_argument("--output", type=Path, help="write probabilities here (one per line); default stdout")
    q.set_defaults(func=cmd_predict)


def export_arm(state_dir: Path, arm: str, out: Path) -> Path:
    """Write `arm` of the latest checkpoint to directory `out` (atomically replaced)."""
    from dimstream.ops import checkpoint

    ckpt = checkpoint.latest(state_dir)
    if ckpt is None:
        raise ConfigError(f"no checkpoint in {state_dir}")
    try:
        restored = checkpoint.load_arms(ckpt, [arm])
    except checkpoint.CheckpointError as e:
        raise ConfigError(str(e)) from None
    return export_model(restored.arms[arm], restored.meta, out)


def export_model(arm, meta: dict, out: Path) -> Path:
    """Write the live `arm` with the checkpoint `meta` it belongs to (schema, model, window) to
    directory `out`, atomically replaced: what the daemon publishes after each window."""
    from dimstream.models.serving import FORMAT, serving_weights
    from dimstream.ops.checkpoint import arm_state

    weights = serving_weights(arm_state(arm)["model"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    torch.save(weights, tmp / "weights.pt")
    (tmp / "model.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "arm": arm.name,
                "checkpoint": f"ckpt-{meta['history_length'] - 1:06d}",
                "window": meta["history_length"] - 1,
                "schema": meta["schema"],
                "dims": arm.dims,
                "model": meta["model"],
                "hashing": "dimstream.stream.hashing.hash_ids (splitmix64 / FNV-1a / bijective small ints)",
            },
            indent=1,
        )
    )
    fsync_dir(tmp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def read_rows(path: Path) -> pa.Table:
    from dimstream.stream.sources.files import read_ipc

    if path.suffix in (".jsonl", ".json"):
        return pajson.read_json(path)  # bulk, not row by row
    return read_ipc(path)


def predict(model_dir: Path, table: pa.Table) -> np.ndarray:
    """Probabilities for every row the decoder accepts (label and event time may be absent)."""
    from dimstream.models.serving import ServingModel
    from dimstream.stream.decode import Decoder

    model = ServingModel.load(model_dir)
    schema = model.schema
    n = table.num_rows
    if schema.label not in table.column_names:
        table = table.append_column(schema.label, pa.array(np.zeros(n, np.int8)))
    if schema.event_time not in table.column_names:
        table = table.append_column(schema.event_time, pa.array(np.zeros(n, np.int64)))
    result = Decoder(schema).decode(table)
    if result.rejected_counts:
        raise ConfigError(f"rows refused: {result.rejected_counts} ({result.rejected[0].detail})")
    return model(result.batch).numpy()


def cmd_export(args) -> int:
    out = export_arm(args.state_dir, args.arm, args.out)
    print(f"dimstream export: arm {args.arm} -> {out}")
    return 0


def cmd_predict(args) -> int:
    try:
        table = read_rows(args.input)
    except (OSError, pa.ArrowInvalid) as e:
        raise ConfigError(f"cannot read {args.input}: {e}") from None
    probs = predict(args.model, table)
    text = "\n".join(f"{p:.6f}" for p in probs) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0
