"""Model configuration, a plain dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MODELS = ("deepfm", "wdl", "fm", "dcnv2")


@dataclass
class ModelConfig:
    model: str = "deepfm"
    mlp: tuple[int, ...] = (256, 128)
    dcn_layers: int = 2
    # interaction width k of the FM part: per-field projections map d_i -> k (SSEDS eq. 13).
    # None = the control arm's uniform width, fixed across re-allocations so that a slim arm
    # starts as exactly the masked control model ("winning ticket").
    interaction_dim: int | None = None
    sparse_optimizer: str = "adagrad"  # fused in backward: "adagrad" or "rowwise_adam"
    sparse_lr: float = 0.02  # chosen on the synthetic stream against 0.05 and 0.1
    dense_lr: float = 1e-3
    batch_size: int = 512
    init_range: float = 0.05  # deep tables start uniform in [-init_range, init_range]
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
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
