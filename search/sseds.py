"""SSEDS: single-shot embedding dimension search (Qu et al., Algorithm 1, "Single-shot Pruning").

On the pretrained control arm, put an auxiliary mask alpha = 1 on every (field, column)
(eq. 8), take one forward-backward pass over a sample of recent rows to get
g_ij = dL/dalpha_ij at alpha = 1 (eq. 10), normalise |g| into saliency scores (eq. 11), rank
them and keep columns from the top until the parameter budget is full (eq. 12), then quantise
every field to a multiple of 4 (search/budget.py). The control arm is not modified: its pooled
embeddings are computed without gradient and only alpha receives one.

    result = sseds_search(control_arm, recent_rows, Budget("params", kappa=0.25), rows=8192)
    result.dims          # {field: d}, multiples of 4, 0 = field removed
    result.kept_columns  # {field: control column indices}: the slim arm's "winning ticket"

With `noise_floor=K` a field whose summed |g| does not exceed the null of eq. 10's sampling
noise by K standard deviations scores 0 and gets no column (search/noisefloor.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from dimstream.search.budget import Budget, SearchResult, make_result
from dimstream.search.masks import ctr_model, mask_gradient, ones_masks
from dimstream.search.noisefloor import apply_floor, field_floor, gradient_and_error
from dimstream.search.registry import SearchMethod, register
from dimstream.stream.batch import SparseBatch

if TYPE_CHECKING:  # search.fieldcheck imports minibatches from here
    from dimstream.search.fieldcheck import FieldCheck


def sample_recent(batch: SparseBatch, rows: int | None) -> SparseBatch:
    """The last `rows` rows of `batch` (the most recent; all if None or more than there are)."""
    n = len(batch)
    if rows is None or rows >= n:
        return batch
    return batch.slice(n - int(rows), n)


def minibatches(batch: SparseBatch, batch_size: int) -> list[SparseBatch]:
    return [batch.slice(s, min(s + batch_size, len(batch))) for s in range(0, len(batch), batch_size)]


def saliency_scores(
    control, batch: SparseBatch, batch_size: int = 2048
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """(g, s, loss): g_ij = dL/dalpha_ij at alpha = 1 (eq. 10), the mean log-loss L being
    accumulated over mini-batches of `batch`; s_ij = |g_ij| / sum |g| (eq. 11)."""
    m = ctr_model(control)
    masks = ones_masks(m.dims, requires_grad=True)
    g, loss, _ = mask_gradient(m, minibatches(batch, batch_size), masks)
    return (*normalise({f: v.detach().double().numpy() for f, v in g.items()}), loss)


def normalise(g_np: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(g, s) with s_ij = |g_ij| / sum |g| (eq. 11)."""
    total = float(sum(np.abs(v).sum() for v in g_np.values()))
    # eq. 11; a zero gradient everywhere (e.g. a constant model) ranks all columns equal
    s = {
        f: (np.abs(v) / total if total > 0 else np.full(v.shape, 1.0 / sum(len(x) for x in g_np.values())))
        for f, v in g_np.items()
    }
    return g_np, s


def sseds_search(
    control,
    batch: SparseBatch,
    budget: Budget | None = None,
    *,
    rows: int | None = 8192,
    batch_size: int = 2048,
    per_parameter: bool = False,
    field_check: FieldCheck | None = None,
    noise_floor: float | None = None,
) -> SearchResult:
    """Run SSEDS on `control` (an Arm, its DMP or a CTRModel) with the recent rows `batch`.

    rows:          how many of the most recent rows of `batch` to score on (None = all); they
                   are processed in mini-batches of `batch_size` (the paper's 2048), gradients
                   accumulated, so the result is the gradient of the mean loss over all of them
                   (one "single shot"). rows <= batch_size is the paper's single mini-batch D_b.
    per_parameter: rank columns by s_ij / rows_i (saliency per parameter spent) instead of s_ij;
                   the saliency reported is s_ij either way.
    budget:        Budget("params", kappa) (default kappa 0.25) or Budget("columns", columns=s).
    field_check:   a held-out field check (search/fieldcheck.py) of the same model: the fields
                   it drops get 0 columns and their budget goes to the next-ranked blocks.
    noise_floor:   K: a field whose saliency does not exceed eq. 10's noise null by K standard
                   deviations scores 0 and gets no block (search/noisefloor.py); None: off.
    The returned dims cover every field the model knows (schema fields it does not hold: 0)."""
    t0 = time.perf_counter()
    budget = budget or Budget()
    m = ctr_model(control)
    sample = sample_recent(batch, rows)
    if len(sample) == 0:
        raise ValueError("SSEDS needs at least one row")
    floor = None
    if noise_floor is None:
        _, s, loss = saliency_scores(m, sample, batch_size)
    else:  # eq. 10 from per-row contributions (the same one pass), with its standard error
        g, se, loss, _ = gradient_and_error(m, minibatches(sample, batch_size))
        floor = field_floor(g, se, noise_floor)
        s = normalise(g)[1]
        if any(floor.keep.values()):  # no field above its null (e.g. a control not yet trained): unfloored
            s = apply_floor(s, floor)
        else:
            floor = None
    rank_by = {f: s[f] / m.num_embeddings[f] for f in s} if per_parameter else None
    return make_result(
        "sseds",
        s,
        budget,
        m.dims,
        m.num_embeddings,
        started=t0,
        rows_used=len(sample),
        rank_by=rank_by,
        min_score=0.0 if floor is not None else None,  # a floored field's zeros get no block
        field_check=field_check,
        details={
            "per_parameter": per_parameter,
            "batch_size": batch_size,
            "loss": loss,
            "field_saliency": {f: float(v.sum()) for f, v in s.items()},
            "noise_floor": _floor_details(floor, noise_floor),
        },
    )


def _floor_details(floor, k: float | None) -> dict | None:
    """The floor's figures for the result's details; None with the floor off."""
    if floor is not None:
        return floor.to_dict()
    return None if k is None else {"ignored": "no field passed"}


@register
class SSEDS(SearchMethod):
    """`--search sseds`: SSEDS on the most recent `rows` rows (knobs as `sseds_search`)."""

    name = "sseds"
    default = True  # one gradient pass: cheap enough for the hourly job (the paper's premise)

    def __init__(
        self,
        rows: int | None = 8192,
        batch_size: int = 2048,
        per_parameter: bool = False,
        noise_floor: float | None = None,
    ):
        self.rows, self.batch_size, self.per_parameter = rows, batch_size, per_parameter
        self.noise_floor = noise_floor
        if noise_floor is not None:  # floored fields score 0: the policy's allocation must skip them too
            self.min_score = 0.0

    def run(self, control, rows: SparseBatch, budget: Budget, *, field_check: FieldCheck | None = None) -> SearchResult:
        return sseds_search(
            control,
            rows,
            budget,
            rows=self.rows,
            batch_size=self.batch_size,
            per_parameter=self.per_parameter,
            field_check=field_check,
            noise_floor=self.noise_floor,
        )
