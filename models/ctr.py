"""CTRModel: MixedEmbedding + an interaction head, the unit one arm trains.

>>> import torch
>>> from dimstream.models.config import ModelConfig, resolve_precision
>>> m = CTRModel({"a": 8, "b": 4}, {"a": 10, "b": 10}, set(), ModelConfig("fm"), device=torch.device("cpu"))
>>> m.feature_names, m.embedding_params
(['a', 'b'], 120)
>>> [(t.key, t.axes, t.param is None) for t in m.column_tied()]   # k = 8: b is projected, a is not
[('proj[a]', (1,), True), ('proj[b]', (1,), False)]
>>> ctr_model(m) is m
True
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dimstream.models.config import ModelConfig, resolve_precision
from dimstream.models.embedding import MixedEmbedding
from dimstream.models.heads import HEADS, USES_WIDE, ColumnTied


class CTRModel(nn.Module):
    def __init__(
        self,
        dims: dict[str, int],
        num_embeddings: dict[str, int],
        multi_valued: set[str],
        config: ModelConfig,
        device: torch.device | None = None,
        managed: dict | None = None,
        tiers: dict | None = None,
    ):
        """`tiers`: {field: TierShape} of the tiered fields (models/tiers.py)."""
        super().__init__()
        self.config = config
        self.num_embeddings = dict(num_embeddings)
        self.embedding = MixedEmbedding(
            dims,
            num_embeddings,
            multi_valued,
            wide=USES_WIDE[config.model],
            device=device,
            init_range=config.init_range,
            managed=managed,
            tiers=tiers,
        )
        widths = [self.embedding.dims[f] for f in self.embedding.feature_names]
        k = config.interaction_dim or max(widths)
        head_cls = HEADS[config.model]
        kwargs = {"layers": config.dcn_layers} if config.model == "dcnv2" else {}
        self.head = head_cls(widths, k, config.mlp, **kwargs)
        self._precision: dict[str, bool] = {}

    @property
    def feature_names(self) -> list[str]:
        return self.embedding.feature_names

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.embedding.dims)

    @property
    def embedding_params(self) -> int:
        return self.embedding.embedding_params(self.num_embeddings)

    def column_tied(self) -> list[ColumnTied]:
        """The head's parameters tied to embedding columns (models/heads.py), keyed by field name."""
        return self.head.column_tied(self.feature_names)

    def forward(self, kjt: KeyedJaggedTensor, column_mask: dict[str, torch.Tensor] | None = None):
        """Logits [B] (fp32). `column_mask[field]` ([d_i]) scales the field's embedding columns.

        Under bf16 precision the head runs in autocast: its GEMMs take bf16 copies of the fp32
        weights, so the weights, their gradients and the optimizer state stay fp32, and the
        embedding lookups (FBGEMM, outside autocast's op lists) stay fp32 too."""
        if column_mask is None:  # the hot path: the collection's concatenated output as it is
            embs, wide = self.embedding.forward_concat(kjt)
        else:
            embs, wide = self.embedding(kjt, column_mask)
        device = kjt.values().device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self._bf16(device)):
            logits = self.head(embs, wide if wide is not None else 0.0)
        return logits.float()

    def precision_on(self, device_type: str) -> str:
        """'fp32' or 'bf16': what this model's heads run in on `device_type` (`auto` resolved),
        so that serving scores with what training ran (ops/export.py records it)."""
        return "bf16" if self._bf16(device_type) else "fp32"

    def _bf16(self, device_type: str) -> bool:
        if device_type not in self._precision:  # resolved once per device type (auto reads cpuinfo)
            self._precision[device_type] = resolve_precision(self.config.precision, device_type) == "bf16"
        return self._precision[device_type]


def ctr_model(model) -> CTRModel:
    """The CTRModel inside an Arm, a DistributedModelParallel, or the CTRModel itself."""
    inner = getattr(model, "model", model)  # Arm -> DMP (or a CTRModel has no .model)
    inner = getattr(inner, "module", inner)  # DMP -> CTRModel
    if not isinstance(inner, CTRModel):
        raise TypeError(f"expected an Arm, a DistributedModelParallel or a CTRModel, got {type(model).__name__}")
    return inner
