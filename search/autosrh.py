"""AutoSrh: differentiable dimension search through a soft selection layer (Kong et al., Algorithms 1-3).

Field level (the model's fields are AutoSrh's feature blocks, L = 1 block per field): the soft
selection layer alpha holds one weight in [0, 1] per (field, column), initialised to ones
(Algorithm 2, line 2), and multiplies the pooled embedding column by column (eq. 8; pooling is
linear, so this is e'_i ⊙ alpha of every id: MixedEmbedding's `column_mask`).

Search stage, on a COPY of the pretrained control arm (the control itself is untouched), over
the most recent `rows` rows (default 8,192), the last `val_fraction` (20%) of them held out:
  * weight step (eq. 12): the copy's tables and head take one step of their own optimizers
    (fused Adagrad for the tables, Adam for the head, as every arm trains) on a training
    mini-batch, through the current alpha;
  * alpha step on a held-out mini-batch: the first-order gradient of eq. 13,
    g = dL_val(Theta', alpha)/dalpha at the weights Theta' just updated (the second-order term
    -xi * d2L_train/dalpha dTheta . dL_val/dTheta' is omitted: it would need a Hessian-vector
    product through FBGEMM's fused tables, whose update happens inside backward and is not
    differentiable; the paper itself uses the first-order form when xi is small, section 4.2.3);
  * the gradient is normalised row-wise by eq. 14 (each field's columns by their mean |g|),
    then alpha <- clip(alpha - lr * g_norm, 0, 1) (Algorithm 2, line 9).
The weights make one pass over the training rows (weight_passes = 1: the rows are the window
the control has just trained on, and cycling them again overfits, as HAM's trace shows); alpha
steps continue over the held-out mini-batches until `steps` steps. Defaults: 8,192 rows, 200
steps of 512 rows (13 weight steps on 6,554 rows, 200 alpha steps cycling 1,638 held-out rows).
Its cost against one window's training is measured by benchmarks/autosrh.py
(benchmarks/results/autosrh.json: 3.9 s and 8.8 s, 0.6 and 2.4 x one 50,000-row window's
training, on two seeds on a loaded 2-core machine).

Pruning (eq. 15, Algorithm 3) at the granularity the kernels allow: eq. 15 keeps the entries
of the alpha-weighted embedding matrix E~ = E ⊙ alpha whose magnitude is above a threshold
chosen to meet the compression target. Columns are kept whole here, so a column's score is the
mean magnitude of its alpha-weighted entries over the held-out rows' lookups,
    score_ij = alpha_ij * mean_b |e_{b,ij}|,
i.e. |E~_ij| weighted by how often each id occurs (an id never looked up costs memory but
scores nothing); the columns are then kept by score within the parameter budget in blocks of 4
(search/budget.py `allocate`, the threshold epsilon of eq. 15 being the score of the first
block that does not fit). Retraining (Algorithm 4) is the window loop itself: the slim arm is
re-shaped to the kept columns, which start from the control's (models/realloc.py). The slim
arm carries no alpha (Algorithm 4 keeps alpha fixed inside the retrained model): its kept
columns enter the head unscaled, exactly the control's, and the head adapts as it trains.

Frequency tiers (`tiers` = L > 1, section 4.2.1 "feature blocking"): the ids (embedding rows)
of every field are counted exactly (`row_counts`: one integer per hashed row), sorted by count
and divided into L equal blocks (`feature_blocks`); alpha becomes [L, K] per field, a row of a
mini-batch taking the alpha row of its id's tier (`row_masks`), and eq. 14 normalises every
(field, tier) row. The pruning then scores every (field, tier) column and allocates at (field,
tier) granularity, each (field, tier) a table of its own rows, within sum of rows x width <=
kappa x control (`tiered_allocation`, in the result's details["tiers"], with the ids' tiers
`tier_of`). The daemon builds the slim arm from it under `--tiers L` (models/tiers.py: one table
per (field, tier), ops/searching.py); the result's dims stay the field-level allocation of the
same scores summed over the tiers, which the policy's gate compares and plans carry (with the
(field, tier) allocation beside them, search/tierplan.py). The counts an id's tier comes from
are its counts on the stream (`AutoSrh.counts`, set by the daemon and by `dimstream search`
from the daemon's checkpointed search/counts.py `StreamCounts`: exact per row up to 2^22 rows,
a count-min sketch above); without them (a state dir the daemon ran without --tiers) they are
the searched window's exact counts (`row_counts`). The ids' tiers are re-assigned only when the
slim arm is re-allocated, and are then in its checkpointed state.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from dimstream.search.budget import Budget, SearchResult, allocate, make_result, params_of
from dimstream.search.fieldcheck import FieldCheck
from dimstream.search.ham import copy_arm, split_holdout
from dimstream.search.masks import ctr_model, masked_loss, pooled_embeddings
from dimstream.search.registry import SearchMethod, register
from dimstream.search.sseds import minibatches, sample_recent
from dimstream.stream.batch import SparseBatch

EPS_G = 1e-7  # epsilon_g of eq. 14


def init_alpha(dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """The soft selection layer, all ones (Algorithm 2, line 2): one row of K_i weights per
    block (here per field; a field with tiers has one row per tier table)."""
    return {f: torch.ones(d) for f, d in dims.items() if d > 0}


def normalise_rows(grad: dict[str, torch.Tensor], eps: float = EPS_G) -> dict[str, torch.Tensor]:
    """Eq. 14: g_norm(alpha_l*) = g(alpha_l*) / (sum_k |g(alpha_lk)| / K + eps_g), per row l
    (a field's [K] gradient is one row; a tiered field's [L, K] gradient has one per tier).

    A frequent block's gradient is orders of magnitude larger than a rare one's; per row, every
    block moves at the same learning rate.

    >>> normalise_rows({"a": torch.tensor([2.0, -6.0]), "b": torch.zeros(2)}, eps=0.0)["a"]
    tensor([ 0.5000, -1.5000])
    """
    out = {}
    for f, g in grad.items():
        scale = g.abs().mean(dim=-1, keepdim=True) + eps
        out[f] = torch.where(scale > 0, g / scale.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g))
    return out


# --- frequency tiers (feature blocking, section 4.2.1) ------------------------------------------


def row_counts(batch: SparseBatch, num_embeddings: dict[str, int]) -> dict[str, np.ndarray]:
    """Exact occurrences of every embedding row (hashed id) of every field in `batch`.

    Exact counts cost one integer per table row, a fraction 1/d of the table itself: ids are
    hashed into a fixed number of rows, so no sketch is needed to bound them."""
    return {f: np.bincount(batch.values[f], minlength=n).astype(np.int64) for f, n in num_embeddings.items()}


def feature_blocks(counts: np.ndarray, tiers: int) -> np.ndarray:
    """Tier of every row (0 = most frequent), section 4.2.1: the rows that occurred, sorted by
    count (most frequent first; ties: lower row first), divided equally into `tiers` blocks;
    rows never seen join the last (tail) block. The paper divides all features equally; with
    hashed ids most rows of a large table are never seen in a window, and dividing them too
    would put every seen id in the first block.

    >>> feature_blocks(np.array([0, 5, 1, 9, 0, 2]), 2).tolist()
    [1, 0, 1, 0, 1, 1]
    """
    counts = np.asarray(counts)
    tier = np.full(len(counts), tiers - 1, np.int64)
    seen = np.flatnonzero(counts > 0)
    order = seen[np.lexsort((seen, -counts[seen]))]
    tier[order] = np.arange(len(order)) * tiers // max(len(order), 1)
    return tier


def tier_weights(batch: SparseBatch, fields: list[str], tier_of: dict[str, np.ndarray], tiers: int):
    """{field: [B, L] float}: the share of row b's ids of the field that lie in tier l (one-hot
    for a single-valued field). The per-row mask w_b @ alpha is then exactly eq. 8 for a
    single-valued field; for a multi-valued (mean-pooled) one it mixes the tiers' rows of alpha
    by the row's ids (exact when all its ids share a tier)."""
    out = {}
    for f in fields:
        off = batch.offsets[f]
        lengths = np.diff(off)
        row = np.repeat(np.arange(len(batch)), lengths)
        w = np.zeros((len(batch), tiers))
        np.add.at(w, (row, tier_of[f][batch.values[f]]), 1.0)
        out[f] = torch.from_numpy(w / np.maximum(lengths, 1)[:, None]).float()
    return out


def row_masks(alpha: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The soft selection applied to a mini-batch (eq. 8): alpha_f [K] for a field-level alpha,
    else the per-row mask w_b @ alpha_f ([B, L] @ [L, K] -> [B, K])."""
    if weights is None:
        return dict(alpha)
    return {f: weights[f] @ a for f, a in alpha.items()}


def alpha_gradient(
    model, batch: SparseBatch, alpha: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """First-order eq. 13: dL_val(Theta', alpha)/dalpha on the held-out `batch` at the model's
    current weights Theta' (pooled embeddings without gradient: the tables are not touched),
    and that loss. `weights`: the batch's tier weights (`tier_weights`) for a tiered alpha."""
    m = ctr_model(model)
    leaves = {f: a.detach().clone().requires_grad_(True) for f, a in alpha.items()}
    loss = masked_loss(m, batch.to_kjt(m.feature_names), batch.labels_tensor(), row_masks(leaves, weights))
    names = [f for f in m.feature_names if f in leaves]
    grads = torch.autograd.grad(loss, [leaves[f] for f in names])
    return dict(zip(names, grads)), float(loss.detach())


def alpha_step(alpha: dict[str, torch.Tensor], grad: dict[str, torch.Tensor], lr: float) -> None:
    """Algorithm 2, lines 8-9, in place: descend the eq. 14-normalised gradient, clip to [0, 1]."""
    with torch.no_grad():
        for f, g in normalise_rows(grad).items():
            alpha[f].sub_(lr * g).clamp_(0.0, 1.0)


def weight_step(
    arm, batch: SparseBatch, alpha: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None
) -> float:
    """Eq. 12 on the training `batch`: one optimizer step of the arm's tables (fused, inside
    backward) and head through the soft selection alpha (held fixed), returning the loss."""
    arm.dense_optimizer.zero_grad(set_to_none=True)
    masks = row_masks({f: a.detach() for f, a in alpha.items()}, weights)
    loss = arm.loss_fn(arm.model(arm.kjt(batch), masks), batch.labels_tensor())
    loss.backward()  # the fused sparse update
    arm.dense_optimizer.step()
    arm.dense_optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def column_scores(
    model,
    batch: SparseBatch,
    alpha: dict[str, torch.Tensor],
    batch_size: int = 8192,
    tier_of: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """score_ij = alpha_ij * mean over the rows of `batch` of |e_ij| (eq. 8, then eq. 15's
    magnitude |E~_ij| of the alpha-weighted embedding, weighted by the ids' occurrences).

    With tiers (`tier_of`, alpha [L, K]): score_lj = alpha_lj * sum_b w_bl |e_bj| / B, a tier's
    rows contributing their share of the lookups; the tiers of a field sum to its score."""
    m = ctr_model(model)
    tiers = next(iter(alpha.values())).shape[0] if tier_of is not None else None
    total = {f: torch.zeros((tiers or 1, d), dtype=torch.float64) for f, d in m.dims.items()}
    for b in minibatches(batch, batch_size):
        embs, _ = pooled_embeddings(m, b.to_kjt(m.feature_names))
        w = tier_weights(b, m.feature_names, tier_of, tiers) if tier_of is not None else None
        for f, e in zip(m.feature_names, embs):
            mag = e.abs().double()
            total[f] += w[f].double().t() @ mag if w is not None else mag.sum(dim=0, keepdim=True)
    n = max(1, len(batch))
    out = {f: (alpha[f].double().reshape(total[f].shape) * total[f] / n).numpy() for f in m.feature_names}
    return out if tier_of is not None else {f: v[0] for f, v in out.items()}


def tier_sizes(tier_of: dict[str, np.ndarray], tiers: int) -> dict[str, list[int]]:
    """Rows of each field in each tier (what one column of the (field, tier) table costs)."""
    return {f: np.bincount(t, minlength=tiers).astype(int).tolist() for f, t in tier_of.items()}


def tiered_allocation(
    scores: dict[str, np.ndarray], sizes: dict[str, list[int]], control_dims: dict[str, int], budget: Budget
) -> dict:
    """Eq. 15 at (field, tier) granularity: every (field, tier) is its own table of sizes[f][l]
    rows, its columns scored by `column_scores` with tiers and kept in blocks of 4 within the
    budget, sum over tables of rows x width <= kappa x control (search/budget.py `allocate`).

    Blocks are ranked by score per parameter (score / rows of the tier): eq. 15 thresholds
    single entries, each costing one parameter, and a tier's score sums its ids' lookups, so a
    tail tier of many rarely seen rows would otherwise outrank the cheap frequent tiers."""
    key = {(f, t): f"{f}#{t}" for f, s in scores.items() for t in range(s.shape[0])}
    tier_scores = {key[f, t]: scores[f][t] for f, t in key}
    rows = {key[f, t]: sizes[f][t] for f, t in key}
    alloc = allocate(
        tier_scores,
        budget,
        {key[f, t]: control_dims[f] for f, t in key},
        rows,
        rank_by={k: s / max(rows[k], 1) for k, s in tier_scores.items()},
    )
    tiers = max(t for _, t in key) + 1
    return {
        "dims": {f: [alloc.dims[key[f, t]] for t in range(tiers)] for f in scores},
        "kept_columns": {f: [alloc.kept_columns[key[f, t]] for t in range(tiers)] for f in scores},
        "rows": sizes,
        "budget_asked": alloc.limit,
        "budget_reached": alloc.used,
        "params": params_of(alloc.dims, {key[f, t]: sizes[f][t] for f, t in key}),
    }


def _drop_checked_fields(tiered: dict, field_check: FieldCheck | None) -> None:
    """The fields a held-out field check drops get no column in any tier (in place)."""
    if field_check is None:
        return
    for f, keep in field_check.keep.items():
        if not keep and f in tiered["dims"]:
            tiered["dims"][f] = [0] * len(tiered["dims"][f])
            tiered["kept_columns"][f] = [[] for _ in tiered["kept_columns"][f]]
    tiered["params"] = sum(n * d for f, ds in tiered["dims"].items() for n, d in zip(tiered["rows"][f], ds))
    tiered["budget_reached"] = tiered["params"]


def autosrh_search(
    control,
    train: SparseBatch,
    val: SparseBatch,
    budget: Budget | None = None,
    *,
    steps: int = 200,
    lr: float = 0.01,
    batch_size: int = 512,
    weight_passes: float = 1.0,
    tiers: int = 1,
    counts: dict[str, np.ndarray] | None = None,
    field_check: FieldCheck | None = None,
) -> SearchResult:
    """AutoSrh's search (Algorithm 2) on a copy of `control` and its pruning (Algorithm 3).

    train/val: rows for the weight steps (eq. 12) and for the alpha steps (eq. 13-14), each in
               mini-batches of `batch_size` (the held-out ones cycled).
    steps:     alternating steps; the weights step only during their first `weight_passes`
               passes over `train`.
    lr:        alpha's learning rate (the paper's 0.01, section 5.1.4) on the normalised gradient.
    tiers:     L, the frequency blocks of every field (section 4.2.1): alpha is [L, K] per field
               and an id's tier comes from `counts` (row occurrences, default: counted on
               train + val) by `feature_blocks`. With L > 1 the result's dims are the
               field-level allocation (the tiers' scores summed per column); the (field,
               tier) allocation a tiered slim arm is built from is in details["tiers"]
               (`tiered_allocation`, and `tier_of`; a field the field check drops gets 0
               in every tier).
    budget:    Budget("params", kappa) (default 0.25) or Budget("columns", columns=s).
    field_check: a held-out field check (search/fieldcheck.py): the fields it drops get 0.
    The result's saliency is the column score above; details hold alpha and the losses."""
    t0 = time.perf_counter()
    budget = budget or Budget()
    if len(train) == 0 or len(val) == 0:
        raise ValueError("AutoSrh needs training rows (for the weights) and held-out rows (for alpha)")
    if tiers < 1:
        raise ValueError(f"tiers must be >= 1, got {tiers}")
    m = ctr_model(control)
    work = copy_arm(control, "autosrh-search")
    wm = ctr_model(work)
    tier_of = None
    if tiers > 1:
        if counts is None:
            counts = row_counts(SparseBatch.concat([train, val]), m.num_embeddings)
        tier_of = {f: feature_blocks(counts[f], tiers) for f in m.feature_names}
    alpha = {f: a.expand(tiers, -1).clone() if tiers > 1 else a for f, a in init_alpha(m.dims).items()}
    train_batches, val_batches = minibatches(train, batch_size), minibatches(val, batch_size)

    def weights(b):
        return tier_weights(b, m.feature_names, tier_of, tiers) if tier_of is not None else None

    train_w, val_w = [weights(b) for b in train_batches], [weights(b) for b in val_batches]
    weight_steps = int(weight_passes * len(train_batches))
    train_loss, val_loss = [], []
    for t in range(steps):
        if t < weight_steps:
            i = t % len(train_batches)
            train_loss.append(weight_step(work, train_batches[i], alpha, train_w[i]))
        i = t % len(val_batches)
        g, loss = alpha_gradient(wm, val_batches[i], alpha, val_w[i])
        alpha_step(alpha, g, lr)
        val_loss.append(loss)
    scores = column_scores(wm, val, alpha, tier_of=tier_of)
    details = {}
    if tier_of is not None:
        details["tiers"] = tiered_allocation(scores, tier_sizes(tier_of, tiers), m.dims, budget)
        details["tiers"]["tier_of"] = tier_of  # the ids' tiers the slim arm is built with
        _drop_checked_fields(details["tiers"], field_check)
        scores = {f: s.sum(axis=0) for f, s in scores.items()}
    return make_result(
        "autosrh",
        scores,
        budget,
        m.dims,
        m.num_embeddings,
        started=t0,
        rows_used=len(train) + len(val),
        field_check=field_check,
        details=details
        | {
            "steps": steps,
            "weight_steps": min(steps, weight_steps),
            "lr": lr,
            "batch_size": batch_size,
            "tier_count": tiers,
            "alpha": {f: a.tolist() for f, a in alpha.items()},
            "alpha_mean": {f: a.mean(dim=-1).tolist() if tiers > 1 else float(a.mean()) for f, a in alpha.items()},
            "train_loss_first_last": [train_loss[0], train_loss[-1]] if train_loss else None,
            "val_loss_first_last": [val_loss[0], val_loss[-1]] if val_loss else None,
        },
    )


@register
class AutoSrh(SearchMethod):
    """`--search autosrh`: AutoSrh on the most recent `rows` rows, the last `val_fraction` of
    them held out for alpha (`split_holdout`); the other knobs are `autosrh_search`'s. With
    tiers > 1 the ids' tiers come from `counts` ({field: [rows] counts}, the stream-long counts
    the caller sets before `run`) if set, else from their counts over all the rows given (the
    window), not only the searched sample."""

    name = "autosrh"
    min_rows = 2  # training rows for the weights, held-out ones for alpha (eq. 12 / 13)

    def __init__(
        self,
        rows: int | None = 8192,
        val_fraction: float = 0.2,
        steps: int = 200,
        lr: float = 0.01,
        batch_size: int = 512,
        weight_passes: float = 1.0,
        tiers: int = 1,
    ):
        self.rows, self.val_fraction, self.tiers = rows, val_fraction, tiers
        self.counts: dict[str, np.ndarray] | None = None  # stream-long row counts (search/counts.py)
        self.search_knobs = {"steps": steps, "lr": lr, "batch_size": batch_size, "weight_passes": weight_passes}

    def run(self, control, rows: SparseBatch, budget: Budget, *, field_check: FieldCheck | None = None) -> SearchResult:
        train, val = split_holdout(sample_recent(rows, self.rows), self.val_fraction)
        counts = None
        if self.tiers > 1:
            counts = self.counts if self.counts is not None else row_counts(rows, ctr_model(control).num_embeddings)
        return autosrh_search(
            control, train, val, budget, tiers=self.tiers, counts=counts, field_check=field_check, **self.search_knobs
        )
