"""HAM: field-wise embedding size search by Hard Auxiliary Mask pruning (Xiao et al., Algorithm 1).

Search stage on a COPY of the pretrained control arm (the control arm itself is untouched):
  * auxiliary weights alpha, one per (field, column), start at epsilon = 0.01;
  * the forward pass masks with the indicator 1[alpha > 0] (hard mask, section 3.2);
  * the backward pass uses the straight-through estimator d1[alpha>0]/dalpha := 1 (eq. 2);
  * alpha is updated on held-out rows by eq. 3:
        alpha <- alpha - lr * dL/d1[alpha>0] - mu * sign(spent(1[alpha>0]) - budget),
    with lr = 1e-3, mu = 5e-5 (section 4.3). spent is the number of positive alphas against
    the target s (budget kind "columns", the paper's form) or, for the params budget of
    SSEDS eq. 4, sum_i rows_i * #{j: alpha_ij > 0} against floor(kappa * control params);
  * alternating with every alpha step, the copy's weights (tables and head) train one step on
    training rows with the current hard mask (the bi-level problem of section 3.3).
Masked columns still receive the STE gradient, so they may come back. The search stops after
`steps` steps, or earlier once the spend has settled at the budget and validation AUC has not
improved for `patience` evaluations (the early stopper of section 3.3). The allocation ranks
blocks of 4 columns by their mean alpha within the budget exactly as SSEDS's (search/budget.py),
keeping only blocks whose mean alpha is > 0 (the indicator 1[alpha > 0] of eq. 2 at block level).

`orthogonal_regulariser` is the soft orthogonality penalty of eq. 1 for pretraining the control
arm; it is not applied by the search itself.
"""

from __future__ import annotations

import copy
import inspect
import time

import numpy as np
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.evaluation import auc
from dimstream.search.budget import Budget, SearchResult, make_result
from dimstream.search.fieldcheck import FieldCheck
from dimstream.search.masks import ctr_model, masked_logits
from dimstream.search.registry import SearchMethod, register
from dimstream.search.sseds import minibatches
from dimstream.stream.batch import SparseBatch

MIN_SCORE = 0.0  # the allocation keeps a block only if its mean alpha is > 0 (eq. 2's 1[alpha > 0])


# --- eq. 2: the hard mask with a straight-through gradient -------------------------------------


def ste_mask(alpha: torch.Tensor) -> torch.Tensor:
    """1[alpha > 0] in the forward pass; identity gradient in the backward pass (HAM eq. 2):
    dL/dalpha := dL/d1[alpha>0]."""
    hard = (alpha > 0).to(alpha.dtype)
    return hard + alpha - alpha.detach()


def ham_gradient(model, batch: SparseBatch, alpha: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """STE gradient (eq. 2) of the mean log-loss on `batch` w.r.t. alpha, and that loss.

    The pooled embeddings are computed without gradient, so the tables are not touched."""
    m = ctr_model(model)
    leaves = {f: a.detach().requires_grad_(True) for f, a in alpha.items()}
    masks = {f: ste_mask(a) for f, a in leaves.items()}
    logits = masked_logits(m, batch.to_kjt(m.feature_names), masks)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels_tensor().to(logits.dtype))
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[f] for f in names])
    return dict(zip(names, grads)), float(loss.detach())


def budget_sign(
    alpha: dict[str, torch.Tensor], budget: Budget, num_embeddings: dict[str, int], limit: int
) -> tuple[float, int]:
    """sign(spent(1[alpha>0]) - limit) of eq. 3 and the spend itself."""
    hard = {f: int((a > 0).sum()) for f, a in alpha.items()}
    spent = budget.spent(hard, num_embeddings)
    return float(np.sign(spent - limit)), spent


def ham_update(
    alpha: dict[str, torch.Tensor], grad: dict[str, torch.Tensor], sign: float, lr: float, mu: float
) -> None:
    """HAM eq. 3, in place: alpha <- alpha - lr * grad - mu * sign * 1."""
    with torch.no_grad():
        for f, a in alpha.items():
            a.sub_(lr * grad[f] + mu * sign)


# --- the working copy of the control arm -------------------------------------------------------


def _copy_into(dst, src) -> None:
    """Copy tensors of state dict `src` into the live tensors of `dst` (same structure)."""
    for k, v in dst.items():
        s = src[k]
        if isinstance(v, ShardedTensor):
            for live, val in zip(v.local_shards(), s.local_shards()):
                live.tensor.detach().copy_(val.tensor)
        elif isinstance(v, dict):
            _copy_into(v, s)
        elif isinstance(v, torch.Tensor):
            v.detach().copy_(s)


def multi_valued(model) -> set[str]:
    """Fields pooled by MEAN (multi-valued) in the model's tables."""
    deep = ctr_model(model).embedding.deep
    configs = getattr(deep, "_embedding_bag_configs", None) or deep.embedding_bag_configs()
    return {c.feature_names[0] for c in configs if c.pooling == PoolingType.MEAN}


def copy_arm(arm: Arm, name: str | None = None) -> Arm:
    """An independent Arm with the same shape, weights and optimizer state as `arm`.

    Building an Arm reseeds torch's global RNG; the caller's RNG state is restored."""
    rng = torch.get_rng_state()
    try:
        m = ctr_model(arm)
        spec = ArmSpec(
            name or f"{arm.name}-copy", dict(arm.spec.dims), {f: list(c) for f, c in arm.spec.column_ids.items()}
        )
        twin = Arm(spec, m.num_embeddings, multi_valued(arm), arm.config, managed=getattr(arm, "managed", None))
    finally:
        torch.set_rng_state(rng)
    with torch.no_grad():
        live = twin.model.state_dict()
        _copy_into(live, arm.model.state_dict())
        twin.model.load_state_dict(live)
        _copy_into(twin.model.fused_optimizer.state_dict()["state"], arm.model.fused_optimizer.state_dict()["state"])
    twin.dense_optimizer.load_state_dict(copy.deepcopy(arm.dense_optimizer.state_dict()))
    return twin


def split_holdout(batch: SparseBatch, val_fraction: float = 0.2) -> tuple[SparseBatch, SparseBatch]:
    """(train, val): the most recent `val_fraction` of the rows are held out for alpha."""
    n = len(batch)
    k = max(1, int(round(n * val_fraction)))
    return batch.slice(0, n - k), batch.slice(n - k, n)


def _masked_auc(model, batch: SparseBatch, mask: dict[str, torch.Tensor], batch_size: int = 8192) -> float:
    m = ctr_model(model)
    with torch.no_grad():
        scores = [masked_logits(m, b.to_kjt(m.feature_names), mask).numpy() for b in minibatches(batch, batch_size)]
    return auc(batch.labels, np.concatenate(scores))


# --- Algorithm 1, search stage -----------------------------------------------------------------


def ham_search(
    control,
    train: SparseBatch,
    val: SparseBatch,
    budget: Budget | None = None,
    *,
    steps: int = 1000,
    lr: float = 1e-3,
    mu: float = 5e-5,
    epsilon: float = 0.01,
    batch_size: int = 2048,
    train_weights: bool = True,
    weight_passes: float = 1.0,
    eval_every: int = 50,
    eval_rows: int | None = 10_000,
    patience: int = 3,
    min_delta: float = 1e-4,
    settle_tolerance: float = 0.05,
    field_check: FieldCheck | None = None,
) -> SearchResult:
    """Run HAM's search stage (Algorithm 1) from the pretrained `control` and allocate.

    control:   the control Arm (a copy is trained; the control is never modified). With
               train_weights=False only alpha is learnt (no copy needed; any model works).
    weight_passes: passes over `train` the weight steps may make; after that the weights stay
               fixed and only alpha moves. The paper cycles a static training set for its
               search epochs; on a stream window repeated passes overfit it (the validation
               AUC of `details["trace"]` falls once the weights cycle the window again).
    train/val: rows for the weights and for alpha (eq. 3), each cycled in mini-batches of
               `batch_size` (the paper's 2048). Validation AUC (for early stopping) is
               measured on the last `eval_rows` rows of `val` every `eval_every` steps.
    budget:    Budget("columns", columns=s): the paper's target s; Budget("params", kappa):
               the parameter budget of SSEDS eq. 4, translated into eq. 3's sign term.
    Early stop: the spend is within `settle_tolerance` (relative) of the budget and the
               validation AUC has not improved by `min_delta` for `patience` evaluations.
    field_check: a held-out field check (search/fieldcheck.py) of `control`: the fields it
               drops get 0 columns at allocation and their budget goes to the next blocks.
    """
    t0 = time.perf_counter()
    budget = budget or Budget()
    m = ctr_model(control)
    ctrl, rows = m.dims, m.num_embeddings
    limit = budget.limit(ctrl, rows)
    if len(train) == 0 and train_weights or len(val) == 0:
        raise ValueError("HAM needs training rows (for the weights) and held-out rows (for alpha)")
    work = copy_arm(control, "ham-search") if train_weights else control
    wm = ctr_model(work)
    alpha = {f: torch.full((d,), float(epsilon)) for f, d in ctrl.items()}
    val_batches = minibatches(val, batch_size)
    train_batches = minibatches(train, batch_size) if train_weights else []
    held = val if eval_rows is None or eval_rows >= len(val) else val.slice(len(val) - eval_rows, len(val))
    trace, best, stale, stopped = [], -np.inf, 0, None
    spent = budget.spent(ctrl, rows)
    for t in range(steps):
        # alpha step on held-out rows (eqs. 2 and 3)
        g, _ = ham_gradient(wm, val_batches[t % len(val_batches)], alpha)
        sign, spent = budget_sign(alpha, budget, rows, limit)
        ham_update(alpha, g, sign, lr, mu)
        hard = {f: (a > 0).float() for f, a in alpha.items()}
        # weight step on training rows under the current hard mask
        if train_weights and t < weight_passes * len(train_batches):
            b = train_batches[t % len(train_batches)]
            work.dense_optimizer.zero_grad(set_to_none=True)
            loss = work.loss_fn(work.model(work.kjt(b), hard), b.labels_tensor())
            loss.backward()  # the copy's fused sparse update
            work.dense_optimizer.step()
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            spent = budget.spent({f: int(h.sum()) for f, h in hard.items()}, rows)
            val_auc = _masked_auc(wm, held, hard)
            trace.append({"step": t + 1, "spent": spent, "val_auc": val_auc})
            if abs(spent - limit) <= settle_tolerance * limit:
                if val_auc > best + min_delta:
                    best, stale = val_auc, 0
                else:
                    stale += 1
                if stale >= patience:
                    stopped = t + 1
                    break
            else:
                stale = 0
    if train_weights:
        work.dense_optimizer.zero_grad(set_to_none=True)
    a_np = {f: a.numpy().astype(np.float64) for f, a in alpha.items()}
    positive = {f: int((a > 0).sum()) for f, a in a_np.items()}
    return make_result(
        "ham",
        a_np,
        budget,
        ctrl,
        rows,
        started=t0,
        min_score=MIN_SCORE,
        field_check=field_check,
        rows_used=len(val) + (len(train) if train_weights else 0),
        details={
            "steps_run": trace[-1]["step"] if trace else 0,
            "stopped_early_at": stopped,
            "positive_alphas": sum(positive.values()),
            "spent_by_positive_alphas": budget.spent(positive, rows),
            "lr": lr,
            "mu": mu,
            "epsilon": epsilon,
            "batch_size": batch_size,
            "train_weights": train_weights,
            "weight_passes": weight_passes,
            "trace": trace,
        },
    )


# --- eq. 1: soft orthogonality -----------------------------------------------------------------


def soft_orthogonality(
    tables: dict[str, torch.Tensor], scale: dict[str, float] | None = None, normalise: bool = False
) -> torch.Tensor:
    """R(V) = sum_j ||V_j^T V_j - I||_F^2 / d_j^2 (HAM eq. 1) over the given [n_j, d_j] matrices.

    scale[j] multiplies the Gram matrix (an estimate of the full V_j^T V_j from a subset of
    rows); normalise=True uses unit columns (the relaxed SO: pairwise cosine similarities)."""
    total = None
    for f, v in tables.items():
        if normalise:
            v = v / v.norm(dim=0, keepdim=True).clamp_min(1e-12)
        d = v.shape[1]
        gram = v.t() @ v
        if scale is not None and not normalise:
            gram = gram * scale[f]
        r = ((gram - torch.eye(d, dtype=v.dtype)) ** 2).sum() / d**2
        total = r if total is None else total + r
    return total if total is not None else torch.zeros(())


def touched_rows(model, kjt: KeyedJaggedTensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{field: (unique ids the batch touches, their embedding rows [n, d])}, looked up WITH
    gradient through the model's deep tables (one id per bag), so a loss on them trains the
    tables through the fused backward like any other lookup."""
    m = ctr_model(model)
    feats = kjt.to_dict()
    uniq = {f: torch.unique(feats[f].values()) for f in m.feature_names}
    width = max(1, max(len(u) for u in uniq.values()))
    lengths = torch.cat(
        [
            torch.cat([torch.ones(len(u), dtype=torch.int64), torch.zeros(width - len(u), dtype=torch.int64)])
            for u in uniq.values()
        ]
    )
    one_per_bag = KeyedJaggedTensor.from_lengths_sync(
        keys=list(uniq), values=torch.cat(list(uniq.values())), lengths=lengths
    )
    rows = m.embedding.deep(m.embedding.remap(one_per_bag, admit=False)).to_dict()  # managed ids -> rows
    return {f: (u, rows[f][: len(u)]) for f, u in uniq.items()}


def orthogonal_regulariser(model, kjt: KeyedJaggedTensor, lam: float = 1e-3, normalise: bool = False) -> torch.Tensor:
    """lam * R(V), HAM eq. 1, for the trainer to add to the mini-batch loss.

    Estimated on the rows the batch touches: computing the full V_j^T V_j of every table at
    every step costs O(rows_j * d_j^2) per field, far too much per mini-batch, so the Gram
    matrix is estimated from the batch's unique ids S_j as (rows_j / |S_j|) V_S^T V_S (unbiased
    for uniformly drawn rows; feature ids are not uniform, so it over-weights frequent ids,
    which are also the ones the loss sees). normalise=True is the relaxed SO on unit columns
    (the paper's Avazu setting, lam = 1e-6), which needs no rescaling.
    The lookup goes through the fused tables: the penalty's gradient updates them in backward.
    Defaults follow section 4.3 (lam = 1e-3, MovieLens)."""
    m = ctr_model(model)
    rows = touched_rows(m, kjt)
    scale = {f: m.num_embeddings[f] / max(1, len(u)) for f, (u, _) in rows.items()}
    return lam * soft_orthogonality({f: v for f, (_, v) in rows.items()}, scale, normalise)


@register
class HAM(SearchMethod):
    """`--search ham`: HAM on the rows split into training and held-out parts (`split_holdout`);
    the other knobs are `ham_search`'s keywords (steps, lr, mu, ...)."""

    name = "ham"
    min_score = MIN_SCORE
    min_rows = 2  # split_holdout: training rows for the weights, held-out ones for alpha

    def __init__(self, val_fraction: float = 0.2, **knobs):
        unknown = set(knobs) - self.knobs()
        if unknown:
            raise TypeError(f"HAM has no knob {', '.join(sorted(unknown))}")
        self.val_fraction, self.search_knobs = val_fraction, knobs

    @classmethod
    def knobs(cls) -> set[str]:
        search = inspect.signature(ham_search).parameters.values()
        return super().knobs() | {p.name for p in search if p.kind is p.KEYWORD_ONLY and p.name != "field_check"}

    def run(self, control, rows: SparseBatch, budget: Budget, *, field_check: FieldCheck | None = None) -> SearchResult:
        train, val = split_holdout(rows, self.val_fraction)
        return ham_search(control, train, val, budget, field_check=field_check, **self.search_knobs)
