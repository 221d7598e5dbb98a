"""Model configuration, a plain dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MODELS = ("deepfm", "wdl", "fm", "dcnv2")
PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX flags), not by emulation."""
    try:
        with open(cpuinfo) as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device_type: str) -> str:
    """'fp32' or 'bf16': `auto` is bf16 on CUDA and on a CPU with native bf16, else fp32.

    >>> resolve_precision("fp32", "cuda"), resolve_precision("auto", "cuda")
    ('fp32', 'bf16')
    """
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" or (device_type == "cpu" and cpu_has_bf16()) else "fp32"


def check_sparse_optimizer(name: str) -> None:
    """One this machine's FBGEMM kernel has: the CPU kernel takes exact (row-wise) Adagrad and
    SGD only, so partial row-wise Adam would otherwise fail deep in the arm's construction with a
    bare AssertionError (benchmarks/results/recipe.json, "adam_on_cpu"). Unknown names fail where
    the arm picks the optimizer (models/arm.py `_sparse_optimizer`)."""
    if name != "rowwise_adam":
        return
    import torch  # here, not at the top: the config stays importable without loading torch

    if not torch.cuda.is_available():
        raise ValueError("sparse_optimizer 'rowwise_adam' needs CUDA: FBGEMM's CPU kernel has no row-wise Adam")


@dataclass
class ModelConfig:
    model: str = "deepfm"
    mlp: tuple[int, ...] = (256, 128)
    dcn_layers: int = 2
    # interaction width k of the FM part: per-field projections map d_i -> k (SSEDS eq. 13).
    # None = the control arm's uniform width, fixed across re-allocations so that a slim arm
    # starts as exactly the masked control model ("winning ticket").
    interaction_dim: int | None = None
    # fused in backward: "adagrad", "rowwise_adagrad", or "rowwise_adam" (CUDA only); "sgd" for exact tests.
    # Row-wise Adagrad is no faster on this CPU (issue 15, benchmarks/training.py `levers`).
    sparse_optimizer: str = "adagrad"
    sparse_lr: float = 0.02  # chosen on the synthetic stream against 0.05 and 0.1
    dense_lr: float = 1e-3
    batch_size: int = 512
    # deep tables start uniform in [-init_range, init_range]. Near zero, as FuxiCTR's N(0, 1e-4):
    # +-0.05 learnt a worse model on the Criteo sample (benchmarks/results/recipe.json, issue 15)
    init_range: float = 1e-4
    # the dense part (heads) under bf16 autocast, with fp32 master weights and optimizer state;
    # "auto": bf16 only where the hardware has it (CUDA, or a CPU with AVX512-BF16 or AMX)
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check_sparse_optimizer(self.sparse_optimizer)
        self.mlp = tuple(int(x) for x in self.mlp)

    def to_dict(self) -> dict:
        """JSON-able (the checkpoint's "model"); `from_dict` is its inverse.

        >>> ModelConfig.from_dict(ModelConfig(model="fm").to_dict()) == ModelConfig(model="fm")
        True
        """
        return asdict(self) | {"mlp": list(self.mlp)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
