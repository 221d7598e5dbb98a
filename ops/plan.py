"""`dimstream plan`: TorchRec's sharding plan for a schema on hardware that is not at hand.

The planner runs on a `Topology` of `--world-size` ranks of `--device` (cuda or cpu) with
`--memory-per-rank` GB (HBM on cuda, DDR on cpu; TorchRec's default 32 GB HBM / 128 GB DDR when
not given), with the constraints the daemon shards with (models/distributed.py: FBGEMM's fused
kernel, the sharding types it has on that device). The tables are built on the meta device, so a
Criteo-1TB-sized schema costs no memory here. Printed for the control arm and for the slim arm
at kappa: per rank its tables (sharding type, shard size), memory and the planner's estimated
cost per step (lookup compute and communication, forward + backward, ms); then the totals.

The slim arm is planned at a uniform width within kappa x the control's parameters: what the
search later decides per field has the same parameter count, so the same memory.

    dimstream plan --world-size 8 --device cuda --config ops/examples/criteo-1tb.toml
"""

from __future__ import annotations

import argparse
import logging
import tomllib
import warnings
from pathlib import Path

from dimstream.ops.config import ConfigError

DEFAULTS = {"control_dim": 64, "budget": 0.25, "model": "deepfm", "batch_size": 512}


def register(sub) -> None:
    p = sub.add_parser("plan", help="TorchRec's sharding plan for N ranks of hardware not at hand")
    p.add_argument("--world-size", type=int, required=True, help="ranks (GPUs or CPU processes)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--memory-per-rank", type=float, default=None, metavar="GB", help="HBM (cuda) or DDR (cpu)")
    p.add_argument("--config", type=Path, default=None, help="TOML: [schema], control_dim, budget, model, batch_size")
    p.add_argument("--control-dim", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="kappa (default 0.25)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per rank and step (default 512)")
    p.set_defaults(func=cmd_plan)


def load_settings(args: argparse.Namespace) -> dict:
    """The defaults, then the TOML's keys, then the options given."""
    out = dict(DEFAULTS)
    schema = None
    if args.config is not None:
        try:
            doc = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"--config {args.config}: {e}") from None
        out |= {k: doc[k] for k in DEFAULTS if k in doc}
        schema = doc.get("schema")
    for k in ("control_dim", "budget", "batch_size"):
        if getattr(args, k) is not None:
            out[k] = getattr(args, k)
    if args.world_size < 1:
        raise ConfigError("--world-size must be >= 1")
    if out["control_dim"] % 4 or out["control_dim"] < 4:
        raise ConfigError("control_dim must be a multiple of 4")
    out["schema"] = schema
    return out


def _schema(declared: dict | None):
    from dimstream.stream.schema import Schema, SchemaError
    from dimstream.stream.synthetic import default_schema

    if declared is None:
        return default_schema()
    try:
        return Schema.from_dict(declared)
    except SchemaError as e:
        raise ConfigError(f"[schema]: {e}") from None


def plan_arm(schema, dims: dict[str, int], model: str, world_size: int, device: str, memory_gb, batch_size: int):
    """The planner's best plan (its sharding options, each with its shards) for one arm."""
    import torch
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from dimstream.models.config import ModelConfig
    from dimstream.models.ctr import CTRModel
    from dimstream.models.distributed import constraints

    cfg = ModelConfig(model, interaction_dim=max(dims.values()))
    module = CTRModel(dims, schema.num_embeddings, schema.multi_valued, cfg)  # tables on meta
    # the fused optimizer, as the daemon's arms have it: the planner counts its state's memory
    apply_optimizer_in_backward(torch.optim.Adagrad, module.embedding.parameters(), {"lr": cfg.sparse_lr})
    cap = int(memory_gb * 1024**3) if memory_gb else None
    topology = Topology(
        world_size=world_size,
        compute_device=device,
        hbm_cap=cap if device == "cuda" else None,
        ddr_cap=cap if device == "cpu" else None,
        local_world_size=min(world_size, 8),
    )
    try:
        with warnings.catch_warnings():  # its advice on storage reservation for dry runs
            warnings.simplefilter("ignore", FutureWarning)
            planner = EmbeddingShardingPlanner(
                topology=topology, batch_size=batch_size, constraints=constraints(module, device)
            )
            planner.plan(module, [EmbeddingBagCollectionSharder()])
    except Exception as e:  # the planner's own reason, e.g. the tables do not fit
        raise ConfigError(f"no plan for {world_size} x {device}: {str(e).splitlines()[0]}") from None
    return planner._best_plan, module.embedding_params


def per_rank(options, world_size: int) -> list[dict]:
    """Per rank: its shards, memory (GB) and estimated cost (ms, forward + backward)."""
    ranks = [
        {"rank": r, "shards": [], "hbm_gb": 0.0, "ddr_gb": 0.0, "compute_ms": 0.0, "comms_ms": 0.0}
        for r in range(world_size)
    ]
    for o in options:
        for s in o.shards:
            r = ranks[s.rank]
            r["shards"].append((s.size[0] * s.size[1], f"{o.name}:{_short(o.sharding_type)}{list(s.size)}"))
            r["hbm_gb"] += s.storage.hbm / 1024**3
            r["ddr_gb"] += s.storage.ddr / 1024**3
            p = s.perf
            r["compute_ms"] += p.fwd_compute + p.bwd_compute + p.prefetch_compute
            r["comms_ms"] += p.fwd_comms + p.bwd_comms + p.input_dist_comms
    for r in ranks:  # largest shards first
        r["shards"] = [name for _, name in sorted(r["shards"], key=lambda x: -x[0])]
    return ranks


def _short(sharding_type: str) -> str:
    return {"table_wise": "TW", "row_wise": "RW", "column_wise": "CW", "table_row_wise": "TWRW"}.get(
        sharding_type, sharding_type
    )


def format_plan(title: str, params: int, options, world_size: int, max_tables: int = 6) -> str:
    ranks = per_rank(options, world_size)
    kinds: dict[str, int] = {}
    for o in options:
        kinds[o.sharding_type] = kinds.get(o.sharding_type, 0) + 1
    lines = [
        f"{title}: {params:,} embedding parameters; tables by sharding type: "
        + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
        f"{'rank':>4} {'HBM GB':>8} {'DDR GB':>8} {'compute ms':>10} {'comms ms':>9}  shards (table:type[rows, cols])",
    ]
    for r in ranks:
        shown = r["shards"][:max_tables] + (
            [f"... {len(r['shards']) - max_tables} more"] if len(r["shards"]) > max_tables else []
        )
        lines.append(
            f"{r['rank']:>4} {r['hbm_gb']:>8.2f} {r['ddr_gb']:>8.2f} {r['compute_ms']:>10.3f} {r['comms_ms']:>9.3f}  "
            + " ".join(shown)
        )
    worst = max(ranks, key=lambda r: r["compute_ms"] + r["comms_ms"])
    lines.append(
        f"total memory {sum(r['hbm_gb'] + r['ddr_gb'] for r in ranks):.2f} GB; "
        f"max per rank {max(r['hbm_gb'] + r['ddr_gb'] for r in ranks):.2f} GB; "
        f"slowest rank {worst['rank']}: {worst['compute_ms'] + worst['comms_ms']:.3f} ms per step"
    )
    return "\n".join(lines)


def slim_width(control_dim: int, budget: float) -> int:
    """The uniform width within kappa x the control's parameters (a multiple of 4)."""
    return max(4, int(budget * control_dim) // 4 * 4)


def cmd_plan(args) -> int:
    logging.getLogger("torchrec").setLevel(logging.ERROR)  # its own stats table and topology warnings
    s = load_settings(args)
    schema = _schema(s["schema"])
    fields = schema.feature_names
    mem = f"{args.memory_per_rank:g} GB" if args.memory_per_rank else "TorchRec's default memory"
    print(
        f"dimstream plan: {args.world_size} x {args.device} ({mem} per rank), {len(fields)} fields, "
        f"{s['model']}, batch {s['batch_size']} rows per rank"
    )
    for name, width in (("control", s["control_dim"]), ("slim", slim_width(s["control_dim"], s["budget"]))):
        dims = {f: width for f in fields}
        options, params = plan_arm(
            schema, dims, s["model"], args.world_size, args.device, args.memory_per_rank, s["batch_size"]
        )
        label = f"{name} (width {width})" + (f", kappa {s['budget']:g}" if name == "slim" else "")
        print()
        print(format_plan(label, params, options, args.world_size))
    return 0
