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
from dimstream.models.ctr import CTRModel
from dimstream.models.distributed import shard
from dimstream.models.vocab import vocabs_of
from dimstream.stream.batch import SparseBatch


@dataclass
class ArmSpec:
    """Configuration of one arm: a name and its embedding dimension per field."""

    name: str
    dims: dict[str, int]
    column_ids: dict[str, list[int]] = field(default_factory=dict)  # control column of each column

    def __post_init__(self):
        for f, d in self.dims.items():
            self.column_ids.setdefault(f, list(range(d)))


def _sparse_optimizer(config: ModelConfig):
    if config.sparse_optimizer == "adagrad":
        return torch.optim.Adagrad, {"lr": config.sparse_lr, "eps": 1e-8}
    if config.sparse_optimizer == "sgd":  # exact SGD: used by tests that check gradients
        return torch.optim.SGD, {"lr": config.sparse_lr}
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
        module = CTRModel(spec.dims, num_embeddings, multi_valued, config, managed=self.managed)
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
