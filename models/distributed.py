"""Process group and DistributedModelParallel: the sharded path is the only path.

A single process runs as world size 1 over gloo; `torchrun --nproc_per_node N` adds ranks
without any other change."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_modules import EmbeddingBagCollection


def ensure_process_group() -> None:
    """Join torchrun's group if launched by it, else form a world of one (gloo, in memory)."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def table_names(module: torch.nn.Module) -> list[str]:
    names = []
    for m in module.modules():
        if isinstance(m, EmbeddingBagCollection):
            names += [c.name for c in m.embedding_bag_configs()]
    return names


def shard(module: torch.nn.Module) -> DistributedModelParallel:
    """Wrap `module` in DMP with every table table-wise on FBGEMM's fused kernel.

    Without the constraint the planner puts small tables data-parallel on a dense kernel,
    which bypasses the fused optimizer (and, for widths not divisible by 4, runs a backward
    PyTorch warns may be incorrect). Widths are therefore always multiples of 4."""
    ensure_process_group()
    constraints = {
        t: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]) for t in table_names(module)
    }
    topology = Topology(world_size=world_size(), compute_device="cpu")
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(module, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD)
    return DistributedModelParallel(module, device=torch.device("cpu"), plan=plan)
