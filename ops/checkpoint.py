"""Crash-safe checkpoints of every arm, the source position and the metrics history.

Layout: STATE/checkpoints/ckpt-<window:06d>/{meta.json, arms-rank<r>.pt}, and
STATE/checkpoints/LATEST naming the newest complete one. A checkpoint is written into a
temporary directory, every file fsynced, then renamed into place (atomic), and only then is
LATEST replaced (atomically); the previous checkpoints stay until a newer one is complete.
Tensors are loaded with torch.load(weights_only=True).

Sharded tensors (TorchRec's table-wise shards) are stored as their local shards, so each
rank saves and restores its own part; a world of one holds whole tables.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.stream.atomic import fsync_dir, write_bytes, write_json
from dimstream.stream.schema import Schema

log = logging.getLogger(__name__)
KEEP = 3


class CheckpointError(RuntimeError):
    pass


def _flatten(state: dict) -> dict:
    """Replace ShardedTensors by the list of their local shard tensors (plain tensors)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, ShardedTensor):
            out[k] = [s.tensor.detach().clone() for s in v.local_shards()]
        elif isinstance(v, dict):
            out[k] = _flatten(v)
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
        else:
            out[k] = v
    return out


def _restore(target: dict, saved: dict, where: str) -> None:
    """Copy saved tensors into the live tensors of `target` (a state dict of live views)."""
    for k, v in target.items():
        if k not in saved:
            raise CheckpointError(f"{where}: checkpoint lacks {k!r}")
        s = saved[k]
        if isinstance(v, ShardedTensor):
            shards = v.local_shards()
            if len(shards) != len(s):
                raise CheckpointError(f"{where}: {k!r} has {len(s)} shards saved, {len(shards)} live")
            for live, val in zip(shards, s):
                live.tensor.detach().copy_(val)
        elif isinstance(v, dict):
            _restore(v, s, f"{where}.{k}")
        elif isinstance(v, torch.Tensor):
            v.detach().copy_(s)


def arm_state(arm) -> dict:
    return {
        "model": _flatten(arm.model.state_dict()),
        "fused": _flatten(arm.model.fused_optimizer.state_dict()["state"]),
        "dense": arm.dense_optimizer.state_dict(),
    }


def load_arm_state(arm, state: dict) -> None:
    live = arm.model.state_dict()
    _restore(live, state["model"], f"arm {arm.name} model")
    arm.model.load_state_dict(live)  # dense parameters (sharded ones were copied in place)
    _restore(arm.model.fused_optimizer.state_dict()["state"], state["fused"], f"arm {arm.name} optimizer")
    arm.dense_optimizer.load_state_dict(state["dense"])


def _dirs(state_dir: Path) -> Path:
    d = Path(state_dir) / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save(state_dir: Path, window: int, meta: dict, arms: list, rank: int = 0) -> Path:
    """Write checkpoint `window` (meta + every arm's tensors); returns its directory."""
    root = _dirs(state_dir)
    final = root / f"ckpt-{window:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".ckpt-{window:06d}.", dir=root))
    try:
        blob = {a.name: arm_state(a) for a in arms}
        blob["rng"] = {"torch": torch.get_rng_state()}
        with open(tmp / f"arms-rank{rank}.pt", "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        write_json(tmp / "meta.json", meta)
        fsync_dir(tmp)
        if final.exists():  # a checkpoint of this window from an earlier, interrupted run
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_bytes(root / "LATEST", final.name.encode())
    _prune(root)
    return final


def _prune(root: Path) -> None:
    done = sorted(p for p in root.glob("ckpt-*") if p.is_dir())
    for p in done[:-KEEP]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".ckpt-*"):  # temporaries of crashed writers
        shutil.rmtree(p, ignore_errors=True)


def latest(state_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None. Falls back past a broken LATEST pointer."""
    root = Path(state_dir) / "checkpoints"
    if not root.exists():
        return None
    candidates = []
    pointer = root / "LATEST"
    if pointer.exists():
        candidates.append(root / pointer.read_text().strip())
    candidates += sorted((p for p in root.glob("ckpt-*") if p.is_dir()), reverse=True)
    for c in candidates:
        if (c / "meta.json").exists():
            try:
                json.loads((c / "meta.json").read_text())
                return c
            except ValueError:
                log.warning("checkpoint %s has a corrupt meta.json; trying an older one", c)
    return None


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt}/meta.json: {e}") from None


def read_tensors(ckpt: Path, rank: int = 0) -> dict:
    path = Path(ckpt) / f"arms-rank{rank}.pt"
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # corrupt or truncated file: say which, never half-load
        raise CheckpointError(f"cannot load {path}: {e}") from None


@dataclass
class Restored:
    """Arms rebuilt from a checkpoint, with what they were built for."""

    checkpoint: Path
    meta: dict
    schema: Schema
    model: ModelConfig
    arms: dict[str, Arm]


def load_arms(ckpt: Path, names: list[str] | None = None, rank: int = 0, restore_rng: bool = False) -> Restored:
    """The one restore path (daemon, `dimstream search`, `dimstream export`): the arms `names`
    (default: all, in checkpoint order) of checkpoint `ckpt`, built and loaded. The torch RNG
    is left as the caller had it (building an arm seeds it), or set to the checkpoint's with
    `restore_rng` (the daemon resuming: training continues as if never stopped)."""
    rng = torch.get_rng_state()
    meta = read_meta(ckpt)
    schema = Schema.from_dict(meta["schema"])
    model = ModelConfig.from_dict(meta["model"])
    specs = {a["name"]: ArmSpec(a["name"], a["dims"], a["column_ids"]) for a in meta["arms"]}
    names = list(specs) if names is None else list(names)
    missing = [n for n in names if n not in specs]
    if missing:
        raise CheckpointError(
            f"checkpoint {Path(ckpt).name} has no arm {', '.join(map(repr, missing))} (it has {', '.join(specs)})"
        )
    tensors = read_tensors(ckpt, rank)
    arms = {}
    for n in names:
        arm = Arm(specs[n], schema.num_embeddings, schema.multi_valued, model)
        load_arm_state(arm, tensors[n])
        arms[n] = arm
    torch.set_rng_state(tensors["rng"]["torch"] if restore_rng else rng)
    return Restored(Path(ckpt), meta, schema, model, arms)
