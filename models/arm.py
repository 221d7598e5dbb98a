"""An arm: one CTR model in its own shape (allocation), sharded, with its optimizers.

The window loop evaluates every arm on a window before training it (test-then-train).
Sparse parameters are updated by TorchRec's fused optimizer inside backward
(`apply_optimizer_in_backward`); dense parameters by Adam.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dimstream.models.config import ModelConfig
from dimstream.models.ctr import CTRModel, ctr_model
from dimstream.models.distributed import shard
from dimstream.models.tiers import TierShape
from dimstream.models.vocab import vocabs_of
from dimstream.stream.batch import SparseBatch


@dataclass
class ArmSpec:
    """Configuration of one arm: a name and its embedding dimension per field.

    Frequency tiers (models/tiers.py), for the fields in `tiers`: tiers[f][t] lists the control
    columns tier t's table keeps (its width is their number) and tier_rows[f][t] its rows; the
    field's dim is then the number of columns any tier kept, column_ids[f] those columns
    (sorted). `tier_of[f]` ([rows] ints), the tier of every id, is what a new arm is built
    with; it is not part of the spec's JSON: a checkpoint's arm takes it from its state."""

    name: str
    dims: dict[str, int]
    column_ids: dict[str, list[int]] = field(default_factory=dict)  # control column of each column
    tiers: dict[str, list[list[int]]] = field(default_factory=dict)
    tier_rows: dict[str, list[int]] = field(default_factory=dict)
    tier_of: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for f, d in self.dims.items():
            self.column_ids.setdefault(f, list(range(d)))
        for f, cols in self.tiers.items():
            union = sorted({c for tier in cols for c in tier})
            if self.dims.get(f) != len(union) or sorted(self.column_ids[f][: self.dims[f]]) != union:
                raise ValueError(f"tiered field {f!r}: its dim and column_ids must be the union of its tiers' columns")
            if len(self.tier_rows.get(f, [])) != len(cols):
                raise ValueError(f"tiered field {f!r}: tier_rows must give the rows of each of its {len(cols)} tiers")

    def to_dict(self) -> dict:
        """The JSON a checkpoint's meta keeps of the arm (without `tier_of`)."""
        out = {"name": self.name, "dims": self.dims, "column_ids": self.column_ids}
        return out | ({"tiers": self.tiers, "tier_rows": self.tier_rows} if self.tiers else {})

    @classmethod
    def from_dict(cls, d: dict) -> ArmSpec:
        return cls(d["name"], d["dims"], d["column_ids"], d.get("tiers", {}), d.get("tier_rows", {}))

    @classmethod
    def from_tiers(cls, name: str, fields: list[str], tiers: dict) -> ArmSpec:
        """The spec of a (field, tier) allocation (search/autosrh.py `tiered_allocation`:
        kept_columns[f][t], rows[f][t], tier_of[f]); a field no tier keeps a column of gets 0.

        >>> s = ArmSpec.from_tiers("slim", ["a", "b"], {"kept_columns": {"a": [[4, 0, 1, 2], []],
        ...     "b": [[], []]}, "rows": {"a": [2, 3], "b": [1, 4]}, "tier_of": {"a": [0, 1, 1, 0, 1]}})
        >>> s.dims, s.column_ids["a"], s.tiers, s.tier_rows
        ({'a': 4, 'b': 0}, [0, 1, 2, 4], {'a': [[0, 1, 2, 4], []]}, {'a': [2, 3]})
        """
        dims, column_ids, cols, rows, tier_of = {}, {}, {}, {}, {}
        for f in fields:
            per_tier = [sorted(int(c) for c in k) for k in tiers["kept_columns"].get(f, [])]
            union = sorted({c for k in per_tier for c in k})
            dims[f], column_ids[f] = len(union), union
            if union:
                cols[f], rows[f] = per_tier, [int(n) for n in tiers["rows"][f]]
                tier_of[f] = tiers["tier_of"][f]
        return cls(name, dims, column_ids, cols, rows, tier_of)

    def tier_shapes(self) -> dict[str, TierShape]:
        """The tiered fields as the embedding builds them: each tier's columns as positions in
        the field's output (column_ids order)."""
        out = {}
        for f, cols in self.tiers.items():
            pos = {c: i for i, c in enumerate(self.column_ids[f][: self.dims[f]])}
            out[f] = TierShape(tuple(tuple(pos[c] for c in tier) for tier in cols), tuple(self.tier_rows[f]))
        return out


def _sparse_optimizer(config: ModelConfig):
    if config.sparse_optimizer == "adagrad":
        return torch.optim.Adagrad, {"lr": config.sparse_lr, "eps": 1e-8}
    if config.sparse_optimizer == "sgd":  # exact SGD: used by tests that check gradients
        return torch.optim.SGD, {"lr": config.sparse_lr}
    if config.sparse_optimizer == "rowwise_adagrad":  # FBGEMM's EXACT_ROWWISE_ADAGRAD: one state per row
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad, {"lr": config.sparse_lr, "eps": 1e-8}
    if config.sparse_optimizer == "rowwise_adam":  # FBGEMM's partial row-wise Adam
        from torchrec.optim import PartialRowWiseAdam

        return PartialRowWiseAdam, {"lr": config.sparse_lr}
    raise ValueError(f"unknown sparse optimizer {config.sparse_optimizer!r}")


class Arm:
    def __init__(
        self,
        spec: ArmSpec,
        num_embeddings: dict[str, int],
        multi_valued: set[str],
        config: ModelConfig,
        managed: dict | None = None,
    ):
        """`managed`: the schema's managed fields (`Schema.managed`), whose ids the arm maps
        onto rows itself (models/vocab.py)."""
        self.spec = spec
        self.managed = dict(managed or {})
        self.rows = dict(num_embeddings)
        self.name = spec.name
        self.config = config
        torch.manual_seed(config.seed)
        module = CTRModel(
            spec.dims, num_embeddings, multi_valued, config, managed=self.managed, tiers=spec.tier_shapes()
        )
        for f, tier_of in spec.tier_of.items():
            if f in spec.tiers and spec.dims.get(f, 0):
                module.embedding.tier_maps.assign(f, tier_of)
        self.feature_names = module.feature_names
        self.embedding_params = module.embedding_params
        opt_cls, opt_kwargs = _sparse_optimizer(config)
        apply_optimizer_in_backward(opt_cls, module.embedding.parameters(), opt_kwargs)
        self.model = shard(module)
        dense = [p for n, p in self.model.named_parameters() if ".embedding." not in f".{n}"]
        self.dense_optimizer = torch.optim.Adam(dense, lr=config.dense_lr)
        self.loss_fn = torch.nn.BCEWithLogitsLoss()

    @property
    def dims(self) -> dict[str, int]:
        """Allocation with every schema field (0 = pruned)."""
        return dict(self.spec.dims)

    @property
    def precision(self) -> str:
        """What the heads run in, 'fp32' or 'bf16' (`auto` resolved on the dense part's device):
        an export records it so that serving scores in the same (ops/export.py)."""
        module = ctr_model(self.model)
        return module.precision_on(next(module.head.parameters()).device.type)

    def vocab_stats(self) -> dict[str, dict]:
        """Per managed field: rows in use, admissions, evictions and default-row share since the
        last call (one window: the metrics call it as each window closes)."""
        return {f: v.take_stats() for f, v in vocabs_of(self.model).items()}

    def kjt(self, batch: SparseBatch) -> KeyedJaggedTensor:
        self._check_rows(batch)
        return batch.to_kjt(self.feature_names)

    def _check_rows(self, batch: SparseBatch) -> None:
        """A hashed field's ids must be rows of its table: raw 64-bit ids (a managed field of
        a schema whose `managed` fields this arm was not built with) would be clamped by FBGEMM
        into wrong rows with at most a warning. One min and max per field: vectorised."""
        for f in self.feature_names:
            v = batch.values[f]
            if f not in self.managed and len(v) and (v.min() < 0 or v.max() >= self.rows[f]):
                raise ValueError(
                    f"field {f!r}: ids outside its {self.rows[f]} rows (a managed field? build the "
                    "Arm with managed=schema.managed)"
                )

    @torch.no_grad()
    def predict(self, batch: SparseBatch, batch_size: int = 8192) -> np.ndarray:
        """Click probabilities for every row (in mini-batches)."""
        self.model.eval()
        out = []
        for start in range(0, len(batch), batch_size):
            part = batch.slice(start, min(start + batch_size, len(batch)))
            out.append(torch.sigmoid(self.model(self.kjt(part))).numpy())
        self.model.train()
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def train_step(self, batch: SparseBatch) -> np.ndarray:
        """One update on `batch`; returns the click probabilities predicted *before* the update.

        Those predictions are progressive validation at mini-batch grain: every row is scored by
        the model that has not yet trained on it (test-then-train), at no extra forward pass."""
        logits = self.model(self.kjt(batch))
        loss = self.loss_fn(logits, batch.labels_tensor())
        self.dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()  # also applies the fused sparse update
        self.dense_optimizer.step()
        return torch.sigmoid(logits.detach()).numpy()
