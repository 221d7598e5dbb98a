"""Mixed-dimension embeddings: one TorchRec table per field, each with its own width.

`dims[field] = 0` removes the field. Widths must be multiples of 4 (FBGEMM's fused kernels).
The first-order (wide) weights are a second collection of width-4 tables whose 4 columns are
summed: a width-1 table would be placed on a dense kernel with an unreliable backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

WIDE_WIDTH = 4


class AllocationError(ValueError):
    """An allocation (dims per field) that cannot be built."""


def check_dims(dims: dict[str, int], num_embeddings: dict[str, int]) -> None:
    unknown = set(dims) - set(num_embeddings)
    if unknown:
        raise AllocationError(f"allocation names unknown fields: {sorted(unknown)}")
    bad = {f: d for f, d in dims.items() if d < 0 or d % 4}
    if bad:
        raise AllocationError(f"embedding dims must be non-negative multiples of 4: {bad}")
    if not any(dims.values()):
        raise AllocationError("allocation keeps no field")


def _tables(
    prefix: str, widths: dict[str, int], num_embeddings: dict[str, int], pooling: dict[str, PoolingType], init: float
) -> list[EmbeddingBagConfig]:
    # explicit init range: TorchRec's default, sqrt(1/rows), is 0.5 for a 4-row table
    # and 0.002 for a 200k-row one
    return [
        EmbeddingBagConfig(
            name=f"{prefix}{f}",
            embedding_dim=d,
            num_embeddings=num_embeddings[f],
            feature_names=[f],
            pooling=pooling.get(f, PoolingType.SUM),
            weight_init_min=-init,
            weight_init_max=init,
        )
        for f, d in widths.items()
        if d > 0
    ]


class MixedEmbedding(nn.Module):
    """Pooled embeddings per field (deep) and a first-order scalar per field (wide).

    forward(kjt, column_mask) -> (list of [B, d_i] tensors in `feature_names` order, [B] wide sum)
    column_mask[field] is a [d_i] tensor multiplied onto the pooled embedding: pooling is linear,
    so this equals masking the table's columns (the auxiliary mask alpha of SSEDS eq. 8 and HAM).
    """

    def __init__(
        self,
        dims: dict[str, int],
        num_embeddings: dict[str, int],
        multi_valued: set[str],
        wide: bool = True,
        device: torch.device | None = None,
        init_range: float = 0.05,
    ):
        super().__init__()
        check_dims(dims, num_embeddings)
        self.dims = {f: int(d) for f, d in dims.items() if d > 0}
        self.feature_names = list(self.dims)
        pooling = {f: PoolingType.MEAN for f in multi_valued}
        device = device or torch.device("meta")  # DMP materialises the shards
        self.deep = EmbeddingBagCollection(
            _tables("emb_", self.dims, num_embeddings, pooling, init_range), device=device
        )
        self.wide = (
            EmbeddingBagCollection(
                _tables("wide_", {f: WIDE_WIDTH for f in self.dims}, num_embeddings, pooling, 1e-3), device=device
            )
            if wide
            else None
        )

    def forward(self, kjt: KeyedJaggedTensor, column_mask: dict[str, torch.Tensor] | None = None):
        kt = self.deep(kjt).to_dict()
        embs = [kt[f] for f in self.feature_names]
        if column_mask is not None:
            embs = [e * column_mask[f] if f in column_mask else e for e, f in zip(embs, self.feature_names)]
        wide = self.wide(kjt).values().sum(dim=1) if self.wide is not None else None
        return embs, wide

    def forward_concat(self, kjt: KeyedJaggedTensor):
        """As forward without a mask, the deep embeddings as one [B, sum d_i] tensor in
        `feature_names` order: the collection's own output, with no per-field split to be
        concatenated again by the head (nor its backward)."""
        kt = self.deep(kjt)
        if kt.keys() == self.feature_names:
            x = kt.values()
        else:
            d = kt.to_dict()
            x = torch.cat([d[f] for f in self.feature_names], dim=1)
        wide = self.wide(kjt).values().sum(dim=1) if self.wide is not None else None
        return x, wide

    def embedding_params(self, num_embeddings: dict[str, int]) -> int:
        """Parameters of the deep tables, sum_i rows_i x d_i (the budget of SSEDS eq. 4)."""
        return sum(num_embeddings[f] * d for f, d in self.dims.items())
