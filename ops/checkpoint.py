"""Crash-safe checkpoints of every arm, the source position and the metrics history.

Layout: STATE/checkpoints/ckpt-<window:06d>/{meta.json, arms-rank<r>.pt, complete-rank<r>.json},
and STATE/checkpoints/LATEST naming the newest complete one. A checkpoint is written into a
temporary directory, every file fsynced, the completion marker (complete-rank<r>.json: the size
and sha256 of every other file) last, then renamed into place (atomic), and only then is
LATEST replaced (atomically); the previous checkpoints stay until a newer one is complete.
`latest` takes the newest checkpoint whose marker exists and whose files match it: a file cut
short or damaged after the fact, or a garbled LATEST, falls back to the older checkpoint with a
WARNING. Tensors are loaded with torch.load(weights_only=True).

Sharded tensors (TorchRec's table-wise shards) are stored as their local shards, so each
rank saves and restores its own part; a world of one holds whole tables.
"""

from __future__ import annotations

import hashlib
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
MARKER_FORMAT = 1
_HASH_CHUNK = 1 << 20


def marker_name(rank: int = 0) -> str:
    """The completion marker of rank `rank`'s part, written last into the checkpoint."""
    return f"complete-rank{rank}.json"


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
        tensors = f"arms-rank{rank}.pt"
        with open(tmp / tensors, "wb") as f:
            hashing = _HashingWriter(f)
            torch.save(blob, hashing)
            f.flush()
            os.fsync(f.fileno())
        write_json(tmp / "meta.json", meta)
        files = {tensors: hashing.digest(), "meta.json": _file_digest(tmp / "meta.json")}
        write_json(tmp / marker_name(rank), {"format": MARKER_FORMAT, "files": files})  # last
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


class _HashingWriter:
    """A file object for torch.save that hashes what it writes (no second read of the file)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def digest(self) -> dict:
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def _file_digest(path: Path) -> dict:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}


def verify(ckpt: Path, rank: int = 0) -> str | None:
    """None if checkpoint `ckpt` is complete (its marker exists, every file it names has the
    size and sha256 it records, meta.json is JSON), else what is wrong with it."""
    ckpt = Path(ckpt)
    try:
        marker = json.loads((ckpt / marker_name(rank)).read_bytes())
        files = marker["files"]
        if not isinstance(files, dict) or not {"meta.json", f"arms-rank{rank}.pt"} <= set(files):
            return f"its completion marker {marker_name(rank)} does not name its files"
    except FileNotFoundError:
        return f"it has no completion marker {marker_name(rank)} (incomplete, or written by an older dimstream)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its completion marker {marker_name(rank)} is unreadable ({e})"
    for name, want in files.items():
        path = ckpt / name
        try:
            size = path.stat().st_size
            if not isinstance(want, dict) or size != want.get("bytes"):
                return (
                    f"{name} has {size:,} bytes, the marker says {want.get('bytes') if isinstance(want, dict) else '?'}"
                )
            if _file_digest(path)["sha256"] != want.get("sha256"):
                return f"{name} does not match its sha256 in the marker"
        except OSError as e:
            return f"cannot read {name}: {e.strerror or e}"
    try:
        json.loads((ckpt / "meta.json").read_bytes())
    except ValueError:
        return "its meta.json is not JSON"
    return None


def checkpoint_dirs(state_dir: Path) -> list[Path]:
    """Every checkpoint directory of the state dir, newest first (complete or not)."""
    root = Path(state_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted((p for p in root.glob("ckpt-*") if p.is_dir()), reverse=True)


def latest(state_dir: Path, rank: int = 0) -> Path | None:
    """The newest complete checkpoint (`verify`), or None. Falls back past a broken LATEST
    pointer and past a checkpoint whose files do not match its marker, logging a WARNING."""
    root = Path(state_dir) / "checkpoints"
    if not root.exists():
        return None
    candidates = []
    pointer = root / "LATEST"
    if pointer.exists():
        try:
            name = pointer.read_bytes().decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            name = None
        if name and (root / name).is_dir() and Path(name).name == name and name.startswith("ckpt-"):
            candidates.append(root / name)
        else:
            log.warning("%s does not name a checkpoint; looking for the newest complete one", pointer)
    candidates += [c for c in checkpoint_dirs(state_dir) if c not in candidates]
    for c in candidates:
        problem = verify(c, rank)
        if problem is None:
            return c
        log.warning("skipping checkpoint %s: %s; trying an older one", c, problem)
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
