"""A serving copy of one arm: plain PyTorch, no TorchRec, no sharding, no optimizer state.

`export_arm` turns a checkpointed arm into a directory a serving process loads on its own:
  model.json   -- schema (fields, hash buckets, label/event-time columns), hashing scheme,
                  allocation (dims per field), model config
  weights.pt   -- plain tensors (torch.load(weights_only=True)): emb_<field>, wide_<field>, head.*
`ServingModel.load(dir)` rebuilds the same heads (models/heads.py) over nn.EmbeddingBag tables;
the stable hash (stream/hashing.py) maps ids to the same rows as in training.

A delta version (README "Serving": model.json `kind = "delta"`) holds only the rows each table
changed since its parent plus the dense weights; `load` replays its `chain` (base first) and
`apply_delta` applies one more delta in place. Nothing here imports TorchRec.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dimstream.models.config import ModelConfig
from dimstream.models.heads import HEADS, USES_WIDE
from dimstream.stream.batch import SparseBatch
from dimstream.stream.schema import Schema

FORMAT = "dimstream-serving/1"


class ServingModel(nn.Module):
    def __init__(self, schema: Schema, dims: dict[str, int], config: ModelConfig, wide_width: int = 4):
        super().__init__()
        self.version, self.chain, self.published_at = None, [], None
        self.schema, self.config = schema, config
        self.feature_names = [f.name for f in schema.fields if dims.get(f.name, 0) > 0]
        self.dims = {f: int(dims[f]) for f in self.feature_names}
        mode = {f.name: ("mean" if f.kind == "multi" else "sum") for f in schema.fields}
        rows = schema.num_embeddings
        self.emb = nn.ModuleDict({f: nn.EmbeddingBag(rows[f], d, mode=mode[f]) for f, d in self.dims.items()})
        self.use_wide = USES_WIDE[config.model]
        self.wide = (
            nn.ModuleDict({f: nn.EmbeddingBag(rows[f], wide_width, mode=mode[f]) for f in self.dims})
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
        """A base export, or a delta with its chain replayed from the base (same parent dir)."""
        d = Path(directory)
        meta = read_meta(d)
        chain = meta.get("chain", [d.name])
        base = d.parent / chain[0] if meta.get("kind") == "delta" else d
        bmeta = read_meta(base) if base != d else meta
        cfg = bmeta["model"] | {"mlp": tuple(bmeta["model"]["mlp"])}
        state = torch.load(base / "weights.pt", weights_only=True)
        wide = next((v.shape[1] for k, v in state.items() if k.startswith("wide_")), 4)
        model = cls(Schema.from_dict(bmeta["schema"]), bmeta["dims"], ModelConfig(**cfg), wide)
        model.load_state_dict(model._serving_names(state))
        model._stamp(base.name, bmeta)
        for name in chain[1:] if base != d else []:
            model.apply_delta(d.parent / name)
        return model.eval()

    def _serving_names(self, state: dict) -> dict:
        mine = {}
        for f in self.feature_names:
            mine[f"emb.{f}.weight"] = state[f"emb_{f}"]
            if self.use_wide:
                mine[f"wide.{f}.weight"] = state[f"wide_{f}"]
        return mine | {k: v for k, v in state.items() if k.startswith("head.")}

    def _stamp(self, name: str, meta: dict) -> None:
        self.version, self.published_at = name, meta.get("published_at")
        self.chain = list(meta.get("chain", [name]))

    @torch.no_grad()
    def apply_delta(self, directory: Path) -> None:
        """Overwrite the rows a delta lists and load its dense weights; its parent must be the
        version this model holds (`chain` checked), so deltas apply in order only."""
        d = Path(directory)
        meta = read_meta(d)
        if meta.get("kind") != "delta" or meta["chain"][:-1] != self.chain:
            raise ValueError(f"{d} does not follow {self.version} (chain {meta.get('chain')})")
        rows, dense = load_tensors(d / "rows"), load_tensors(d / "dense")
        params = dict(self.named_parameters())
        for table in meta["tables"]:
            ids, values = rows[f"{table}/ids"], rows[f"{table}/rows"]
            params[self._param_name(table)][ids] = values
        self.load_state_dict(dense, strict=False)
        self._stamp(d.name, meta)

    @staticmethod
    def _param_name(table: str) -> str:
        kind, field = table.split("_", 1)  # emb_<field> / wide_<field>
        return f"{kind}.{field}.weight"


def read_meta(directory: Path) -> dict:
    d = Path(directory)
    meta = json.loads((d / "model.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d}/model.json is not a {FORMAT} export")
    return meta


def save_tensors(tensors: dict[str, torch.Tensor], stem: Path) -> Path:
    """`stem`.safetensors if safetensors is installed, else `stem`.pt (torch.save)."""
    flat = {k: v.detach().contiguous() for k, v in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        path = Path(f"{stem}.pt")
        torch.save(flat, path)
        return path
    path = Path(f"{stem}.safetensors")
    save_file(flat, str(path))
    return path


def load_tensors(stem: Path) -> dict[str, torch.Tensor]:
    if Path(f"{stem}.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(f"{stem}.safetensors")
    return torch.load(f"{stem}.pt", weights_only=True)


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
