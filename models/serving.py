"""A serving copy of one arm: plain PyTorch, no TorchRec, no sharding, no optimizer state.

`export_arm` turns a checkpointed arm into a directory a serving process loads on its own:
  model.json   -- schema (fields, hash buckets, label/event-time columns), hashing scheme,
                  allocation (dims per field), model config
  weights.pt   -- plain tensors (torch.load(weights_only=True)): emb_<field>, wide_<field>, head.*
`ServingModel.load(dir)` rebuilds the same heads (models/heads.py) over nn.EmbeddingBag tables;
the stable hash (stream/hashing.py) maps ids to the same rows as in training.

A managed field (schema `vocab = "managed"`, models/vocab.py) reaches the model as raw 64-bit
ids (stream/decode.py `raw_ids`); the export carries its mapping as `vocab_<field>/raw_ids`
(sorted) and `vocab_<field>/rows`, and `RowMap` looks ids up in it (one searchsorted), every id
the trainer gave no row reading the field's default row, as TorchRec's remap does.

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
VOCAB = "vocab_"  # weight names of a managed field's mapping: vocab_<field>/raw_ids, vocab_<field>/rows
SENTINEL = torch.iinfo(torch.int64).max  # an empty slot of TorchRec's sorted ids (models/vocab.py)


class RowMap:
    """Raw id -> row of one managed field, as the trainer's vocabulary maps it in eval (TorchRec's
    `_mch_remap`: a searchsorted over the sorted live ids; an id not among them reads the
    default row). Vectorised: one searchsorted per batch, no Python loop over ids.

    >>> m = RowMap(torch.tensor([30, 10, 20]), torch.tensor([2, 0, 1]), default_row=3)
    >>> m(torch.tensor([10, 20, 30, 25, 99, -5])).tolist()
    [0, 1, 2, 3, 3, 3]
    """

    def __init__(self, raw_ids: torch.Tensor, rows: torch.Tensor, default_row: int):
        if raw_ids.shape != rows.shape or raw_ids.dim() != 1:
            raise ValueError(f"a mapping needs as many rows as ids, got {tuple(raw_ids.shape)} / {tuple(rows.shape)}")
        order = torch.argsort(raw_ids)
        self.raw_ids, self.rows = raw_ids[order].to(torch.int64).contiguous(), rows[order].to(torch.int64)
        self.default_row = int(default_row)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.raw_ids.numel():
            return torch.full_like(ids, self.default_row)
        pos = torch.searchsorted(self.raw_ids, ids).clamp_(max=self.raw_ids.numel() - 1)
        return torch.where(self.raw_ids[pos] == ids, self.rows[pos], self.default_row)

    @classmethod
    def from_tensors(cls, tensors: dict, field: str, default_row: int) -> RowMap:
        key = f"{VOCAB}{field}"
        return cls(tensors[f"{key}/raw_ids"], tensors[f"{key}/rows"], default_row)


class ServingModel(nn.Module):
    def __init__(
        self, schema: Schema, dims: dict[str, int], config: ModelConfig, wide_width: int = 4, precision: str = "fp32"
    ):
        """`precision`: what the trainer's heads ran in ('fp32' or 'bf16', the export's
        "precision"): the head scores in the same, so that serving matches the trainer."""
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16' (as resolved by the trainer), got {precision!r}")
        self.version, self.chain, self.published_at = None, [], None
        self.schema, self.config, self.precision = schema, config, precision
        self.feature_names = [f.name for f in schema.fields if dims.get(f.name, 0) > 0]
        self.dims = {f: int(dims[f]) for f in self.feature_names}
        # the managed fields the model keeps; their RowMaps are set by `set_vocab` (load, deltas)
        self.managed = [f for f in self.feature_names if f in schema.managed]
        self.vocab: dict[str, RowMap] = {}
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
            if f in self.vocab:  # raw ids -> the rows the trainer gave them
                values = self.vocab[f](values)
            starts = batch.offsets[f][:-1]  # unit offsets are shared and read-only: a copy of those
            offsets = torch.from_numpy(starts if starts.flags.writeable else starts.copy())
            embs.append(self.emb[f](values, offsets))
            if self.use_wide:
                wide = wide + self.wide[f](values, offsets).sum(dim=1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.head(embs, wide)
        return torch.sigmoid(logits.float())

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
        # an export older than the "precision" key was served in fp32
        precision = bmeta.get("precision", "fp32")
        model = cls(Schema.from_dict(bmeta["schema"]), bmeta["dims"], ModelConfig(**cfg), wide, precision)
        model.load_state_dict(model._serving_names(state))
        model.set_vocab(state, base)
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

    def set_vocab(self, tensors: dict, where: Path, replace_only: bool = False) -> None:
        """The RowMap of each managed field from `tensors` (a base's weights, a delta's vocab).
        A base must carry every managed field's mapping: without it raw ids would be used as rows."""
        for f in self.managed:
            if f"{VOCAB}{f}/raw_ids" in tensors:
                self.vocab[f] = RowMap.from_tensors(tensors, f, self.schema.num_embeddings[f] - 1)
            elif not replace_only:
                raise ValueError(f"{where}: no mapping for managed field {f!r} ({VOCAB}{f}/raw_ids)")

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
        if meta.get("vocab"):  # the whole mapping of each managed field, as of this version
            self.set_vocab(load_tensors(d / "vocab"), d, replace_only=True)
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
    """Checkpoint model state (DMP names) -> serving names; a managed field's mapping (its
    TorchRec buffers, models/vocab.py) as `vocab_<field>/raw_ids` and `/rows` (`vocab_mapping`)."""
    out = {}
    for k, v in model_state.items():
        if ".embedding_bags." in k:
            out[k.split(".embedding_bags.")[1].rsplit(".", 1)[0]] = _whole(v)
        elif k.startswith("head."):
            out[k] = _whole(v)
        elif ".vocab." in k and k.endswith(".mch._mch_sorted_raw_ids"):
            field = k.split(".vocab.")[1].rsplit(".mch.", 1)[0]
            rows = model_state[k.replace("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping")]
            out |= vocab_mapping(field, v, rows)
    return out


def vocab_mapping(field: str, sorted_raw_ids: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The live ids of a managed field (TorchRec's empty slots left out), sorted, and their rows.

    >>> m = vocab_mapping("user", torch.tensor([5, 9, SENTINEL]), torch.tensor([1, 0, 2]))
    >>> m["vocab_user/raw_ids"].tolist(), m["vocab_user/rows"].tolist()
    ([5, 9], [1, 0])
    """
    live = sorted_raw_ids != SENTINEL
    ids, order = torch.sort(sorted_raw_ids[live])
    key = f"{VOCAB}{field}"
    return {f"{key}/raw_ids": ids.clone(), f"{key}/rows": rows[live][order].clone()}


def vocab_header(weights: dict, schema: dict) -> dict:
    """model.json's `vocab`: per managed field its live ids and its default row (capacity - 1)."""
    rows = Schema.from_dict(schema).num_embeddings if schema else {}
    out = {}
    for k, v in weights.items():
        if k.startswith(VOCAB) and k.endswith("/raw_ids"):
            f = k[len(VOCAB) : -len("/raw_ids")]
            out[f] = {"live_ids": int(v.numel()), "default_row": rows[f] - 1 if f in rows else None}
    return out
