"""The parameter budget of the slim arm and the choice of kept columns, in blocks of 4.

A column j of field i costs rows_i = num_embeddings[i] parameters, so an allocation {d_i}
costs sum_i rows_i * d_i (SSEDS eq. 4). The slim arm may hold at most kappa times the
control arm's parameters (SSEDS eqs. 4 and 8, default kappa = 0.25): `Budget("params", kappa)`.
HAM's alternative is a target number s of kept columns over all fields (HAM section 3.3):
`Budget("columns", columns=s)`, every column costing 1.

Selection (SSEDS eq. 12) at the granularity the kernels allow (ours: FBGEMM's fused kernels
need widths that are multiples of 4). The search scores single columns; then
  1. each field's columns are sorted by score, best first, and cut into blocks of 4 (a field of
     width 32 has 8 blocks); a block's score is the MEAN score of its 4 columns;
  2. blocks of all fields are ranked by that score, best first (SSEDS Algorithm 1, "Rank"), and
     kept from the top while the next one still fits in the budget; the first that does not fit
     is the quantile s~ of eq. 12 and every block ranked below it is pruned (a prefix of the
     ranking, as in the paper: a cheap low-ranked block is never kept in place of a better one
     that did not fit). Blocks of a field whose 4 columns alone exceed the whole budget are left
     out of the ranking (they could never be kept and would end the prefix for everyone);
  3. `min_score`, if given, also drops blocks scoring at or below it (HAM: a block whose mean
     alpha is <= 0 is "off" by the indicator 1[alpha > 0] of HAM eq. 2);
  4. `keep_fields`, if given, leaves out every block of a field it marks False (the held-out
     field check, search/fieldcheck.py): that field gets 0 and its budget goes to the next
     blocks of the ranking.
Because a field's blocks are in decreasing score order, a field always keeps its top-scored
columns, its width is 4 x (blocks kept), and a field with no block kept leaves the model
(allocation 0). Why the mean of 4 and not rounding single-column counts: a field that owns one
lucky high-scoring column among 31 unimportant ones (typical of a noise field scored on a
sample) would otherwise be rounded up to 4 columns, its 3 other columns riding on one.

>>> b = Budget("params", kappa=0.5)
>>> rows, ctrl = {"a": 10, "b": 1000}, {"a": 8, "b": 8}
>>> b.limit(ctrl, rows)
4040
>>> alloc = allocate({"a": [5, 4, 3, 2, 1, 1, 1, 1], "b": [9, 0, 0, 0, 0, 0, 0, 0]}, b, ctrl, rows)
>>> alloc.dims, alloc.used   # blocks: a[:4] 3.5, b[:4] 2.25 (fits exactly), a[4:] 1.0 overflows
({'a': 4, 'b': 4}, 4040)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # search.fieldcheck imports the models; this module stays below them
    from dimstream.search.fieldcheck import FieldCheck

KINDS = ("params", "columns")
QUANTUM = 4  # embedding widths are multiples of 4 (models/embedding.py)


class BudgetError(ValueError):
    """A budget that is malformed or too small to keep any field."""


@dataclass(frozen=True)
class Budget:
    """What the slim arm may spend.

    kind "params":  sum_i rows_i * d_i <= floor(kappa * sum_i rows_i * control_d_i)  (SSEDS eq. 4/8)
    kind "columns": sum_i d_i <= columns  (HAM's target embedding size s)
    fill: after eq. 12's prefix, also keep lower-ranked blocks that still fit in what is left
          (`select_blocks`). The prefix alone leaves up to one block of the largest table
          unspent: with 200,000-row tables a block is 800,000 parameters, 16% of a kappa 0.25
          budget on the synthetic default, which an equal-budget uniform arm does spend.
    """

    kind: str = "params"
    kappa: float = 0.25
    columns: int | None = None
    fill: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise BudgetError(f"budget kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "params" and not 0 < self.kappa <= 1:
            raise BudgetError(f"kappa must be in (0, 1], got {self.kappa}")
        if self.kind == "columns" and (self.columns is None or int(self.columns) < QUANTUM):
            raise BudgetError(f"a column budget needs columns >= {QUANTUM}, got {self.columns}")

    def cost(self, num_embeddings: dict[str, int]) -> dict[str, int]:
        """Cost of one column of each field: rows_i (params) or 1 (columns)."""
        return {f: (int(r) if self.kind == "params" else 1) for f, r in num_embeddings.items()}

    def limit(self, control_dims: dict[str, int], num_embeddings: dict[str, int]) -> int:
        """The most the allocation may spend, in the budget's unit (params or columns)."""
        if self.kind == "params":
            return int(np.floor(self.kappa * params_of(control_dims, num_embeddings)))
        return int(self.columns)

    def spent(self, dims: dict[str, int], num_embeddings: dict[str, int]) -> int:
        """What allocation `dims` spends, in the budget's unit."""
        if self.kind == "params":
            return params_of(dims, num_embeddings)
        return int(sum(dims.values()))


def params_of(dims: dict[str, int], num_embeddings: dict[str, int]) -> int:
    """sum_i rows_i * d_i: the embedding parameters of an allocation (SSEDS eq. 4)."""
    return int(sum(int(num_embeddings[f]) * int(d) for f, d in dims.items()))


@dataclass
class Allocation:
    dims: dict[str, int]  # every field of the control arm; 0 = pruned
    kept_columns: dict[str, list[int]]  # control-arm column indices kept, sorted
    used: int  # spent, in the budget's unit
    limit: int  # the budget, in the same unit


@dataclass
class SearchResult:
    """Outcome of one dimension search (SSEDS or HAM) on the control arm.

    saliency: per field, one score per control column: the normalised saliency s_ij of SSEDS
    eq. 11, or HAM's final auxiliary weights alpha (what the columns were ranked by).
    budget_asked / budget_reached are in the budget's unit (params or columns);
    control_params and params are sum_i rows_i * d_i of the control arm and of the
    allocation (whatever the budget kind). `details` holds method-specific
    figures (options, HAM's trace); it is informative only.
    """

    method: str
    dims: dict[str, int]
    kept_columns: dict[str, list[int]]
    saliency: dict[str, list[float]]
    budget_kind: str
    budget_asked: int
    budget_reached: int
    control_params: int
    duration_seconds: float
    rows_used: int
    params: int  # sum_i rows_i * d_i of the allocation
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def make_result(
    method: str,
    scores: dict[str, np.ndarray],
    budget: Budget,
    control_dims: dict[str, int],
    num_embeddings: dict[str, int],
    *,
    started: float,
    rows_used: int,
    rank_by: dict[str, np.ndarray] | None = None,
    min_score: float | None = None,
    field_check: FieldCheck | None = None,
    details: dict | None = None,
) -> SearchResult:
    """What every search method returns: its column `scores` allocated by `allocate` (after
    the field check's keep rule, if any) and the figures around it.

    started: time.perf_counter() when the search began (duration_seconds ends here);
    rows_used: how many rows the search read; details: the method's own figures.
    dims and kept_columns cover every field of `num_embeddings` (0 / [] where not kept).

    >>> r = make_result("toy", {"a": [4, 3, 2, 1, 0, 0, 0, 0], "b": [1, 1, 1, 1]}, Budget("params", kappa=0.5),
    ...                 {"a": 8, "b": 4}, {"a": 10, "b": 10, "c": 10}, started=time.perf_counter(), rows_used=5)
    >>> r.dims, r.kept_columns["a"], r.budget_asked, r.budget_reached, r.control_params
    ({'a': 4, 'b': 0, 'c': 0}, [0, 1, 2, 3], 60, 40, 120)
    """
    alloc = allocate(
        scores,
        budget,
        control_dims,
        num_embeddings,
        rank_by=rank_by,
        min_score=min_score,
        keep_fields=field_check.keep if field_check is not None else None,
    )
    dims = {f: 0 for f in num_embeddings} | alloc.dims
    kept = {f: [] for f in num_embeddings} | alloc.kept_columns
    return SearchResult(
        method=method,
        dims=dims,
        kept_columns=kept,
        saliency={f: [float(x) for x in np.ravel(v)] for f, v in scores.items()},
        budget_kind=budget.kind,
        budget_asked=alloc.limit,
        budget_reached=alloc.used,
        control_params=params_of(control_dims, num_embeddings),
        duration_seconds=time.perf_counter() - started,
        rows_used=int(rows_used),
        params=params_of(dims, num_embeddings),
        details=dict(details or {})
        | {
            "kappa": budget.kappa if budget.kind == "params" else None,
            "field_check": field_check.to_dict() if field_check is not None else None,
        },
    )


def rank_blocks(
    scores: dict[str, np.ndarray], eligible: dict[str, bool] | None = None, min_score: float | None = None
) -> tuple[list[tuple[str, int]], dict[str, np.ndarray]]:
    """Blocks of 4 columns, best mean score first (rule 1-3 of the module docstring).

    Returns ([(field, block index)], {field: its columns best first}); block b of field f is
    columns order[f][4b:4b+4]. Ties: field order, then block index. `eligible[f]` False leaves
    every block of f out."""
    order = {
        f: np.lexsort((np.arange(len(np.ravel(s))), -np.asarray(s, np.float64).ravel())) for f, s in scores.items()
    }
    rows = []
    for i, (f, s) in enumerate(scores.items()):
        if eligible is not None and not eligible.get(f, True):
            continue
        s = np.asarray(s, np.float64).ravel()
        for b in range(len(s) // QUANTUM):
            mean = float(s[order[f][QUANTUM * b : QUANTUM * (b + 1)]].mean())
            if min_score is None or mean > min_score:
                rows.append((-mean, i, b, f))
    rows.sort()
    return [(f, b) for _, _, b, f in rows], order


def select_blocks(
    ranking: list[tuple[str, int]], cost: dict[str, int], limit: int, fill: bool = False
) -> dict[str, int]:
    """SSEDS eq. 12 over blocks: keep blocks from the top of `ranking` while the next one fits.

    Stops at the first block that does not fit (the quantile s~): the kept set is a prefix of
    the ranking. With `fill`, the rest of the ranking is then walked once, best first, keeping
    every block that still fits in what is left. A field's blocks all cost the same and come in
    its own order, so once one of them does not fit none of its later ones does: a field keeps
    a prefix of its columns either way. Returns {field: number of blocks kept} (none: omitted).
    """
    if not ranking:
        return {}
    c = np.array([QUANTUM * cost[f] for f, _ in ranking], np.int64)
    fits = np.cumsum(c) <= limit
    n = len(ranking) if fits.all() else int(np.argmin(fits))  # first index that overflows
    kept: dict[str, int] = {}
    for f, _ in ranking[:n]:
        kept[f] = kept.get(f, 0) + 1
    left = limit - int(c[:n].sum())
    for i in range(n, len(ranking) if fill else n):  # at most one pass over the blocks, not rows
        if c[i] <= left:
            f = ranking[i][0]
            kept[f], left = kept.get(f, 0) + 1, left - int(c[i])
    return kept


def kept_score(scores: dict[str, np.ndarray], kept_columns: dict[str, list[int]]) -> float:
    """sum of the scores of the kept columns: what eq. 12 maximises within the budget."""
    return float(
        sum(
            np.asarray(scores[f], np.float64).ravel()[list(c)].sum()
            for f, c in kept_columns.items()
            if c and f in scores
        )
    )


def relative_gain(scores: dict[str, np.ndarray], new: dict[str, list[int]], incumbent: dict[str, list[int]]) -> float:
    """(S(new) - S(incumbent)) / |S(incumbent)|, S = `kept_score` under the same scores; inf
    when the incumbent scores 0. The daemon re-shapes the slim arm only when this exceeds a
    threshold: scored on a sample, the new allocation always wins a little (it is the argmax on
    that sample), and every re-shape costs AUC for a few windows.

    >>> relative_gain({"a": [3., 1.], "b": [2., 2.]}, {"a": [0], "b": [0]}, {"a": [0, 1]})
    0.25
    """
    s_new, s_inc = kept_score(scores, new), kept_score(scores, incumbent)
    return (s_new - s_inc) / abs(s_inc) if s_inc else float("inf")


def allocate(
    scores: dict[str, np.ndarray],
    budget: Budget,
    control_dims: dict[str, int],
    num_embeddings: dict[str, int],
    rank_by: dict[str, np.ndarray] | None = None,
    min_score: float | None = None,
    keep_fields: dict[str, bool] | None = None,
) -> Allocation:
    """Blocks of 4 columns kept by SSEDS eq. 12 within `budget` (rule: module docstring).

    scores[f]: one score per control column of field f (higher = keep first). `rank_by`, if
    given, replaces the scores for ranking (e.g. saliency per parameter), both across fields and
    within a field, so that a field keeps exactly the columns the ranking chose. `min_score`
    drops blocks whose mean score is not above it (HAM's 1[alpha > 0] at block level).
    `keep_fields[f]` False removes field f (rule 4). Raises BudgetError if no field can keep 4
    columns."""
    fields = [f for f, d in control_dims.items() if d > 0]
    for f in fields:
        if len(np.ravel(scores[f])) != control_dims[f]:
            raise BudgetError(f"field {f!r}: {len(np.ravel(scores[f]))} scores for {control_dims[f]} columns")
    key = {f: np.asarray((rank_by or scores)[f], np.float64).ravel() for f in fields}
    cost = budget.cost({f: num_embeddings[f] for f in fields})
    limit = budget.limit(control_dims, num_embeddings)
    eligible = {
        f: QUANTUM * cost[f] <= limit and (keep_fields is None or bool(keep_fields.get(f, True))) for f in fields
    }
    ranking, order = rank_blocks(key, eligible, min_score)
    blocks = select_blocks(ranking, cost, limit, budget.fill)
    dims = {f: 0 for f in control_dims} | {f: QUANTUM * n for f, n in blocks.items()}
    if not any(dims.values()):
        raise BudgetError(f"the {budget.kind} budget {limit} is too small to keep {QUANTUM} columns of any field")
    kept_columns = {f: sorted(int(j) for j in order[f][: dims[f]]) if f in order else [] for f in control_dims}
    return Allocation(dims, kept_columns, budget.spent(dims, num_embeddings), limit)
