"""`dimstream export` (an arm of the last checkpoint, for serving) and `dimstream predict`."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import torch

from dimstream.ops.config import ConfigError
from dimstream.stream.atomic import fsync_dir, write_bytes


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


def export_weights(arm) -> dict:
    """The arm's weights under serving names, its tables gathered whole (collective)."""
    from dimstream.models.ctr import ctr_model
    from dimstream.models.serving import serving_weights
    from dimstream.models.tiers import field_tables
    from dimstream.ops.checkpoint import arm_state

    # a tiered arm (AutoSrh's frequency tiers) is served as field tables (models/tiers.py)
    return field_tables(serving_weights(arm_state(arm)["model"]), ctr_model(arm).embedding)


def export_model(arm, meta: dict, out: Path, weights: dict | None = None, extra: dict | None = None) -> Path:
    """Write the live `arm` with the checkpoint `meta` it belongs to (schema, model, window) to
    directory `out`, atomically replaced: what the daemon publishes after each window. Under
    torchrun every rank gathers the `weights` (`export_weights`), rank 0 writes them."""
    from dimstream.models.serving import FORMAT, vocab_header

    weights = export_weights(arm) if weights is None else weights
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    _durable(torch.save, weights, tmp / "weights.pt")
    header = {"format": FORMAT, "arm": arm.name, "checkpoint": f"ckpt-{meta['history_length'] - 1:06d}"}
    header |= {"window": meta["history_length"] - 1, "schema": meta["schema"], "dims": arm.dims}
    header |= {"model": meta["model"], "hashing": HASHING, "precision": arm.precision} | (extra or {})
    vocab = vocab_header(weights, meta["schema"])
    if vocab:  # managed fields: their mapping is in weights.pt (vocab_<field>/raw_ids, /rows)
        header["vocab"] = vocab
    _replace_dir(tmp, out, header)
    return out


HASHING = "dimstream.stream.hashing.hash_ids (splitmix64 / FNV-1a / bijective small ints)"


def _durable(save, obj, path: Path) -> None:
    """Write with `save(obj, path)`, then fsync the file: a version is complete before it is named."""
    save(obj, path)
    _fsync(path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_dir(tmp: Path, out: Path, header: dict) -> None:
    """model.json written last into `tmp`, everything fsynced, then `tmp` renamed to `out`."""
    _durable(lambda h, p: p.write_text(json.dumps(h, indent=1)), header, tmp / "model.json")
    fsync_dir(tmp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


class Publisher:
    """EXPORT_DIR for serving (README "Serving"): a full base every `base_every` windows, a delta
    in between (the rows each table changed since the last publication, plus the dense weights,
    plus the whole id -> row mapping of each managed field: two int64 per live id; a row
    re-drawn for a new id is a changed row, so it is in the delta's rows);
    `latest` is moved only once the version is durable. A new allocation (the slim arm's
    re-allocation re-shapes its tables) or a restart (no weights held to diff against) forces
    a base. Holds one copy of the published weights, rank 0 only."""

    def __init__(self, export_dir: Path, base_every: int = 24):
        self.dir, self.base_every = Path(export_dir), int(base_every)
        for stale in self.dir.glob(".window-*"):  # a crash mid-publication left it unnamed
            shutil.rmtree(stale, ignore_errors=True)
        self._last: dict | None = None
        self._layout = None
        self._chain: list[str] = []

    def publish(self, index: int, arm, meta: dict, weights: dict) -> Path:
        name = f"window-{index:06d}"
        layout = _layout(arm, meta)
        is_base = self._last is None or layout != self._layout or len(self._chain) >= self.base_every
        chain = [name] if is_base else self._chain + [name]
        stamp = {"kind": "base" if is_base else "delta", "chain": chain, "published_at": time.time()}
        if is_base:
            out = export_model(arm, meta, self.dir / name, weights, stamp)
        else:
            out = self._delta(arm, meta, self.dir / name, weights, stamp)
        write_bytes(self.dir / "latest", f"{name}\n".encode())  # the version is durable: name it
        self._last = {k: v.detach().clone() for k, v in weights.items()}
        self._layout, self._chain = layout, chain
        return out

    def _delta(self, arm, meta: dict, out: Path, weights: dict, stamp: dict) -> Path:
        from dimstream.models.serving import FORMAT, VOCAB, save_tensors, vocab_header

        rows, dense, vocab, changed = {}, {}, {}, {}
        for k, v in weights.items():
            if k.startswith("head."):
                dense[k] = v
                continue
            if k.startswith(VOCAB):  # a managed field's mapping: whole, in every delta
                vocab[k] = v
                continue
            ids = torch.nonzero((v != self._last[k]).any(dim=1)).flatten()
            rows[f"{k}/ids"], rows[f"{k}/rows"] = ids, v[ids]
            changed[k] = int(ids.numel())
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        _fsync(save_tensors(rows, tmp / "rows"))
        _fsync(save_tensors(dense, tmp / "dense"))
        header = {"format": FORMAT, "arm": arm.name, "checkpoint": f"ckpt-{meta['history_length'] - 1:06d}"}
        header |= {"window": meta["history_length"] - 1, "dims": arm.dims, "tables": changed} | stamp
        if vocab:
            _fsync(save_tensors(vocab, tmp / "vocab"))
            header["vocab"] = vocab_header(vocab, meta["schema"])
        _replace_dir(tmp, out, header)
        return out


def _layout(arm, meta: dict):
    """What a delta cannot change: the arm, its dims and kept columns, the schema, the model."""
    spec = next((a for a in meta.get("arms", []) if a["name"] == arm.name), {})
    key = (arm.name, arm.dims, spec.get("column_ids"), meta["schema"], meta["model"])
    return json.dumps(key, sort_keys=True, default=str)


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
