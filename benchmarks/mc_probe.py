"""Probe: do TorchRec's managed-collision modules run on this CPU stack, alone and under DMP?

Writes benchmarks/results/mc_probe.json: one entry per check, "ok" or the error it raised.
Run: .venv/bin/python benchmarks/mc_probe.py
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "mc_probe.json"


def _mc_ebc(policy: str, rows: int = 8, device: str = "cpu"):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
    from torchrec.modules.mc_modules import (
        LFU_EvictionPolicy,
        LRU_EvictionPolicy,
        ManagedCollisionCollection,
        MCHManagedCollisionModule,
    )

    cfg = [EmbeddingBagConfig(name="t_a", embedding_dim=8, num_embeddings=rows, feature_names=["a"])]
    ev = LFU_EvictionPolicy() if policy == "lfu" else LRU_EvictionPolicy()
    mcm = MCHManagedCollisionModule(zch_size=rows, device=torch.device(device), eviction_policy=ev, eviction_interval=1)
    mcc = ManagedCollisionCollection({"t_a": mcm}, cfg)
    ebc = EmbeddingBagCollection(cfg, device=torch.device(device))
    return ManagedCollisionEmbeddingBagCollection(ebc, mcc, return_remapped_features=True)


def _kjt(ids):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    v = torch.tensor(ids, dtype=torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(["a"], v, torch.ones(len(ids), dtype=torch.int64))


def check_unsharded(policy: str) -> dict:
    m = _mc_ebc(policy, device="cpu")
    m.train()
    out, remapped = m(_kjt([10, 11, 12, 10]))
    out.values().sum().backward()
    _, r2 = m(_kjt([10, 11, 12, 99]))
    keys = sorted(m.state_dict())
    return {"remapped_first": remapped.values().tolist(), "remapped_second": r2.values().tolist(), "state_keys": keys}


def check_dmp(policy: str, sharding: str, kernel: str, manual: bool = False) -> dict:
    """MC-EBC under DMP (world size 1): with the planner's plan, or (`manual`) with a plan made
    by hand (construct_module_sharding_plan), which bypasses the planner's CPU sharding types."""
    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
    from torchrec.distributed.mc_modules import ManagedCollisionCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mc = _mc_ebc(policy, device="meta")

        def forward(self, kjt):
            out, remapped = self.mc(kjt)
            return out.values().sum(), remapped

    module = Wrap()
    apply_optimizer_in_backward(torch.optim.Adagrad, module.mc.parameters(), {"lr": 0.1})
    sharder = ManagedCollisionEmbeddingBagCollectionSharder(
        EmbeddingBagCollectionSharder(), ManagedCollisionCollectionSharder()
    )
    if manual:
        gen = {
            "row_wise": row_wise,
            "table_wise": lambda compute_kernel: table_wise(rank=0, compute_kernel=compute_kernel),
        }
        mp = construct_module_sharding_plan(
            module.mc,
            per_param_sharding={"t_a": gen[sharding](compute_kernel=kernel)},
            sharder=sharder,
            local_size=1,
            world_size=1,
            device_type="cpu",
        )
        plan = ShardingPlan({"mc": mp})
    else:
        cons = {"t_a": ParameterConstraints(sharding_types=[sharding], compute_kernels=[kernel])}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), constraints=cons)
        plan = planner.collective_plan(module, [sharder], dist.GroupMember.WORLD)
    model = DistributedModelParallel(module, device=torch.device("cpu"), plan=plan, sharders=[sharder])
    model.train()
    loss, remapped = model(_kjt([10, 11, 12, 10]))
    loss.backward()
    _, r2 = model(_kjt([10, 11, 12, 99]))
    # a full table: 7 id rows and the default row 7; 3 newcomers fill the free rows
    _, r3 = model(_kjt([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    sd = model.state_dict()
    return {
        "remapped_first": remapped.values().tolist(),
        "remapped_second": r2.values().tolist(),
        "remapped_full": r3.values().tolist(),
        "state_keys": sorted(sd),
        "state_types": {k: type(v).__name__ for k, v in sd.items()},
    }


def check_history_size() -> dict:
    """MCH sizes its history buffer from the first batch: a larger later batch is admitted in
    part only (the ids beyond the buffer are left out, with no warning)."""
    from torchrec.modules.mc_modules import LFU_EvictionPolicy, MCHManagedCollisionModule
    from torchrec.sparse.jagged_tensor import JaggedTensor

    m = MCHManagedCollisionModule(
        zch_size=64, device=torch.device("cpu"), eviction_policy=LFU_EvictionPolicy(), eviction_interval=1
    )
    m.train()
    for ids in ([1, 2], list(range(10, 40))):
        v = torch.tensor(ids)
        m({"f": JaggedTensor(values=v, lengths=torch.tensor([len(v)]))})
    live = int((m._mch_sorted_raw_ids != torch.iinfo(torch.int64).max).sum())
    return {"id_rows": 63, "distinct_ids_seen": 32, "ids_with_a_row_after": live}


def main() -> None:
    out = {"torch": torch.__version__}
    try:
        import torchrec

        out["torchrec"] = torchrec.__version__
    except Exception as e:  # noqa: BLE001
        out["torchrec"] = repr(e)
    checks = {f"unsharded_{p}": (check_unsharded, (p,)) for p in ("lfu", "lru")}
    for s in ("row_wise", "table_wise"):
        for k in ("fused", "dense"):
            checks[f"dmp_lfu_{s}_{k}_planner"] = (check_dmp, ("lfu", s, k))
    for p in ("lfu", "lru"):
        for k in ("fused", "dense"):
            checks[f"dmp_{p}_row_wise_{k}_manual_plan"] = (check_dmp, (p, "row_wise", k, True))
    checks["history_buffer_from_first_batch"] = (check_history_size, ())
    checks["dmp_lfu_table_wise_fused_manual_plan"] = (check_dmp, ("lfu", "table_wise", "fused", True))
    for name, (fn, args) in checks.items():
        try:
            out[name] = {"ok": True, **fn(*args)}
        except Exception as e:  # noqa: BLE001 - a probe records every failure
            out[name] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}"[:600],
                "where": traceback.format_exc()[-1200:],
            }
        print(name, out[name]["ok"], out[name].get("error", ""))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
