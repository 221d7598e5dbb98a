"""Managed vocabularies: every admitted id of a field gets a row of its own.

A managed field (schema `vocab = "managed"`) reaches the model as raw 64-bit ids
(stream/decode.py `raw_ids`). `ManagedVocab` maps them onto the `capacity` rows of the field's
tables with TorchRec's zero-collision module, `MCHManagedCollisionModule`, and its
`LFU_EvictionPolicy` / `LRU_EvictionPolicy`:
- row `capacity - 1` is the default row: ids not (yet) admitted share it, as do ids that lose
  the competition for a row when the table is full (TorchRec keeps its last slot for them);
- every training forward admits the batch's new ids into free rows; once the table is full an
  id takes the row of the live id the policy scores lowest (LFU: fewest occurrences since it was
  admitted; LRU: longest unseen), and only if it scores higher: a new id seen once does not
  push out a live id seen more often (LFU) or as recently (LRU);
- an evicted id's rows (deep and wide) are drawn afresh and their optimizer state zeroed
  (`MixedEmbedding.reset_rows`), so the new id does not inherit the old id's values;
- `admit_after = N > 1` admits an id only once it has occurred N times in all, counted in a
  count-min sketch (DeepRec's counting-Bloom-filter admission, Monolith's occurrence threshold).

Why the module is TorchRec's but the wrapper is ours (benchmarks/mc_probe.py records the probe):
- `ManagedCollisionEmbeddingBagCollection` runs on this CPU stack only under a hand-made
  row-wise plan: its sharder offers row-wise sharding only, and TorchRec's planner offers no
  row-wise plan on CPU, so the planner-made plan of `shard` fails for it;
- its eviction reset (`reset_embedding_weight_momentum`) resets the optimizer state of
  row-wise Adagrad only (not this project's elementwise Adagrad), and it would need a second
  MC module (and mapping) for the wide table of the same field;
- TorchRec's admission filter (`threshold_filtering_func`) counts occurrences within one
  eviction interval, not since the id first came, and it also filters admitted ids (an LRU id
  seen once would not be refreshed);
- the module sizes its history buffer from the first batch (1.25 x its ids) and leaves ids
  beyond it out of admission in a larger batch, silently (`_fit_history` re-sizes it).
So one `MCHManagedCollisionModule` per field remaps the ids before both of the field's tables
(plain EBCs, sharded by the planner as every other table), with a cumulative admission sketch
in front of it. Its buffers (sorted raw ids, id -> row mapping, counts or last-access
iterations, iteration counter) are in the model's state_dict, so the DCP checkpoint carries them.

Ranks (torchrun): the module is replicated, not sharded, and every rank must hold the same
mapping, or a row of the sharded tables would mean another id on each rank. So a training step
admits from the step's ids of all ranks (`gather_step_ids`: two all_gathers over the default
group), the same union on every rank, and each rank then maps only its own ids. TorchRec's
update depends on the step's multiset of ids only (it sorts them: `torch.unique`), so the
mapping is the one a single process makes from the same rows; the evicted rows are the same on
every rank, and `MixedEmbedding.reset_rows` re-draws them from a seed of table and step, each
rank writing the blocks of its own shards. A world of one pays no collective.

>>> import torch
>>> v = ManagedVocab("user", capacity=4)
>>> rows, evicted = v(torch.tensor([11, 12, 11, 13, 14, 15]))
>>> rows.tolist()                      # 3 rows for ids, row 3 the default row
[0, 1, 0, 2, 3, 3]
>>> v.rows_in_use(), v.take_stats()["admissions"]
(3, 3)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.mc_modules import LFU_EvictionPolicy, LRU_EvictionPolicy, MCHManagedCollisionModule
from torchrec.sparse.jagged_tensor import JaggedTensor

from dimstream.stream.hashing import splitmix64

PAD_ID = 0  # the id of padding rows (models/distributed.py `pad`); decode never emits it
SENTINEL = torch.iinfo(torch.int64).max  # TorchRec's empty slot; decode never emits it
SKETCH_DEPTH = 4
_SKETCH_KEYS = [np.uint64((0x9E3779B97F4A7C15 * (d + 1)) % 2**64) for d in range(SKETCH_DEPTH)]
POLICIES = {"lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy}


class VocabError(ValueError):
    """A managed vocabulary that cannot be built."""


class ManagedVocab(nn.Module):
    """id -> row of one managed field (see the module doc)."""

    def __init__(self, field: str, capacity: int, eviction: str = "lfu", admit_after: int = 1, sketch_width=None):
        super().__init__()
        if eviction not in POLICIES:
            raise VocabError(f"field {field!r}: eviction must be lfu or lru, got {eviction!r}")
        if capacity < 2:
            raise VocabError(f"field {field!r}: capacity must be >= 2 (ids + the default row)")
        self.field, self.capacity, self.eviction, self.admit_after = field, int(capacity), eviction, int(admit_after)
        self.default_row = self.capacity - 1
        # built on the CPU, never on meta: DMP leaves this (unsharded) module as it is
        self.mch = MCHManagedCollisionModule(
            zch_size=self.capacity,
            device=torch.device("cpu"),
            eviction_policy=POLICIES[eviction](),
            eviction_interval=1,  # admit at every training step
            name=field,
        )
        if self.admit_after > 1:
            width = int(sketch_width or max(1024, 8 * self.capacity))
            self.register_buffer("sketch", torch.zeros(SKETCH_DEPTH, width, dtype=torch.int64))
        self._stats = {"admissions": 0, "evictions": 0, "lookups": 0, "default_lookups": 0}

    # --- the mapping -----------------------------------------------------------------------

    def forward(self, ids: torch.Tensor, admit: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows of `ids`, rows whose id changed in this call or None). Training admits and
        evicts; eval (or `admit=False`) only looks up (an unknown id reads the default row)."""
        if admit is False and self.training:
            self.eval()
            try:
                return self.forward(ids)
            finally:
                self.train()
        pad = ids == PAD_ID
        real = ids[~pad]
        evicted, before = None, self.rows_in_use() if self.training else 0
        if self.training:
            evicted = self._admit(real)
        rows = torch.full_like(ids, self.default_row)
        if real.numel():  # ids without a row of their own (unadmitted, or lost) read the default row
            jt = JaggedTensor(values=real, lengths=torch.tensor([real.numel()], dtype=torch.int64))
            rows[~pad] = self.mch.remap({self.field: jt})[self.field].values()
        if self.training:
            self._count(rows, pad, evicted, before)
        return rows, evicted

    def _admit(self, own: torch.Tensor) -> torch.Tensor | None:
        """Admission and eviction (TorchRec's profile/evict) on the step's ids of *every* rank,
        so that each rank's mapping is the one a single process makes from the step's rows; the
        rows whose id changed (the same on every rank), or None.

        Only real, admissible ids reach TorchRec's module: padding or unadmitted ids passed as a
        sentinel would be counted on a free slot (LFU) and could even be admitted themselves."""
        step = gather_step_ids(own)
        if self.admit_after > 1:
            step = step[self._admitted(step)]
        if not step.numel():
            return None
        self._fit_history(step.numel())
        jt = JaggedTensor(values=step, lengths=torch.tensor([step.numel()], dtype=torch.int64))
        self.mch.profile({self.field: jt})
        return self.mch.evict()

    def _fit_history(self, n: int) -> None:
        """TorchRec sizes the module's history buffer at 1.25 x the first batch's ids and leaves
        the ids beyond it out of admission, silently, in any larger batch (a multi-valued field's
        long batch, a first batch that was small): size it afresh for a larger batch. With one
        step per eviction interval the history is empty between steps, so nothing is lost."""
        if self.training and self.mch._input_history_buffer_size < n:
            self.mch._input_history_buffer_size = -1  # profile() re-sizes it from this batch

    def _admitted(self, ids: torch.Tensor) -> torch.Tensor:
        """Count the step's (real) ids, then which have occurred `admit_after` times in all,
        this step included (count-min sketch: the least of SKETCH_DEPTH hashed counters, never
        below the true count)."""
        cols = self._sketch_cols(ids)
        ones = torch.ones(ids.numel(), dtype=torch.int64)
        for d in range(SKETCH_DEPTH):  # loop over the sketch's rows, vectorised over ids
            self.sketch[d].index_add_(0, cols[d], ones)
        est = torch.stack([self.sketch[d][cols[d]] for d in range(SKETCH_DEPTH)]).min(dim=0).values
        return est >= self.admit_after

    def _sketch_cols(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The sketch column of every id in each of its rows: one splitmix64 hash per row, each
        row keyed by its own constant (so two ids that meet in one row rarely meet in another)."""
        v = ids.numpy().view(np.uint64)
        width = np.uint64(self.sketch.shape[1])
        return [torch.from_numpy((splitmix64(v ^ key) % width).astype(np.int64)) for key in _SKETCH_KEYS]

    def _count(self, rows, pad, evicted, before: int) -> None:
        new = 0 if evicted is None else int(evicted.numel())
        self._stats["admissions"] += new
        self._stats["evictions"] += new - (self.rows_in_use() - before)  # rows re-used, not filled
        real = ~pad
        self._stats["lookups"] += int(real.sum())
        self._stats["default_lookups"] += int((rows[real] == self.default_row).sum())

    # --- what the metrics and the tests read -----------------------------------------------

    def rows_in_use(self) -> int:
        """Rows holding a live id (the default row not counted)."""
        return int((self.mch._mch_sorted_raw_ids != SENTINEL).sum())

    def mapping(self) -> dict[int, int]:
        """{raw id: row} of every live id."""
        raw = self.mch._mch_sorted_raw_ids
        live = raw != SENTINEL
        return dict(zip(raw[live].tolist(), self.mch._mch_remapped_ids_mapping[live].tolist()))

    def owners(self) -> torch.Tensor:
        """[capacity]: the raw id each row holds (SENTINEL for a free row and the default row)."""
        raw = self.mch._mch_sorted_raw_ids
        live = raw != SENTINEL
        out = torch.full((self.capacity,), SENTINEL, dtype=torch.int64)
        out[self.mch._mch_remapped_ids_mapping[live]] = raw[live]
        return out

    def options(self) -> dict:
        """What builds this vocabulary again (`build_vocabs` takes it in place of a FieldSpec)."""
        return {"capacity": self.capacity, "eviction": self.eviction, "admit_after": self.admit_after}

    def take_stats(self) -> dict:
        """Admissions, evictions, lookups and default-row lookups since the last call (one
        window), with the rows in use now; the counters restart."""
        out = dict(self._stats) | {"rows_in_use": self.rows_in_use(), "capacity": self.capacity}
        out["default_share"] = out["default_lookups"] / out["lookups"] if out["lookups"] else 0.0
        self._stats = dict.fromkeys(self._stats, 0)
        return out


def build_vocabs(managed: dict, fields: list[str]) -> nn.ModuleDict:
    """One ManagedVocab per managed field the model keeps. `managed` maps a field to its
    options: a schema FieldSpec, or a dict of capacity, eviction and admit_after
    (`ManagedVocab.options`)."""
    get = lambda o, k: o[k] if isinstance(o, dict) else getattr(o, k)  # noqa: E731
    return nn.ModuleDict(
        {
            f: ManagedVocab(f, int(get(o, "capacity")), get(o, "eviction"), int(get(o, "admit_after")))
            for f, o in (managed or {}).items()
            if f in fields
        }
    )


def gather_step_ids(own: torch.Tensor) -> torch.Tensor:
    """The ids of one training step over all ranks, rank by rank (`own` itself in a world of
    one: no collective). Every rank takes each step (models/distributed.py pads a short rank's
    steps), so the two all_gathers (lengths, then the ids padded to the longest) match.

    >>> gather_step_ids(torch.tensor([5, 7])).tolist()
    [5, 7]
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return own
    world = dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([own.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(x) for x in sizes]
    if max(sizes) == 0:
        return own
    padded = torch.full((max(sizes),), PAD_ID, dtype=torch.int64, device=dev)
    padded[: own.numel()] = own.to(dev)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:k] for o, k in zip(out, sizes)]).to(own.device)


def vocabs_of(model) -> dict[str, ManagedVocab]:
    """The managed vocabularies of an Arm, a DMP model or a module, by field."""
    root = getattr(model, "model", model)
    return {m.field: m for m in root.modules() if isinstance(m, ManagedVocab)}
