"""The AdaS&S supernet (Wei et al., section 3.1): shared max-tables, adaptive sampling, transforms.

Shared scheme: one max-table per field (TorchRec, sharded like every arm, fused sparse
optimizer); candidate size d_t of field i is the first d_t columns of its max-table. Candidate
sizes are `SIZES` = (0, 4, 8, ..., max_dim): index 0 means "field dropped" (feature sampling),
index t > 0 is width 4t. An architecture is an int array [M] of such indices, field order.

Adaptive sampling (eq. 4): every training mini-batch trains one sampled subnet. Embedding-size
sampling ES draws a size t > 0 per field from the categorical P_E[i] (eq. 5 moves P_E towards
the candidates whose values vary least, the under-trained ones); feature sampling FS keeps
field i with probability P_F[i] (eq. 6 raises P_F of the fields with larger gradients and L1
norms). Both rates are updated after each step from that step's embeddings and gradients.

Unifying (eq. 7): one Linear(d_t -> d_f) + BatchNorm1d(d_f) per candidate size, shared by all
fields, maps the chosen embeddings to one width d_f; a dropped field contributes zeros. The
main model is the configured head (models/heads.py) over M fields of width d_f, plus the
first-order weights of the kept fields (per field, not per candidate: as in the arms, a field
of width 0 has none).

The supernet is not an A/B arm: it trains test-then-train on every window (the daemon,
ops/searching.py), reports the progressive AUC of its sampled subnets, and the RL search
(search/adass.py) evaluates subnets on it with inherited weights (`subnet_logits`).

Managed fields (`managed`, models/vocab.py): the supernet admits nothing itself. Its max-tables
look each id up through the control's mapping, adopted by `follow(control)` before each of its
windows (and before a bootstrap copies the control's tables), so a row of a max-table, of the
control and of a slim arm warm-started from the supernet (`copy_tables_into`) is one id. A row
whose id changed since the last adoption is drawn afresh (`MixedEmbedding.reset_rows`).

>>> from dimstream.models.config import ModelConfig
>>> net = Supernet({"a": 10, "b": 20}, set(), ModelConfig("fm", batch_size=8), max_dim=8)
>>> net.sizes, net.p_e.shape, net.p_f.tolist()
((0, 4, 8), (2, 2), [0.8, 0.8])
>>> update_pe(np.array([[0.5, 0.5]]), np.array([[1.0, 3.0]]), eta=0.1).round(3).tolist()  # low variance gains
[[0.6, 0.4]]
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dimstream.models.arm import _sparse_optimizer
from dimstream.models.config import ModelConfig
from dimstream.models.distributed import shard, world_size
from dimstream.models.embedding import MixedEmbedding
from dimstream.models.heads import HEADS, USES_WIDE
from dimstream.models.vocab import SENTINEL, vocabs_of
from dimstream.stream.batch import SparseBatch

QUANTUM = 4


def candidate_sizes(max_dim: int) -> tuple[int, ...]:
    """(0, 4, ..., max_dim): the search space D of section 3.1 with 0 = feature dropped."""
    return tuple(range(0, int(max_dim) + 1, QUANTUM))


def layer_norm(x: np.ndarray, axis: int = -1, eps: float = 1e-5) -> np.ndarray:
    """LN of eqs. 5/6 without affine parameters: zero mean, unit variance along `axis`."""
    x = np.asarray(x, np.float64)
    mu = x.mean(axis=axis, keepdims=True)
    return (x - mu) / np.sqrt(x.var(axis=axis, keepdims=True) + eps)


def update_pe(pe: np.ndarray, var: np.ndarray, eta: float, floor: float = 0.01) -> np.ndarray:
    """Eq. 5: P_E <- P_E - eta * LN(Var / T), LN per field over its T candidates (a candidate
    whose values vary less than its field's others is the under-trained one and gains rate);
    then clipped at `floor` and renormalised so that each row stays a categorical distribution.
    `eta` is the step the paper leaves implicit (its update is applied every mini-batch)."""
    t = pe.shape[1]
    new = np.maximum(pe - eta * layer_norm(var / t, axis=1), floor)
    return new / new.sum(axis=1, keepdims=True)


def update_pf(
    pf: np.ndarray,
    grad_l1: np.ndarray,
    emb_l1: np.ndarray,
    kept: np.ndarray,
    eta: float,
    lambda_fs: float = 0.6,
    bounds: tuple[float, float] = (0.2, 1.0),
) -> np.ndarray:
    """Eq. 6: P_F <- P_F + eta * LN(lambda_FS/(M T) |dL/dE|_1 + (1 - lambda_FS)/(M T) |E|_1),
    LN over the fields that were kept in this step (a dropped field has no gradient: ranking it
    by its zero would drop it ever more often); the others keep their rate. Clipped to `bounds`
    (a rate is a Bernoulli probability; the floor keeps every field trained now and then)."""
    m = len(pf)
    t = 1  # the 1/(M T) of eq. 6 is a common scale, which LN removes
    score = lambda_fs / (m * t) * np.asarray(grad_l1, np.float64) + (1 - lambda_fs) / (m * t) * np.asarray(emb_l1)
    new = np.asarray(pf, np.float64).copy()
    idx = np.flatnonzero(kept)
    if len(idx) >= 2:
        new[idx] = pf[idx] + eta * layer_norm(score[idx])
    return np.clip(new, *bounds)


def prefix_variance(pooled: torch.Tensor, sizes: tuple[int, ...]) -> np.ndarray:
    """Var(E_{i,t}) for every field i and size t > 0 (eq. 5): the variance of the values of the
    first d_t columns of field i's pooled embeddings [B, M, D], over rows and columns; one pass
    of cumulative sums serves every candidate (vectorised, [M, T])."""
    x = pooled.detach().double()
    b = x.shape[0]
    s1 = x.sum(0).cumsum(-1)  # [M, D]
    s2 = (x * x).sum(0).cumsum(-1)
    cut = torch.tensor([d - 1 for d in sizes if d > 0])
    n = torch.tensor([b * d for d in sizes if d > 0], dtype=torch.float64)
    mean = s1[:, cut] / n
    return (s2[:, cut] / n - mean * mean).numpy()


class SupernetModel(nn.Module):
    """Max-tables + the per-size transforms (eq. 7) + the main model; forward(kjt, arch)."""

    def __init__(
        self,
        num_embeddings: dict[str, int],
        multi_valued: set[str],
        config: ModelConfig,
        max_dim: int,
        d_f: int,
        managed: dict | None = None,
    ):
        super().__init__()
        self.sizes = candidate_sizes(max_dim)
        self.embedding = MixedEmbedding(
            {f: max_dim for f in num_embeddings},
            num_embeddings,
            multi_valued,
            wide=USES_WIDE[config.model],
            init_range=config.init_range,
            managed=managed,
        )
        self.max_dim = int(max_dim)
        self.d_f = d_f
        # eq. 7: one MLP (here one linear layer) + BatchNorm per candidate size, shared by fields
        self.transforms = nn.ModuleList(nn.Sequential(nn.Linear(d, d_f), nn.BatchNorm1d(d_f)) for d in self.sizes[1:])
        for tr in self.transforms:
            # BatchNorm's scale starts at the std of the tables' init (uniform +-init_range), not 1:
            # unit-variance vectors in the FM's ~M^2/2 dot products start the logits at +-100
            nn.init.constant_(tr[1].weight, config.init_range / 3**0.5)
        m = len(self.embedding.feature_names)
        kwargs = {"layers": config.dcn_layers} if config.model == "dcnv2" else {}
        self.head = HEADS[config.model]([d_f] * m, d_f, config.mlp, **kwargs)
        self.last_pooled: torch.Tensor | None = None

    @property
    def feature_names(self) -> list[str]:
        return self.embedding.feature_names

    def pooled(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """[B, M, max_dim + 1]: every field's max-table lookup, then its first-order weight (a
        field that is dropped loses both, as a field at width 0 in an arm does). Managed ids
        are looked up in the adopted mapping, never admitted (`Supernet.follow`)."""
        kjt = self.embedding.remap(kjt, admit=False)
        deep = self.embedding.deep(kjt).to_dict()
        cols = [deep[f] for f in self.feature_names]
        if self.embedding.wide is not None:
            wide = self.embedding.wide(kjt).to_dict()
            cols = [torch.cat([e, wide[f].sum(1, keepdim=True)], 1) for e, f in zip(cols, self.feature_names)]
        else:
            cols = [torch.cat([e, e.new_zeros(len(e), 1)], 1) for e in cols]
        return torch.stack(cols, dim=1)

    def transform(self, pooled: torch.Tensor, arch: torch.Tensor) -> list[torch.Tensor]:
        """Eq. 7: field i's first d_{arch_i} columns through the transform of that size; zeros
        for a dropped field. Fields of one size go through their transform together."""
        b, m, _ = pooled.shape
        out = pooled.new_zeros(b, m, self.d_f)
        for t, d in enumerate(self.sizes[1:], start=1):
            idx = torch.nonzero(arch == t).flatten()
            if len(idx) == 0:
                if self.training:  # DDP's static graph (DMP) wants every parameter in every step
                    out = out + 0.0 * sum(p.sum() for p in self.transforms[t - 1].parameters())
                continue
            x = pooled.index_select(1, idx)[:, :, :d].reshape(b * len(idx), d)
            out = out.index_copy(1, idx, self.transforms[t - 1](x).reshape(b, len(idx), self.d_f))
        return list(out.unbind(1))

    def subnet_logits(self, pooled: torch.Tensor, arch: torch.Tensor) -> torch.Tensor:
        wide = (pooled[:, :, -1] * (arch > 0).to(pooled.dtype)).sum(1)
        return self.head(self.transform(pooled, arch), wide)

    def many_subnet_logits(self, pooled: torch.Tensor, archs: torch.Tensor) -> torch.Tensor:
        """Logits [K, N] of K subnets `archs` [K, M] on the same lookups [N, M, D], in one pass
        per candidate size (eval mode only: BatchNorm then acts row by row, so batching the K
        subnets changes nothing)."""
        n, m, _ = pooled.shape
        k = archs.shape[0]
        out = pooled.new_zeros(k, n, m, self.d_f)
        for t, d in enumerate(self.sizes[1:], start=1):
            kk, ii = torch.nonzero(archs == t, as_tuple=True)
            if len(kk) == 0:
                continue
            x = pooled[:, ii, :d].transpose(0, 1).reshape(len(ii) * n, d)  # [pairs * N, d]
            y = self.transforms[t - 1](x).reshape(len(ii), n, self.d_f)
            out[kk, :, ii] = y
        flat = out.reshape(k * n, m, self.d_f)
        wide = ((archs > 0).to(pooled.dtype) @ pooled[:, :, -1].t()).reshape(k * n)
        return self.head(list(flat.unbind(1)), wide).reshape(k, n)

    def forward(self, kjt: KeyedJaggedTensor, arch: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(kjt)
        if self.training and pooled.requires_grad:
            pooled.retain_grad()  # dL/dE of eq. 6
        self.last_pooled = pooled
        return self.subnet_logits(pooled, arch)


class Supernet:
    """The trained supernet: model, optimizers, the sampling rates P_E, P_F (Algorithm 1)."""

    def __init__(
        self,
        num_embeddings: dict[str, int],
        multi_valued: set[str],
        config: ModelConfig,
        max_dim: int = 32,
        d_f: int | None = None,
        *,
        lambda_fs: float = 0.6,
        eta_e: float = 0.01,
        eta_f: float = 0.01,
        p_f0: float = 0.8,
        seed: int | None = None,
        managed: dict | None = None,
    ):
        """`managed`: the schema's managed fields (`Schema.managed`, or their options as
        dicts), whose mapping the supernet adopts from the control (`follow`)."""
        if world_size() > 1:
            raise ValueError("the AdaS&S supernet trains in one process (world size 1)")
        self.config, self.num_embeddings, self.multi_valued = config, dict(num_embeddings), set(multi_valued)
        self.max_dim, self.d_f = int(max_dim), int(d_f or max_dim)
        self.lambda_fs, self.eta_e, self.eta_f = lambda_fs, eta_e, eta_f
        rng = torch.get_rng_state()
        try:
            torch.manual_seed(config.seed if seed is None else seed)
            module = SupernetModel(num_embeddings, multi_valued, config, self.max_dim, self.d_f, managed)
        finally:
            torch.set_rng_state(rng)
        self.sizes, self.feature_names = module.sizes, module.feature_names
        opt_cls, opt_kwargs = _sparse_optimizer(config)
        apply_optimizer_in_backward(opt_cls, module.embedding.parameters(), opt_kwargs)
        self.model = shard(module)
        dense = [p for n, p in self.model.named_parameters() if ".embedding." not in f".{n}"]
        self.dense_optimizer = torch.optim.Adam(dense, lr=config.dense_lr)
        m, t = len(self.feature_names), len(self.sizes) - 1
        self.p_e = np.full((m, t), 1.0 / t)  # over the sizes > 0
        self.p_f = np.full(m, float(p_f0))
        self.rng = np.random.default_rng(config.seed if seed is None else seed)
        self.steps = 0

    @property
    def module(self) -> SupernetModel:
        return self.model.module

    # --- Algorithm 1 ---
    def sample(self) -> np.ndarray:
        """Eq. 4: ES (one size t > 0 per field from P_E), then FS (keep field i w.p. P_F[i]);
        at least one field is kept (the likeliest)."""
        u = self.rng.random((len(self.feature_names), 1))
        sizes = (u > np.cumsum(self.p_e, axis=1)).sum(axis=1).clip(max=self.p_e.shape[1] - 1) + 1
        keep = self.rng.random(len(self.feature_names)) < self.p_f
        if not keep.any():
            keep[int(np.argmax(self.p_f))] = True
        return np.where(keep, sizes, 0)

    def train_step(self, batch: SparseBatch) -> np.ndarray:
        """One step of Algorithm 1 (lines 8-13) on a sampled subnet; returns the click
        probabilities that subnet predicted before the update (progressive validation)."""
        arch = self.sample()
        if len(batch) < 2:  # BatchNorm cannot train on one row: scored, not trained
            pooled = self.pooled(batch)
            return torch.sigmoid(self.subnet_logits(pooled, arch)).numpy()
        self.model.train()
        logits = self.model(batch.to_kjt(self.feature_names), torch.as_tensor(arch))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels_tensor())
        self.dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()  # also the fused sparse update of the max-tables
        self.dense_optimizer.step()
        self._update_rates(arch)
        self.steps += 1
        return torch.sigmoid(logits.detach()).numpy()

    def _update_rates(self, arch: np.ndarray) -> None:
        """Eqs. 5 and 6 from this step's pooled embeddings and their gradient."""
        full = self.module.last_pooled
        pooled = full[:, :, : self.max_dim]  # the tables' columns, without the first-order weight
        self.p_e = update_pe(self.p_e, prefix_variance(pooled, self.sizes), self.eta_e)
        kept = arch > 0
        width = torch.as_tensor([self.sizes[a] for a in arch])
        cols = torch.arange(self.max_dim)[None, :] < width[:, None]  # [M, D]: the chosen columns
        x = pooled.detach().abs() * cols
        g = full.grad[:, :, : self.max_dim].abs() * cols if full.grad is not None else torch.zeros_like(x)
        b = pooled.shape[0]
        self.p_f = update_pf(
            self.p_f,
            (g.sum((0, 2)) / b).double().numpy(),
            (x.sum((0, 2)) / b).double().numpy(),
            kept,
            self.eta_f,
            self.lambda_fs,
        )
        self.module.last_pooled = None

    @torch.no_grad()
    def follow(self, arm) -> int:
        """Adopt `arm`'s (the control's) id -> row mapping of every managed field, and draw
        afresh, with zeroed optimizer state, the max-table rows whose id changed since the last
        adoption (an evicted id's trained row must not become the new id's). Returns the number
        of rows re-drawn."""
        emb, theirs = self.module.embedding, vocabs_of(arm)
        theirs = {f: v for f, v in theirs.items() if f in self.feature_names}
        if set(emb.vocab) != set(theirs):
            raise ValueError(
                f"the supernet manages the ids of {sorted(emb.vocab)}, arm {getattr(arm, 'name', '?')!r} "
                f"those of {sorted(theirs)}: build it with the schema's managed fields"
            )
        redrawn = 0
        for f, mine in emb.vocab.items():
            before = mine.owners()
            mine.load_state_dict(theirs[f].state_dict())
            now = mine.owners()
            rows = torch.nonzero((now != before) & (now != SENTINEL)).flatten()
            if rows.numel():
                emb.reset_rows(f, rows)
            redrawn += int(rows.numel())
        return redrawn

    # --- subnets with inherited weights ---
    @torch.no_grad()
    def pooled(self, batch: SparseBatch, batch_size: int = 8192) -> torch.Tensor:
        """[N, M, max_dim + 1] lookups of `batch` (`SupernetModel.pooled`; no gradient: the
        tables are fused)."""
        parts = [
            self.module.pooled(batch.slice(s, min(s + batch_size, len(batch))).to_kjt(self.feature_names))
            for s in range(0, len(batch), batch_size)
        ]
        return torch.cat(parts)

    @torch.no_grad()
    def subnet_logits(self, pooled: torch.Tensor, arch) -> torch.Tensor:
        """Logits of subnet `arch` on precomputed lookups, BatchNorm on its running statistics."""
        self.module.eval()
        try:
            return self.module.subnet_logits(pooled, torch.as_tensor(np.asarray(arch)))
        finally:
            self.module.train()

    @torch.no_grad()
    def many_subnet_logits(self, pooled: torch.Tensor, archs) -> torch.Tensor:
        """[K, N] logits of K subnets at once (`SupernetModel.many_subnet_logits`)."""
        self.module.eval()
        try:
            return self.module.many_subnet_logits(pooled, torch.as_tensor(np.asarray(archs)))
        finally:
            self.module.train()

    def table(self, field: str) -> torch.Tensor:
        """Field's max-table [rows, max_dim] (the local shard: world size 1)."""
        sd = self.model.state_dict()
        return _local(sd[next(k for k in sd if k.endswith(f".emb_{field}.weight"))])

    @torch.no_grad()
    def copy_tables_into(self, arm) -> None:
        """Overwrite `arm`'s deep tables (fields of width max_dim) and their fused optimizer
        state with the max-tables': the slim arm's warm start from the supernet's columns."""
        sd, st = arm.model.state_dict(), arm.model.fused_optimizer.state_dict()["state"]
        mine, my_st = self.model.state_dict(), self.model.fused_optimizer.state_dict()["state"]
        for key, v in sd.items():
            if ".embedding.deep." not in f".{key}" or key not in mine or _local(v).shape != _local(mine[key]).shape:
                continue
            _local(v).copy_(_local(mine[key]))
            for name, val in st.get(key, {}).items():
                if name in my_st.get(key, {}) and _local(val).shape == _local(my_st[key][name]).shape:
                    _local(val).copy_(_local(my_st[key][name]))

    # --- persistence (the daemon writes it, the cron job reads it) ---
    def to_bytes(self) -> bytes:
        """Weights, fused optimizer state, Adam state, P_E, P_F, the sampler's RNG."""
        state = {
            "model": {k: _local(v).clone() for k, v in self.model.state_dict().items()},
            "fused": {
                k: {n: _local(v).clone() for n, v in s.items()}
                for k, s in self.model.fused_optimizer.state_dict()["state"].items()
            },
            "dense": self.dense_optimizer.state_dict(),
            "p_e": self.p_e,
            "p_f": self.p_f,
            "rng": self.rng.bit_generator.state,
            "steps": self.steps,
            "meta": self.meta(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()

    def meta(self) -> dict:
        return {
            "managed": {f: v.options() for f, v in self.module.embedding.vocab.items()},
            "num_embeddings": self.num_embeddings,
            "multi_valued": sorted(self.multi_valued),
            "config": self.config.to_dict(),
            "max_dim": self.max_dim,
            "d_f": self.d_f,
            "lambda_fs": self.lambda_fs,
            "eta_e": self.eta_e,
            "eta_f": self.eta_f,
        }

    @classmethod
    def from_bytes(cls, data: bytes) -> Supernet:
        state = torch.load(io.BytesIO(data), weights_only=False)
        m = state["meta"]
        net = cls(
            m["num_embeddings"],
            set(m["multi_valued"]),
            ModelConfig.from_dict(m["config"]),
            m["max_dim"],
            m["d_f"],
            lambda_fs=m["lambda_fs"],
            eta_e=m["eta_e"],
            eta_f=m["eta_f"],
            managed=m.get("managed"),
        )
        with torch.no_grad():
            for k, v in net.model.state_dict().items():
                _local(v).copy_(state["model"][k])
            for k, s in net.model.fused_optimizer.state_dict()["state"].items():
                for n, v in s.items():
                    _local(v).copy_(state["fused"][k][n])
        net.dense_optimizer.load_state_dict(state["dense"])
        net.p_e, net.p_f, net.steps = np.asarray(state["p_e"]), np.asarray(state["p_f"]), int(state["steps"])
        net.rng.bit_generator.state = state["rng"]
        return net


def _local(t):
    return t.local_shards()[0].tensor if isinstance(t, ShardedTensor) else t
