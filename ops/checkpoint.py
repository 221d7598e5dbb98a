"""Crash-safe, sharded checkpoints of every arm, the source position and the metrics history.

Layout: STATE/checkpoints/ckpt-<window:06d>/{meta.json, arms-rank0.pt, shards/, complete-rank0.json},
and STATE/checkpoints/LATEST naming the newest complete one.
  - shards/ is a torch.distributed.checkpoint (DCP) checkpoint of every arm's model and fused
    optimizer state: each rank writes the shards it holds (`__<rank>_0.distcp`, fsynced), rank 0
    the `.metadata` naming every shard. DCP loads it at any world size, re-sharding the tables
    for the plan of the loading ranks (2 ranks -> 1, 1 -> 2, a new plan after a re-allocation).
  - arms-rank0.pt (rank 0) holds what every rank holds alike: the dense optimizers' state
    (Adam; DMP keeps the dense part data-parallel), the RNG, and the runner's `extra` state of
    tensors (the stream-long row counts of AutoSrh's tiers, search/counts.py), if any.
A checkpoint is written into a temporary directory (.ckpt-<window>.partial, the same path on
every rank: the state dir is shared, one host or a shared volume); after a barrier, that is
once every rank's part is durable, rank 0 writes the completion marker (complete-rank0.json:
the size and sha256 of every file of every rank) last, renames the directory into place
(atomic) and only then replaces LATEST (atomically); the previous checkpoints stay until a
newer one is complete. A checkpoint a rank died in never gets its marker or its name, so it is
never picked up. `latest` takes the newest checkpoint whose marker exists and whose files
match it: a file cut short or damaged after the fact, or a garbled LATEST, falls back to the
older checkpoint with a WARNING. It hands the checkpoint out pinned (hard links in a private
directory): a reader beside a running daemon (`dimstream search`, `export`) keeps it whole
while it loads it, even if the daemon prunes it meanwhile. Tensors are loaded with
torch.load(weights_only=True) and DCP.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from dimstream.models.distributed import barrier, gather_full, rank, world_size
from dimstream.stream.atomic import fsync_dir, write_bytes, write_json
from dimstream.stream.schema import Schema

log = logging.getLogger(__name__)
KEEP = 3
MARKER_FORMAT = 2  # 2: the marker names every rank's DCP shard files too
_HASH_CHUNK = 1 << 20
REPLICATED = "arms-rank0.pt"
EXTRA = "__extra__"  # the key of `save`'s extra in REPLICATED (no arm has this name)
SHARDS = "shards"


def marker_name(rank: int = 0) -> str:
    """The completion marker, written last into the checkpoint by rank 0 after every rank's part
    is durable (`rank` is kept for callers of the one-marker-per-rank layout; it is always 0)."""
    return f"complete-rank{rank}.json"


class CheckpointError(RuntimeError):
    pass


def _sharded_state(arm) -> dict:
    """The arm's live state that DCP saves and loads in place: the model (sharded tables and
    dense parameters) and the fused optimizer's per-table state."""
    return {"model": arm.model.state_dict(), "fused": arm.model.fused_optimizer.state_dict()["state"]}


def arm_state(arm) -> dict:
    """The arm's whole model state (every sharded table gathered from the ranks that hold it:
    collective, every rank calls it) and its dense optimizer's state: what export publishes."""
    whole = {k: gather_full(v) for k, v in arm.model.state_dict().items()}
    return {"model": whole} | _replicated_state(arm)


def _replicated_state(arm) -> dict:
    """What every rank holds alike (rank 0 writes it): the dense optimizer's state."""
    return {"dense": arm.dense_optimizer.state_dict()}


def load_arm_state(arm, state: dict) -> None:
    """Load arm `state["name"]` of checkpoint `state["checkpoint"]` (`read_tensors`) into `arm`:
    the sharded part through DCP (re-sharded to the arm's plan), then the dense optimizer."""
    live = _sharded_state(arm)
    try:
        dcp.load({state["name"]: live}, checkpoint_id=Path(state["checkpoint"]) / SHARDS)
    except Exception as e:  # a shard missing or unreadable: say which checkpoint, never half-load silently
        raise CheckpointError(f"cannot load arm {arm.name} from {state['checkpoint']}: {e}") from None
    arm.model.load_state_dict(live["model"])  # dense parameters (the sharded ones were loaded in place)
    arm.dense_optimizer.load_state_dict(state["dense"])


def _dirs(state_dir: Path) -> Path:
    d = Path(state_dir) / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save(
    state_dir: Path, window: int, meta: dict, arms: list, rank: int | None = None, extra: dict | None = None
) -> Path:
    """Write checkpoint `window` (meta + every arm's state + `extra`, a dict of tensors and
    numbers that every rank holds alike); returns its directory. Collective: every rank calls
    it and writes its shards; rank 0 the rest, last the marker."""
    me = _rank() if rank is None else rank
    root = _dirs(state_dir)
    final = root / f"ckpt-{window:06d}"
    tmp = root / f".ckpt-{window:06d}.partial"
    if me == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a world that died while writing it
        tmp.mkdir()
    barrier()
    try:
        state = {a.name: _sharded_state(a) for a in arms}
        # one rank: no collectives. DCP's planning collectives over gloo left every later training
        # step of the process slower, the main thread context-switching all the time (README,
        # Figures: the training loop row; benchmarks/training.py)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / SHARDS, sync_files=True), no_dist=world_size() == 1)
        if me == 0:
            _write_replicated(tmp, meta, arms, extra)
        barrier()  # every rank's shards are durable: only now may the marker say so
        if me == 0:
            _seal(tmp, final, root)
    except BaseException:
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()  # no rank goes on before the checkpoint is in place
    return final


def _rank() -> int:
    return rank()


def _write_replicated(tmp: Path, meta: dict, arms: list, extra: dict | None = None) -> None:
    blob = {a.name: _replicated_state(a) for a in arms}
    blob["rng"] = {"torch": torch.get_rng_state()}
    if extra:
        blob[EXTRA] = extra
    with open(tmp / REPLICATED, "wb") as f:
        torch.save(blob, f)
        f.flush()
        os.fsync(f.fileno())
    write_json(tmp / "meta.json", meta)


def _seal(tmp: Path, final: Path, root: Path) -> None:
    """Rank 0, after the barrier: the marker (every file's digest) last, then the rename."""
    fsync_dir(tmp / SHARDS)
    files = {p.relative_to(tmp).as_posix(): _file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json(tmp / marker_name(0), {"format": MARKER_FORMAT, "files": files})  # last
    fsync_dir(tmp)
    if final.exists():  # a checkpoint of this window from an earlier, interrupted run
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    write_bytes(root / "LATEST", final.name.encode())
    _prune(root)


def _prune(root: Path) -> None:
    done = sorted(p for p in root.glob("ckpt-*") if p.is_dir())
    for p in done[:-KEEP]:
        shutil.rmtree(p, ignore_errors=True)
    for p in [*root.glob(".ckpt-*"), *_stale_pins(root)]:  # temporaries of crashed writers and readers
        shutil.rmtree(p, ignore_errors=True)


def _file_digest(path: Path) -> dict:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}


def verify(ckpt: Path, rank: int = 0) -> str | None:
    """None if checkpoint `ckpt` is complete (its marker exists, every file it names, every
    rank's shards included, has the size and sha256 it records, meta.json is JSON), else what is
    wrong with it."""
    ckpt = Path(ckpt)
    try:
        marker = json.loads((ckpt / marker_name(rank)).read_bytes())
        files = marker["files"]
        need = {"meta.json", REPLICATED, f"{SHARDS}/.metadata"}
        if not isinstance(files, dict) or not need <= set(files):
            return f"its completion marker {marker_name(rank)} does not name its files"
        if marker.get("format") != MARKER_FORMAT:
            return f"its completion marker {marker_name(rank)} is of another format (an older dimstream)"
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
        pinned = _pin(c)
        if pinned is None:
            continue  # pruned by the daemon since it was listed: a newer one is complete
        problem = verify(pinned, rank)
        if problem is None:
            return pinned
        if pinned != c:
            shutil.rmtree(pinned.parent, ignore_errors=True)
        log.warning("skipping checkpoint %s: %s; trying an older one", c, problem)
    return None


_PINS: list[Path] = []


def _pin(ckpt: Path) -> Path | None:
    """Checkpoint `ckpt` as hard links in a private directory (`.pin-<pid>-*/<name>`), so a daemon
    pruning it while this process reads it takes nothing from under the reader: reading a
    sharded checkpoint (verify, build the arms, DCP's load) takes seconds, a daemon on short
    windows prunes within that. None if it vanished meanwhile; `ckpt` itself where the
    filesystem has no hard links. The pins go when the process ends (or, if it is killed, at
    the daemon's next prune)."""
    pin = Path(tempfile.mkdtemp(prefix=f".pin-{os.getpid()}-", dir=ckpt.parent)) / ckpt.name
    try:
        for p in sorted(ckpt.rglob("*")):
            target = pin / p.relative_to(ckpt)
            if p.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(p, target)
    except FileNotFoundError:  # being pruned
        shutil.rmtree(pin.parent, ignore_errors=True)
        return None
    except OSError:  # no hard links here (or the checkpoints dir is read-only): read in place
        shutil.rmtree(pin.parent, ignore_errors=True)
        return ckpt
    if not _PINS:
        atexit.register(_unpin_all)
    _PINS.append(pin.parent)
    return pin


def _unpin_all() -> None:
    for d in _PINS:
        shutil.rmtree(d, ignore_errors=True)


def _stale_pins(root: Path) -> list[Path]:
    """Pins of processes that are gone (killed before their exit handler ran)."""
    out = []
    for p in root.glob(".pin-*"):
        try:
            os.kill(int(p.name.split("-")[1]), 0)
        except ProcessLookupError:
            out.append(p)
        except (ValueError, IndexError, PermissionError):
            continue
    return out


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt}/meta.json: {e}") from None


def read_tensors(ckpt: Path, rank: int = 0) -> dict:
    """Per arm what `load_arm_state` loads (its replicated state and where its shards are), and
    the RNG state."""
    path = Path(ckpt) / REPLICATED
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as e:  # corrupt or truncated file: say which, never half-load
        raise CheckpointError(f"cannot load {path}: {e}") from None
    return {k: (v | {"name": k, "checkpoint": Path(ckpt)} if k not in ("rng", EXTRA) else v) for k, v in blob.items()}


@dataclass
class Restored:
    """Arms rebuilt from a checkpoint, with what they were built for."""

    checkpoint: Path
    meta: dict
    schema: Schema
    model: ModelConfig
    arms: dict[str, Arm]
    extra: dict = field(default_factory=dict)  # `save`'s extra (empty if it had none)


def load_arms(
    ckpt: Path, names: list[str] | None = None, rank: int = 0, restore_rng: bool = False, precision: str | None = None
) -> Restored:
    """The one restore path (daemon, `dimstream search`, `dimstream export`): the arms `names`
    (default: all, in checkpoint order) of checkpoint `ckpt`, built and loaded. The torch RNG
    is left as the caller had it (building an arm seeds it), or set to the checkpoint's with
    `restore_rng` (the daemon resuming: training continues as if never stopped). `precision`:
    the heads' precision from now on, if not the checkpoint's (its state is fp32 either way)."""
    rng = torch.get_rng_state()
    meta = read_meta(ckpt)
    schema = Schema.from_dict(meta["schema"])
    model = ModelConfig.from_dict(meta["model"] | ({"precision": precision} if precision else {}))
    specs = {a["name"]: ArmSpec.from_dict(a) for a in meta["arms"]}  # a tier map is in the arm's state
    names = list(specs) if names is None else list(names)
    missing = [n for n in names if n not in specs]
    if missing:
        raise CheckpointError(
            f"checkpoint {Path(ckpt).name} has no arm {', '.join(map(repr, missing))} (it has {', '.join(specs)})"
        )
    tensors = read_tensors(ckpt, rank)
    arms = {}
    for n in names:
        arm = Arm(specs[n], schema.num_embeddings, schema.multi_valued, model, managed=schema.managed)
        load_arm_state(arm, tensors[n])
        arms[n] = arm
    torch.set_rng_state(tensors["rng"]["torch"] if restore_rng else rng)
    return Restored(Path(ckpt), meta, schema, model, arms, tensors.get(EXTRA, {}))
