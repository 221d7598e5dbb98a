"""A serving copy of one arm: plain PyTorch, no TorchRec, no sharding, no optimizer state.

`export_arm` turns a checkpointed arm into a directory a serving process loads on its own:
  model.json   -- schema (fields, hash buckets, label/event-time columns), hashing scheme,
                  allocation (dims per field), model config
  weights.pt   -- plain tensors (torch.load(weights_only=True)): emb_<field>, wide_<field>, head.*
`ServingModel.load(dir)` rebuilds the same heads (models/heads.py) over nn.EmbeddingBag tables;
the stable hash (stream/hashing.py) maps ids to the same rows as in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dimstream.models.config import ModelConfig
from dimstream.models.embedding import WIDE_WIDTH
from dimstream.models.heads import HEADS, USES_WIDE
from dimstream.stream.batch import SparseBatch
from dimstream.stream.schema import Schema

FORMAT = "dimstream-serving/1"


class ServingModel(nn.Module):
    def __init__(self, schema: Schema, dims: dict[str, int], config: ModelConfig):
        super().__init__()
        self.schema, self.config = schema, config
        self.feature_names = [f.name for f in schema.fields if dims.get(f.name, 0) > 0]
        self.dims = {f: int(dims[f]) for f in self.feature_names}
        mode = {f.name: ("mean" if f.kind == "multi" else "sum") for f in schema.fields}
        rows = schema.num_embeddings
        self.emb = nn.ModuleDict({f: nn.EmbeddingBag(rows[f], d, mode=mode[f]) for f, d in self.dims.items()})
        self.use_wide = USES_WIDE[config.model]
        self.wide = (
            nn.ModuleDict({f: nn.EmbeddingBag(rows[f], WIDE_WIDTH, mode=mode[f]) for f in self.dims})
            if self.use_wide
            else None
        )
        widths = [self.dims[f] for f in self.feature_names]
        kwargs = {"layers": config.dcn_layers} if config.model == "dcnv2" else {}
        self.head = HEADS[config.model](widths, config.interaction_dim or max(widths), config.mlp, **kwargs)

    @torch.no_grad()
    def forward(self, batch: SparseBatch) -> torch.Tensor:
        """Click probabilities for the rows of `batch`."""
        embs, wide = [], 0.0
        for f in self.feature_names:
            values = torch.from_numpy(batch.values[f])
            offsets = torch.from_numpy(batch.offsets[f][:-1])
            embs.append(self.emb[f](values, offsets))
            if self.use_wide:
                wide = wide + self.wide[f](values, offsets).sum(dim=1)
        return torch.sigmoid(self.head(embs, wide))

    @classmethod
    def load(cls, directory: Path) -> ServingModel:
        d = Path(directory)
        meta = json.loads((d / "model.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d}/model.json is not a {FORMAT} export")
        cfg = meta["model"] | {"mlp": tuple(meta["model"]["mlp"])}
        model = cls(Schema.from_dict(meta["schema"]), meta["dims"], ModelConfig(**cfg))
        state = torch.load(d / "weights.pt", weights_only=True)
        mine = {}
        for f in model.feature_names:
            mine[f"emb.{f}.weight"] = state[f"emb_{f}"]
            if model.use_wide:
                mine[f"wide.{f}.weight"] = state[f"wide_{f}"]
        mine |= {k: v for k, v in state.items() if k.startswith("head.")}
        model.load_state_dict(mine)
        return model.eval()


def _whole(value) -> torch.Tensor:
    """A checkpointed tensor: a plain tensor, or the list of a table's row-wise shards."""
    return torch.cat(value, dim=0) if isinstance(value, list) else value


def serving_weights(model_state: dict) -> dict[str, torch.Tensor]:
    """Checkpoint model state (DMP names) -> serving names."""
    out = {}
    for k, v in model_state.items():
        if ".embedding_bags." in k:
            out[k.split(".embedding_bags.")[1].rsplit(".", 1)[0]] = _whole(v)
        elif k.startswith("head."):
            out[k] = _whole(v)
    return out
