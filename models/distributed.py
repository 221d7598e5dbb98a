"""Process group, device and DistributedModelParallel: the sharded path is the only path.

A single process runs as world size 1; `torchrun --nproc_per_node N` (or `--nnodes M` with a
rendezvous) adds ranks without any other change. Backend and device come from the machine:
nccl on the local CUDA device where there is one, gloo on the CPU otherwise.

Every arm is one DMP model over all ranks: TorchRec's planner places each table (table-wise,
column-wise, and on CUDA row-wise too, as it decides) on FBGEMM's fused kernel, and DMP keeps the
dense part data-parallel. The stream is split by rows (`share_mask`) or by Kafka partition; a
window's training is `progressive_val_score` below, every rank taking the same number of steps.

>>> share_mask(8, 1, 2).nonzero()[0].tolist()          # row i to rank i mod N
[1, 3, 5, 7]
>>> share_mask(8, 0, 2, weights=(3, 1)).sum()          # a skewed 3:1 split
np.int64(6)
>>> local_batch_size(512, 2), steps_for([300, 100], 256)
(256, 2)
"""

from __future__ import annotations

import math
import os
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from dimstream.models.evaluation import auc_difference, window_metrics
from dimstream.stream.batch import SparseBatch, unit_offsets

# what FBGEMM's fused kernel offers per device (row-wise sharding has no CPU kernel in TorchRec)
SHARDING_TYPES = {
    "cpu": ["table_wise", "column_wise"],
    "cuda": ["table_wise", "row_wise", "column_wise", "table_row_wise"],
}
BOUNDS_CHECK = BoundsCheckMode.NONE


def launched() -> bool:
    """True in a process started by torchrun (it sets WORLD_SIZE and the rendezvous address)."""
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def device() -> torch.device:
    """This rank's device: its local CUDA device where CUDA is, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if device().type == "cuda" else "gloo"


def ensure_process_group() -> None:
    """Join torchrun's group if launched by it, else form a world of one (in memory)."""
    if dist.is_initialized():
        return
    if device().type == "cuda":
        torch.cuda.set_device(device())
    if launched():
        dist.init_process_group(backend(), **_attempt_rendezvous())
    else:
        dist.init_process_group(backend(), store=dist.HashStore(), rank=0, world_size=1)


def _attempt_rendezvous() -> dict:
    """torchrun's store with this restart attempt's own key space, on one node.

    With `--master_port` (static rendezvous) torchrun keeps one TCPStore across worker restarts,
    so a restarted rank can read the dead world's gloo addresses and hang or fail in
    `init_process_group`. On one node every rank shares one agent and so one
    TORCHELASTIC_RESTART_COUNT; across nodes the counts can differ (pytorch#108158), and there
    the c10d rendezvous, which prefixes each round itself, is the supported way."""
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return {}
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"dimstream.attempt.{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    return {"store": store, "rank": rank, "world_size": world_size}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def table_names(module: torch.nn.Module) -> list[str]:
    names = []
    for m in module.modules():
        if isinstance(m, EmbeddingBagCollection):
            names += [c.name for c in m.embedding_bag_configs()]
    return names


def constraints(module: torch.nn.Module, device_type: str) -> dict[str, ParameterConstraints]:
    """Every table on FBGEMM's fused kernel, in a sharding type that kernel has on the device.

    Without the kernel constraint the planner puts small tables data-parallel on a dense
    kernel, which bypasses the fused optimizer (and, for widths not divisible by 4, runs a
    backward PyTorch warns may be incorrect). Widths are therefore always multiples of 4.

    FBGEMM's own bounds check (`BOUNDS_CHECK`) is off: every id reaches the lookup already a row
    of its table (hashed fields are hashed modulo their rows by the decoder and checked by
    `Arm._check_rows`; managed ids become rows of their vocabulary; tiered ids are mapped by an
    `index_select`, which raises on an id outside the field), so the check was a second pass
    over every index (4% of a bf16 step, issue 15)."""
    kinds = SHARDING_TYPES[device_type]
    return {
        t: ParameterConstraints(sharding_types=list(kinds), compute_kernels=["fused"], bounds_check_mode=BOUNDS_CHECK)
        for t in table_names(module)
    }


def shard(module: torch.nn.Module) -> DistributedModelParallel:
    """Wrap `module` in DMP over every rank with the plan TorchRec's planner makes for it (the
    ranks agree on it: `collective_plan` plans on rank 0 and broadcasts)."""
    ensure_process_group()
    dev = device()
    topology = Topology(world_size=world_size(), compute_device=dev.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints(module, dev.type))
    plan = planner.collective_plan(module, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD)
    initial = initial_tables(module)
    wrapper = _OneRank() if world_size() == 1 else None  # None: DMP's default, DDP
    model = DistributedModelParallel(module, device=dev, plan=plan, data_parallel_wrapper=wrapper)
    copy_into_shards(model.state_dict(), initial)
    return model


class _OneRank(DataParallelWrapper):
    """The dense part as it is: a world of one has no gradients to all-reduce, and DDP's hooks,
    buckets and forward wrapper cost a bare step about 4% (issue 15, benchmarks/training.py)."""

    def wrap(self, dmp, env, device) -> None:
        dmp._dmp_wrapped_module.to(device)


def initial_tables(module: torch.nn.Module) -> dict[str, tuple]:
    """Per table (by state-dict key) a generator and the range its values are drawn from.

    FBGEMM's sharded kernels draw each shard's values from their own RNG, so a model would
    depend on its plan and on the world size. Every table is drawn instead whole, from a
    generator seeded by the (seeded) torch RNG and the table's name: the same seed gives the
    same model on 1 rank or on 8, whichever rank holds which shard."""
    base = int(torch.randint(0, 2**62, (1,)).item())
    out = {}
    for path, m in module.named_modules():
        if isinstance(m, EmbeddingBagCollection):
            for c in m.embedding_bag_configs():
                g = torch.Generator().manual_seed(base + zlib.crc32(c.name.encode()))
                lo = c.weight_init_min if c.weight_init_min is not None else -math.sqrt(1 / c.num_embeddings)
                hi = c.weight_init_max if c.weight_init_max is not None else math.sqrt(1 / c.num_embeddings)
                out[f"{path}.embedding_bags.{c.name}.weight"] = (g, c.num_embeddings, c.embedding_dim, lo, hi)
    return out


def copy_into_shards(live: dict, initial: dict) -> None:
    """Draw every table of `initial_tables` whole and copy each rank's blocks into its shards
    (transiently one whole table in CPU memory at a time)."""
    with torch.no_grad():
        for key, (g, rows, dim, lo, hi) in initial.items():
            t = live.get(key)
            if not isinstance(t, ShardedTensor):
                continue
            copy_blocks(t, torch.empty(rows, dim).uniform_(lo, hi, generator=g))


def copy_blocks(t: ShardedTensor, full: torch.Tensor) -> None:
    """Copy into each local shard of `t` its block of the whole tensor `full`."""
    for s in t.local_shards():
        s.tensor.detach().copy_(_block(full, s.metadata.shard_offsets, s.metadata.shard_sizes))


def state_layout(state: dict) -> dict[str, dict[str, tuple]]:
    """{key: {name: (size, dtype)}} of a fused optimizer's per-table state over all ranks: a rank
    holds the state of its own tables only (one collective)."""
    mine = {k: {n: (tuple(v.size()), v.dtype) for n, v in d.items()} for k, d in state.items()}
    if world_size() == 1:
        return mine
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    out: dict = {}
    for d in everyone:
        for k, names in d.items():
            out.setdefault(k, {}).update(names)
    return {k: dict(sorted(out[k].items())) for k in sorted(out)}


def _block(full: torch.Tensor, offsets: list[int], sizes: list[int]) -> torch.Tensor:
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]


def gather_full(t, layout: tuple | None = None) -> torch.Tensor:
    """The whole tensor of a sharded one on every rank, whichever ranks hold its shards (a plain
    tensor is returned as it is). Collective for sharded tensors: every rank must call it, a
    rank without the tensor at all (a fused optimizer's state of a table it holds no shard of)
    with t None and the (size, dtype) `layout` of `state_layout`."""
    if t is not None and not isinstance(t, ShardedTensor):
        return t
    size, dtype = (t.size(), t.dtype) if t is not None else layout
    full = torch.zeros(size, dtype=dtype)
    for s in t.local_shards() if t is not None else ():
        _block(full, s.metadata.shard_offsets, s.metadata.shard_sizes).copy_(s.tensor.detach().cpu())
    if world_size() > 1:
        dist.all_reduce(full)  # every element lives in exactly one shard: the sum is the table
    return full


# --- the stream's split over ranks -------------------------------------------------------------


def share_mask(n: int, rank: int, world: int, weights: tuple[int, ...] | None = None) -> np.ndarray:
    """Which of a window's `n` rows rank `rank` trains: row i goes to rank i mod N, or with
    `weights` (w_0..w_{N-1}) to the rank whose slot holds i mod sum(w) (a skewed split)."""
    w = np.ones(world, np.int64) if weights is None else np.asarray(weights, np.int64)
    if len(w) != world or (w < 0).any() or w.sum() == 0:
        raise ValueError(f"row split {tuple(weights or ())} does not fit a world of {world}")
    owner = np.repeat(np.arange(world), w)  # slot -> rank
    return owner[np.arange(n) % int(w.sum())] == rank


def local_batch_size(batch_size: int, world: int) -> int:
    """Rows per rank and step: the global mini-batch split over the ranks."""
    return max(1, math.ceil(batch_size / world))


def steps_for(rows_per_rank: list[int], local_batch: int) -> int:
    """Steps every rank takes on a window: enough for the rank holding the most rows."""
    return math.ceil(max(rows_per_rank, default=0) / local_batch)


def all_gather_ints(values: list[int]) -> np.ndarray:
    """[world, len(values)]: every rank's `values` (one collective)."""
    t = torch.tensor(values, dtype=torch.int64)
    if world_size() == 1:
        return t.numpy()[None]
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return torch.stack(out).numpy()


def agree(what: str, values: list[int]) -> None:
    """Raise unless every rank holds the same `values` (a window's bounds: lockstep)."""
    seen = all_gather_ints(values)
    if (seen != seen[0]).any():
        raise RuntimeError(f"ranks disagree on {what}: {seen.tolist()}")


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (a stop request reaches all ranks at once)."""
    return bool(all_gather_ints([int(flag)]).max())


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank (one collective): a window's
    counts and Kafka positions of the ranks' own partitions."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_arrays(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Each array concatenated over the ranks in rank order (predictions and labels of every
    rank's rows, for the metrics of the union)."""
    if world_size() == 1:
        return arrays
    out: list = [None] * world_size()
    dist.all_gather_object(out, arrays)
    return [np.concatenate([o[i] for o in out]) for i in range(len(arrays))]


def pad(batch: SparseBatch, rows: int) -> tuple[SparseBatch, np.ndarray]:
    """`batch` padded to `rows` rows with padding rows (id 0 in every field) and their weights:
    1 for real rows, 0 for padding, so padding adds nothing to any gradient."""
    n = len(batch)
    weights = np.zeros(rows, np.float32)
    weights[:n] = 1.0
    if rows == n:
        return batch, weights
    extra = rows - n
    z = np.zeros(extra, np.int64)
    filler = SparseBatch(
        batch.keys,
        {k: z for k in batch.keys},
        dict.fromkeys(batch.keys, unit_offsets(extra)),
        np.zeros(extra, np.float32),
        z,
    )
    return SparseBatch.concat([batch, filler]) if n else filler, weights


def train_step(arm, batch: SparseBatch, weights: np.ndarray, step_rows: int) -> np.ndarray:
    """One update of `arm` on this rank's part of a global step; returns the pre-update click
    probabilities of the real rows.

    The loss is N * sum_i w_i * l_i / step_rows, step_rows being the real rows of the step over
    all N ranks. Both kinds of gradient are averaged over the ranks: the dense ones by DMP's
    data-parallel wrapper, the sharded tables' ones by TorchRec's all-to-all backward (its
    gradient division). Each is then the gradient of the step's mean log-loss, as in one process,
    at any world size, so the optimizers' state (Adagrad's and Adam's moments) means the same
    after a resume on another N."""
    dev = device()
    kjt = arm.kjt(batch).to(dev)
    logits = arm.model(kjt)
    w = torch.from_numpy(weights).to(dev)
    losses = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, batch.labels_tensor().to(dev), reduction="none"
    )
    loss = (losses * w).sum() * (world_size() / max(step_rows, 1))
    arm.dense_optimizer.zero_grad(set_to_none=True)
    loss.backward()  # also applies the fused sparse update
    arm.dense_optimizer.step()
    return torch.sigmoid(logits.detach()).cpu().numpy()[: int(weights.sum())]


def progressive_val_score(arms, local: SparseBatch, batch_size: int, on_step=None) -> dict[str, dict]:
    """Test-then-train over one window on every rank, each with its `local` share of the rows
    (models/evaluation.py's function of the same name, over ranks).

    Every rank takes `steps_for` steps of `local_batch_size(batch_size, N)` rows, padding its
    last steps with zero-weight rows when it holds fewer rows than another rank (a skewed
    partition): the collectives of a step then match on every rank, and a padded step leaves
    the model as it was. The metrics are those of the union of all ranks' rows (predictions and
    labels gathered), not a mean over ranks."""
    world = world_size()
    b = local_batch_size(batch_size, world)
    counts = all_gather_ints([len(local)])[:, 0]
    steps = steps_for(counts.tolist(), b)
    total = int(counts.sum())
    # real rows of step s over all ranks: sum_r clip(n_r - s*b, 0, b)
    starts = np.arange(steps)[:, None] * b
    step_rows = np.clip(counts[None, :] - starts, 0, b).sum(axis=1)
    out: dict[str, dict] = {}
    for i, arm in enumerate(arms):
        t0 = time.perf_counter()
        probs = np.empty(len(local), np.float32)
        for s in range(steps):
            lo, hi = min(s * b, len(local)), min((s + 1) * b, len(local))
            part, weights = pad(local.slice(lo, hi), b)
            probs[lo:hi] = train_step(arm, part, weights, int(step_rows[s]))
            if on_step is not None:
                on_step(i, int(step_rows[: s + 1].sum()), time.perf_counter() - t0)
        dt = time.perf_counter() - t0
        out[arm.name] = {"train_rows_per_s": total / dt if dt > 0 else 0.0, "local_scores": probs}
    labels, *scores = gather_arrays([local.labels] + [out[a.name].pop("local_scores") for a in arms])
    for arm, s in zip(arms, scores):
        out[arm.name] |= (window_metrics(labels, s) if total else {}) | {"scores": s}
    for name, m in out.items():
        if name != "control" and "control" in out and total:
            m["auc_diff_vs_control"] = auc_difference(labels, m["scores"], out["control"]["scores"])
    return out
