"""AdaS&S: RL search over a one-shot supernet (Wei et al., sections 3.2-3.3).

The supernet (models/supernet.py, section 3.1) is trained by the daemon on every window
(ops/searching.py); this module searches it. A small transformer policy pi_theta reads the
state s (one candidate-size index per field, plus the field's identity and its row count) and
outputs the transition matrix P [M, T] over the candidate sizes (0, 4, ..., 32). Each step:
  * K actions a ~ P are sampled; each is a subnet whose reward is reward_weight x the validation
    AUC of that subnet with the supernet's inherited weights on held-out recent rows;
  * REINFORCE (eq. 8) with the mean reward of the K samples as baseline (and divided by their
    spread, so that the reward term has unit scale), plus the resource competition penalty of
    eq. 9, is minimised by Adam; the policy's per-field logit bias learns at `bias_lr`, its
    shared transformer at `lr` (the paper's 5e-4 order): every step of the shared weights moves
    all fields alike, and at one rate the field a reward favours drags every other field along;
  * the track moves on: s_{l+1} is the best of the K actions.
Eq. 9's resource term weighs each size by its parameter cost: column cost d_j of field i is
rows_i x d_j (SSEDS eq. 4), normalised by the mean field's rows x max size, so that the
penalty speaks the budget's unit. lambda_r is SEARCHED during the run by dual ascent on the
budget: after each step lambda_r <- max(0, lambda_r + dual_rate clip(spend(argmax P) / limit - 1,
-1, 1)) (a Lagrange multiplier of the budget constraint), so
the argmax allocation is pushed to the parameter budget kappa; and the final allocation
(argmax P, section 3.3) is PROJECTED onto the budget (search/budget.py) if it still exceeds it:
the columns of the argmax score 1 + u and all others u, u_ij = P(size_i > j) (the chance that
column j is used), with min_score 1, so an argmax within budget is kept exactly, and one over
it loses the blocks least likely to be used first. Widths are multiples of 4 by construction.

    result = adass_search(control_arm, recent_rows, Budget("params", 0.25), supernet=net)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from dimstream.models.evaluation import auc
from dimstream.models.supernet import Supernet
from dimstream.search.budget import Budget, SearchResult, make_result, params_of
from dimstream.search.ham import multi_valued, split_holdout
from dimstream.search.masks import ctr_model
from dimstream.search.registry import SearchMethod, register
from dimstream.search.sseds import minibatches, sample_recent
from dimstream.stream.batch import SparseBatch

if TYPE_CHECKING:
    from dimstream.search.fieldcheck import FieldCheck

MIN_SCORE = 1.0  # columns of the argmax allocation score 1 + u > 1, the others u <= 1


class PolicyNet(nn.Module):
    """pi_theta (section 3.2): a one-layer transformer over the M field tokens; token i is the
    sum of embeddings of field i, its current size index s_i and log(rows_i); output [.., M, T]."""

    def __init__(self, m: int, t: int, log_rows: np.ndarray, d_model: int = 32, heads: int = 2, layers: int = 1):
        super().__init__()
        self.field = nn.Embedding(m, d_model)
        self.state = nn.Embedding(t, d_model)
        self.cost = nn.Linear(1, d_model)
        self.register_buffer("log_rows", torch.as_tensor(log_rows, dtype=torch.float32).view(m, 1))
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, t, bias=False)  # a shared bias would move every field alike
        # a per-field logit bias: with only shared weights, what one field learns (a larger size
        # pays) leaks into every field, and a field's own preference takes far more steps
        self.bias = nn.Parameter(torch.zeros(m, t))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """Logits of P for `state` [M] (long): [M, T]."""
        ids = torch.arange(len(state))
        x = self.field(ids) + self.state(state) + self.cost(self.log_rows)
        return self.out(self.encoder(x[None]))[0] + self.bias


def resource_penalty(p: torch.Tensor, cost: torch.Tensor, lambda_r: float, lambda_c: float) -> torch.Tensor:
    """Eq. 9: lambda_r/M sum_i sum_j c_ij P_ij - lambda_c/M sum_i ||P_i - 1/T||_2, with c_ij the
    (normalised) parameter cost of size j for field i in place of d_j (module docstring)."""
    m, t = p.shape
    resource = (cost * p).sum() / m
    competition = torch.linalg.vector_norm(p - 1.0 / t, dim=1).sum() / m
    return lambda_r * resource - lambda_c * competition


def reinforce_loss(log_p: torch.Tensor, rewards: torch.Tensor, normalise: bool = False) -> torch.Tensor:
    """Eq. 8 without its penalty: -E[log p_theta(tau) R], estimated over the K sampled actions
    with their mean reward as baseline (Williams 1992; K = 1: no baseline); `normalise` also
    divides by their spread, so the reward term has unit scale whatever the AUC differences."""
    adv = rewards - rewards.mean() if len(rewards) > 1 else rewards
    if normalise and len(rewards) > 1:
        adv = adv / (rewards.std() + 1e-8)
    return -(log_p * adv.detach()).mean()


def size_costs(num_embeddings: list[int], sizes: tuple[int, ...]) -> torch.Tensor:
    """c_ij = rows_i d_j / (mean_i rows_i x max size) [M, T]: eq. 9's d_j in the budget's unit."""
    rows = np.asarray(num_embeddings, np.float64)
    c = np.outer(rows, np.asarray(sizes, np.float64)) / (rows.mean() * max(sizes))
    return torch.as_tensor(c, dtype=torch.float32)


def rl_search(
    evaluate,
    num_embeddings: list[int],
    sizes: tuple[int, ...],
    limit: int,
    *,
    start: int,
    steps: int = 100,
    samples: int = 8,
    lr: float = 3e-4,
    bias_lr: float = 0.03,
    lambda_r: float = 1.0,
    lambda_c: float = 0.08,
    dual_rate: float = 0.1,
    reward_weight: float = 1.0,
    normalise: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, list[dict]]:
    """Section 3.2's search: (final P [M, T] as numpy, trace). evaluate(archs [K, M] int) ->
    rewards' ACC [K]; `limit` is the parameter budget of sum_i rows_i d_i; `start` the size index
    every field starts from (s_0). lambda_r = 0 and dual_rate = 0 turn the resource penalty off."""
    gen = torch.Generator().manual_seed(seed)
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    policy = PolicyNet(len(num_embeddings), len(sizes), np.log(np.asarray(num_embeddings, np.float64)))
    torch.set_rng_state(rng)
    shared = [p for n, p in policy.named_parameters() if n != "bias"]
    # the per-field logits learn faster than the shared transformer, whose every step moves all fields
    opt = torch.optim.Adam([{"params": shared, "lr": lr}, {"params": [policy.bias], "lr": bias_lr}])
    cost = size_costs(num_embeddings, sizes)
    d = torch.as_tensor(sizes, dtype=torch.float64)
    n = torch.as_tensor(num_embeddings, dtype=torch.float64)
    state = torch.full((len(num_embeddings),), int(start), dtype=torch.long)
    trace = []
    for step in range(steps):
        p = torch.softmax(policy(state), dim=-1)
        acts = torch.multinomial(p.detach(), samples, replacement=True, generator=gen).t()  # [K, M]
        acc = torch.as_tensor(np.asarray(evaluate(acts.numpy()), np.float64), dtype=torch.float32)
        log_p = torch.log(p.gather(1, acts.t()).clamp_min(1e-12)).sum(0)  # log p_theta(a_k)
        penalty = resource_penalty(p, cost, lambda_r, lambda_c)
        loss = reinforce_loss(log_p, reward_weight * acc, normalise) + penalty  # eq. 8
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = acts[int(torch.argmax(acc))]  # the track: the best action is the next state
        spend = float((n * d[p.detach().argmax(1)]).sum())
        lambda_r = max(0.0, lambda_r + dual_rate * float(np.clip(spend / limit - 1.0, -1.0, 1.0)))  # dual ascent
        trace.append({"step": step + 1, "best_acc": float(acc.max()), "mean_acc": float(acc.mean()),
                      "spend": spend, "lambda_r": lambda_r})  # fmt: skip
    with torch.no_grad():
        return torch.softmax(policy(state), dim=-1).double().numpy(), trace


def allocation_scores(p: np.ndarray, sizes: tuple[int, ...], max_dim: int) -> np.ndarray:
    """Per column j of each field: 1 + u_ij inside argmax P's width (section 3.3), u_ij
    elsewhere, u_ij = sum_{t: d_t > j} P_it (module docstring: the budget projection). [M, max_dim]"""
    d = np.asarray(sizes)
    used = (d[None, :, None] > np.arange(max_dim)[None, None, :]) * p[:, :, None]  # [M, T, D]
    u = used.sum(1)
    width = d[p.argmax(1)]
    if not width.any():  # an allocation must keep a field: the one likeliest to be kept, at 4
        width[int(np.argmin(p[:, 0]))] = d[1]
    return u + (np.arange(max_dim)[None, :] < width[:, None])


def subnet_evaluator(supernet: Supernet, val: SparseBatch, batch_size: int = 8192):
    """archs [K, M] -> validation AUC of each subnet with inherited weights on `val`."""
    pooled = supernet.pooled(val, batch_size)
    labels = val.labels

    def evaluate(archs: np.ndarray) -> list[float]:
        return [auc(labels, logits) for logits in supernet.many_subnet_logits(pooled, archs).numpy()]

    return evaluate


def search_rows(rows: SparseBatch, sample: int | None, val_fraction: float, eval_rows: int | None):
    """(train, held): of the most recent `sample` rows, the last `val_fraction` are held out
    for the reward (their last `eval_rows` scored), the others bootstrap a supernet if needed."""
    rows = sample_recent(rows, sample)
    if len(rows) < 2:
        raise ValueError("AdaS&S needs at least two rows")
    train, val = split_holdout(rows, val_fraction)
    return train, sample_recent(val, eval_rows)


def one_class(held: SparseBatch) -> str | None:
    """The reward (validation AUC, section 3.2) is undefined on held-out rows of one class: NaN
    rewards would make P NaN (torch.multinomial then raises). Why, or None."""
    labels = np.unique(held.labels)
    if len(labels) > 1:
        return None
    return f"its {len(held)} held-out rows are all of label {int(labels[0])}, so the reward (their AUC) is undefined"


def bootstrap_supernet(control, train: SparseBatch) -> Supernet:
    """A supernet when none was trained on the stream (e.g. `dimstream search` on a state dir of
    another method): max-tables copied from the control (of uniform width, it is one), then one
    adaptive-sampling pass over `train`."""
    m = ctr_model(control)
    widths = set(m.dims.values())
    net = Supernet(m.num_embeddings, multi_valued(control), control.config, max(widths), managed=control.managed)
    net.follow(control)  # managed ids: the control's rows, so its tables can be copied row for row
    if len(widths) == 1:
        with torch.no_grad():
            for f in m.feature_names:
                net.table(f).copy_(_control_table(control, f))
    for b in minibatches(train, control.config.batch_size):
        if len(b) > 1:
            net.train_step(b)
    return net


def _control_table(control, field: str) -> torch.Tensor:
    sd = control.model.state_dict()
    v = sd[next(k for k in sd if k.endswith(f".emb_{field}.weight"))]
    return v.local_shards()[0].tensor if hasattr(v, "local_shards") else v


def adass_search(
    control,
    rows: SparseBatch,
    budget: Budget | None = None,
    *,
    supernet: Supernet | None = None,
    sample: int | None = 8192,
    val_fraction: float = 0.2,
    eval_rows: int | None = 2048,
    field_check: FieldCheck | None = None,
    **rl,
) -> SearchResult:
    """AdaS&S on the most recent `sample` rows: the last `val_fraction` of them are the held-out
    rows of the reward (their last `eval_rows`); with no `supernet` one is bootstrapped from the
    control on the others. `rl`: rl_search's keywords (steps, samples, lr, lambda_r, ...)."""
    t0 = time.perf_counter()
    budget = budget or Budget()
    m = ctr_model(control)
    train, held = search_rows(rows, sample, val_fraction, eval_rows)
    if (why := one_class(held)) is not None:
        raise ValueError(f"AdaS&S cannot search: {why}")
    source = "stream"
    if supernet is None:
        supernet, source = bootstrap_supernet(control, train), "bootstrapped from the control"
    _check_compatible(supernet, m)
    limit = budget.limit(m.dims, m.num_embeddings)
    sizes = supernet.sizes
    uniform = round(budget.kappa * supernet.max_dim / 4) if budget.kind == "params" else 1
    start = int(np.clip(uniform, 1, len(sizes) - 1))  # s_0: the uniform allocation of the budget
    n_rows = [m.num_embeddings[f] for f in supernet.feature_names]
    t_search = time.perf_counter()
    p, trace = rl_search(subnet_evaluator(supernet, held), n_rows, sizes, limit, start=start, **rl)
    search_seconds = time.perf_counter() - t_search
    scores = allocation_scores(p, sizes, supernet.max_dim)
    argmax = {f: int(sizes[int(i)]) for f, i in zip(supernet.feature_names, p.argmax(1))}
    return make_result(
        "adass",
        {f: scores[i] for i, f in enumerate(supernet.feature_names)},
        budget,
        m.dims,
        m.num_embeddings,
        started=t0,
        rows_used=len(held) + (len(train) if source != "stream" else 0),
        min_score=MIN_SCORE,
        field_check=field_check,
        details={
            "supernet": source,
            "supernet_steps": supernet.steps,
            "rl_seconds": search_seconds,
            "argmax_dims": argmax,
            "argmax_params": params_of(argmax, m.num_embeddings),
            "projected": params_of(argmax, m.num_embeddings) > limit,
            "p": p.tolist(),
            "p_f": supernet.p_f.tolist(),
            "lambda_r_final": trace[-1]["lambda_r"] if trace else None,
            "val_auc_best": max((t["best_acc"] for t in trace), default=None),
            "trace": trace[:: max(1, len(trace) // 20)],
        },
    )


def _check_compatible(net: Supernet, m) -> None:
    if set(net.feature_names) != set(m.feature_names) or any(d != net.max_dim for d in m.dims.values()):
        raise ValueError(
            f"the supernet (max width {net.max_dim}, {len(net.feature_names)} fields) does not match the control arm "
            f"({sorted(set(m.dims.values()))} wide, {len(m.feature_names)} fields)"
        )
    if any(net.num_embeddings[f] != m.num_embeddings[f] for f in m.feature_names):
        raise ValueError("the supernet's tables have other row counts than the control arm's")


@register
class AdaSS(SearchMethod):
    """`--search adass`: the RL search on the supernet. The daemon sets `supernet` to the one it
    trains on the stream; `dimstream search` passes `supernet_file` (the daemon's saved copy),
    and with neither the method bootstraps one from the control (`bootstrap_supernet`)."""

    name = "adass"
    min_score = MIN_SCORE
    min_rows = 2  # adass_search: the supernet's rows and the reward's held-out ones

    def __init__(
        self,
        rows: int | None = 8192,
        val_fraction: float = 0.2,
        eval_rows: int | None = 2048,
        steps: int = 100,
        samples: int = 8,
        lr: float = 3e-4,
        bias_lr: float = 0.03,
        lambda_r: float = 1.0,
        lambda_c: float = 0.08,
        dual_rate: float = 0.1,
        supernet_file: str | Path | None = None,
    ):
        self.rows, self.val_fraction, self.eval_rows = rows, val_fraction, eval_rows
        self.rl = {"steps": steps, "samples": samples, "lr": lr, "bias_lr": bias_lr, "lambda_r": lambda_r,
                   "lambda_c": lambda_c, "dual_rate": dual_rate}  # fmt: skip
        self.supernet_file = Path(supernet_file) if supernet_file is not None else None
        self.supernet: Supernet | None = None

    def holdout_rows(self, n: int) -> int:
        """How many of a window's last rows of `n` the search holds out (the daemon trains the
        supernet on these only after the search)."""
        k = min(n, self.rows) if self.rows is not None else n
        return max(1, int(round(k * self.val_fraction))) if k else 0

    def unfit(self, rows: SparseBatch) -> str | None:
        """Too few rows, or held-out rows of one class (`one_class`: a quiet day of a small table)."""
        if (why := super().unfit(rows)) is not None:
            return why
        return one_class(search_rows(rows, self.rows, self.val_fraction, self.eval_rows)[1])

    def _supernet(self) -> Supernet | None:
        if self.supernet is None and self.supernet_file is not None and self.supernet_file.exists():
            self.supernet = Supernet.from_bytes(self.supernet_file.read_bytes())
        return self.supernet

    def run(self, control, rows: SparseBatch, budget: Budget, *, field_check: FieldCheck | None = None) -> SearchResult:
        return adass_search(
            control,
            rows,
            budget,
            supernet=self._supernet(),
            sample=self.rows,
            val_fraction=self.val_fraction,
            eval_rows=self.eval_rows,
            field_check=field_check,
            **self.rl,
        )
