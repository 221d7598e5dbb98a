"""Mixed-dimension embeddings: one TorchRec table per field, each with its own width.

`dims[field] = 0` removes the field. Widths must be multiples of 4 (FBGEMM's fused kernels).
The first-order (wide) weights are a second collection of width-4 tables whose 4 columns are
summed: a width-1 table would be placed on a dense kernel with an unreliable backward.

Managed fields (`managed`, models/vocab.py) arrive as raw 64-bit ids; their `ManagedVocab`
turns them into rows before both tables look them up, and rows it hands to a new id are drawn
afresh (`reset_rows`).

Tiered fields (`tiers`, models/tiers.py: AutoSrh's frequency tiers) have one deep table per
(field, tier) in the same collection, each of its tier's rows and its own width; the field's
pooled embedding is its tiers' zero-padded to the field's width (the union of the control
columns its tiers kept). Their first-order tables stay one per field.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dimstream.models.tiers import TierMaps, TierShape, assemble, split_kjt, tier_feature
from dimstream.models.vocab import build_vocabs

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


def check_tiers(tiers: dict[str, TierShape], dims: dict[str, int], num_embeddings: dict[str, int], managed) -> None:
    """A tiered field: kept, not managed, its tiers' rows covering the field, widths multiples
    of 4 placed inside the field's width."""
    for f, s in tiers.items():
        if f in (managed or {}):
            raise AllocationError(f"field {f!r} is managed (models/vocab.py): frequency tiers are not supported for it")
        if dims.get(f, 0) <= 0:
            raise AllocationError(f"tiered field {f!r} has no width")
        if sum(s.rows) != num_embeddings[f] or min(s.rows) < 0:
            raise AllocationError(f"tiers of {f!r} hold {list(s.rows)} rows, the field has {num_embeddings[f]}")
        if any(w % 4 for w in s.widths()) or any(p < 0 or p >= dims[f] for ps in s.positions for p in ps):
            raise AllocationError(f"tier widths of {f!r} must be multiples of 4 inside its width {dims[f]}: {s}")


def _tier_tables(dims: dict[str, int], tiers: dict[str, TierShape]) -> tuple[dict[str, int], dict[str, int]]:
    """(width, rows) per deep table feature: a plain field's, and one per active tier."""
    widths, rows = {}, {}
    for f, d in dims.items():
        if f not in tiers:
            widths[f] = d
            continue
        for t in tiers[f].active():
            widths[tier_feature(f, t)] = len(tiers[f].positions[t])
            rows[tier_feature(f, t)] = tiers[f].rows[t]
    return widths, rows


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
        managed: dict | None = None,
        tiers: dict[str, TierShape] | None = None,
    ):
        super().__init__()
        check_dims(dims, num_embeddings)
        self.dims = {f: int(d) for f, d in dims.items() if d > 0}
        self.feature_names = list(self.dims)
        self.tier_shapes = {f: s for f, s in (tiers or {}).items() if f in self.dims}
        check_tiers(self.tier_shapes, self.dims, num_embeddings, managed)
        self.multi_valued = set(multi_valued)
        pooling = {f: PoolingType.MEAN for f in multi_valued}
        device = device or torch.device("meta")  # DMP materialises the shards
        # tier tables pool SUM (named by their tier feature, not in `pooling`): the field's mean
        # is taken over all its tiers in `assemble`
        widths, tier_rows = _tier_tables(self.dims, self.tier_shapes)
        self.deep = EmbeddingBagCollection(
            _tables("emb_", widths, num_embeddings | tier_rows, pooling, init_range), device=device
        )
        self.tier_maps = TierMaps(self.tier_shapes) if self.tier_shapes else None
        self.wide = (
            EmbeddingBagCollection(
                _tables("wide_", {f: WIDE_WIDTH for f in self.dims}, num_embeddings, pooling, 1e-3), device=device
            )
            if wide
            else None
        )
        self.vocab = build_vocabs(managed, self.feature_names)
        self._init = {"emb_": init_range, "wide_": 1e-3}
        self._row_targets: dict | None = None

    def remap(self, kjt: KeyedJaggedTensor, admit: bool | None = None) -> KeyedJaggedTensor:
        """The KJT with each managed field's raw ids replaced by its rows (admitting and evicting
        ids in training, unless `admit=False`); hashed fields as they are. The input KJT is not
        changed: every arm reads the same batch.

        By default only a training step admits: a forward in training mode with gradients on.
        A lookup under no_grad (a search scoring the control's rows, SSEDS's pooled embeddings)
        leaves the mapping alone, so every arm's mapping stays the one the training rows made."""
        if not len(self.vocab):
            return kjt
        if admit is None:
            admit = self.training and torch.is_grad_enabled()
        values, offsets, keys = kjt.values().clone(), kjt.offset_per_key(), kjt.keys()
        for i, k in enumerate(keys):
            if k in self.vocab:
                rows, evicted = self.vocab[k](values[offsets[i] : offsets[i + 1]], admit)
                values[offsets[i] : offsets[i + 1]] = rows
                if evicted is not None and evicted.numel():
                    self.reset_rows(k, evicted)
        return KeyedJaggedTensor(keys=keys, values=values, lengths=kjt.lengths(), stride=kjt.stride())

    @torch.no_grad()
    def reset_rows(self, field: str, rows: torch.Tensor) -> None:
        """Draw `rows` of the field's deep and wide tables afresh (uniform in their init range)
        and zero their fused optimizer state: a row handed to a new id starts as a new row.
        The draw is seeded by the table and the vocabulary's iteration (checkpointed), so a
        resumed run draws what an uninterrupted one does."""
        step = int(self.vocab[field].mch._current_iter_tensor.item())
        for prefix in ("emb_", "wide_"):
            target = self._targets().get(f"{prefix}{field}")
            if target is None:
                continue
            weight, states = target
            g = torch.Generator().manual_seed(zlib.crc32(f"{prefix}{field}".encode()) * 1_000_003 + step)
            lo = self._init[prefix]
            fresh = torch.empty(rows.numel(), weight.size(1)).uniform_(-lo, lo, generator=g)
            _write_rows(weight, rows, fresh)
            for st in states:
                _write_rows(st, rows, torch.zeros((rows.numel(), *st.size()[1:]), dtype=st.dtype))

    def _targets(self) -> dict:
        """{table: (weight, [optimizer state tensors])} of the (sharded) tables, views of the
        live storage (found once)."""
        if self._row_targets is None:
            self._row_targets = {}
            for ebc in (self.deep, self.wide):
                if ebc is None:
                    continue
                sd = ebc.state_dict()
                fused = getattr(ebc, "fused_optimizer", None)
                state = fused.state_dict()["state"] if fused is not None else {}
                for key, w in sd.items():
                    table = key.rsplit(".", 2)[-2]
                    st = [t for k, d in state.items() if k.endswith(f".{table}.weight") for t in d.values()]
                    self._row_targets[table] = (w, [t for t in st if torch.is_tensor(t) and t.dim() >= 1])
        return self._row_targets

    def _deep(self, kjt: KeyedJaggedTensor) -> list[torch.Tensor]:
        """The pooled deep embedding of every field ([B, d_i], `feature_names` order)."""
        if self.tier_maps is None:
            kt = self.deep(kjt).to_dict()
            return [kt[f] for f in self.feature_names]
        kt = self.deep(split_kjt(kjt, self.feature_names, self.tier_maps)).to_dict()
        return [
            assemble(kt, f, d, self.tier_shapes[f], kjt if f in self.multi_valued else None)
            if f in self.tier_shapes
            else kt[f]
            for f, d in self.dims.items()
        ]

    def forward(self, kjt: KeyedJaggedTensor, column_mask: dict[str, torch.Tensor] | None = None):
        kjt = self.remap(kjt)
        embs = self._deep(kjt)
        if column_mask is not None:
            embs = [e * column_mask[f] if f in column_mask else e for e, f in zip(embs, self.feature_names)]
        wide = self.wide(kjt).values().sum(dim=1) if self.wide is not None else None
        return embs, wide

    def forward_concat(self, kjt: KeyedJaggedTensor):
        """As forward without a mask, the deep embeddings as one [B, sum d_i] tensor in
        `feature_names` order: the collection's own output, with no per-field split to be
        concatenated again by the head (nor its backward)."""
        kjt = self.remap(kjt)
        if self.tier_maps is not None:
            x = torch.cat(self._deep(kjt), dim=1)
            wide = self.wide(kjt).values().sum(dim=1) if self.wide is not None else None
            return x, wide
        kt = self.deep(kjt)
        if kt.keys() == self.feature_names:
            x = kt.values()
        else:
            d = kt.to_dict()
            x = torch.cat([d[f] for f in self.feature_names], dim=1)
        wide = self.wide(kjt).values().sum(dim=1) if self.wide is not None else None
        return x, wide

    def embedding_params(self, num_embeddings: dict[str, int]) -> int:
        """Parameters of the deep tables, sum_i rows_i x d_i (the budget of SSEDS eq. 4); a
        tiered field's, the sum over its tier tables."""
        return sum(
            self.tier_shapes[f].params() if f in self.tier_shapes else num_embeddings[f] * d
            for f, d in self.dims.items()
        )


def _write_rows(t, rows: torch.Tensor, values: torch.Tensor) -> None:
    """t[rows] = values for a plain or sharded tensor (each local shard takes the rows and
    columns of its block)."""
    if not isinstance(t, ShardedTensor):
        t.detach()[rows] = values.to(t.dtype)
        return
    for s in t.local_shards():
        off, size = s.metadata.shard_offsets, s.metadata.shard_sizes
        sel = (rows >= off[0]) & (rows < off[0] + size[0])
        block = values[sel]
        if block.dim() == 2:
            block = block[:, off[1] : off[1] + size[1]]
        s.tensor.detach()[rows[sel] - off[0]] = block.to(s.tensor.dtype)
