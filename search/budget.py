"""The parameter budget of the slim arm and the greedy, quantised choice of kept columns.

A column j of field i costs rows_i = num_embeddings[i] parameters, so an allocation {d_i}
costs sum_i rows_i * d_i (SSEDS eq. 4). The slim arm may hold at most kappa times the
control arm's parameters (SSEDS eqs. 4 and 8, default kappa = 0.25): `Budget("params", kappa)`.
HAM's alternative is a target number s of kept columns over all fields (HAM section 3.3):
`Budget("columns", columns=s)`, every column costing 1.

Selection (SSEDS eq. 12): rank the single (field, column) pairs by score, best first, and keep
them from the top while the next one still fits; the first that does not fit is the quantile
s~ of eq. 12 and everything ranked below it is pruned (a prefix of the ranking, as in the paper;
a cheap low-ranked column is never kept in place of a better one that did not fit). Fields
whose 4 columns alone exceed the budget cannot be kept at all and are left out of the ranking.

Quantisation (ours: FBGEMM's fused kernels need widths that are multiples of 4):
  1. every field's kept count is rounded DOWN to a multiple of 4;
  2. the budget this frees is spent rounding fields back UP: each field that lost columns in
     step 1 is a candidate to go to the next multiple of 4, i.e. to add its next 4 columns
     (its best-scored columns beyond the rounded-down count). Candidates are taken in
     decreasing order of the total score of those 4 columns, each only if it still fits;
     a candidate that does not fit is skipped and the next one tried.
A field is never rounded up from 0 kept columns, and never beyond its control width. The
columns a field keeps are always its top-scored ones. A field left with 0 columns leaves the
model (allocation 0).

>>> b = Budget("params", kappa=0.5)
>>> rows, ctrl = {"a": 10, "b": 1000}, {"a": 8, "b": 8}
>>> b.limit(ctrl, rows)
4040
>>> alloc = allocate({"a": [5, 4, 3, 2, 1, 1, 1, 1], "b": [9, 0, 0, 0, 0, 0, 0, 0]}, b, ctrl, rows)
>>> alloc.dims, alloc.used
({'a': 8, 'b': 0}, 80)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

KINDS = ("params", "columns")
QUANTUM = 4  # embedding widths are multiples of 4 (models/embedding.py)


class BudgetError(ValueError):
    """A budget that is malformed or too small to keep any field."""


@dataclass(frozen=True)
class Budget:
    """What the slim arm may spend.

    kind "params":  sum_i rows_i * d_i <= floor(kappa * sum_i rows_i * control_d_i)  (SSEDS eq. 4/8)
    kind "columns": sum_i d_i <= columns  (HAM's target embedding size s)
    """
    kind: str = "params"
    kappa: float = 0.25
    columns: int | None = None

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
    dims: dict[str, int]              # every field of the control arm; 0 = pruned
    kept_columns: dict[str, list[int]]  # control-arm column indices kept, sorted
    used: int                         # spent, in the budget's unit
    limit: int                        # the budget, in the same unit


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
    params: int                       # sum_i rows_i * d_i of the allocation
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def rank_columns(scores: dict[str, np.ndarray], eligible: dict[str, np.ndarray] | None = None
                 ) -> list[tuple[str, int]]:
    """(field, column) pairs, best score first (ties: field order, then column index): the
    descending ranking of saliency scores that SSEDS eq. 12 thresholds (Algorithm 1, "Rank").

    `eligible[f]` (bool per column) leaves the other columns out of the ranking."""
    fields = list(scores)
    s = np.concatenate([np.asarray(scores[f], np.float64).ravel() for f in fields]) if fields else np.zeros(0)
    fid = np.concatenate([np.full(len(np.ravel(scores[f])), i) for i, f in enumerate(fields)]) if fields else np.zeros(0, int)
    col = np.concatenate([np.arange(len(np.ravel(scores[f]))) for f in fields]) if fields else np.zeros(0, int)
    keep = np.ones(len(s), bool)
    if eligible is not None:
        keep = np.concatenate([np.asarray(eligible.get(f, np.ones(len(np.ravel(scores[f])), bool)), bool).ravel()
                               for f in fields]) if fields else keep
    order = np.lexsort((col, fid, -s))  # last key is primary: score descending
    order = order[keep[order]]
    return [(fields[fid[k]], int(col[k])) for k in order]


def greedy_select(ranking: list[tuple[str, int]], cost: dict[str, int], limit: int) -> dict[str, list[int]]:
    """SSEDS eq. 12: keep columns from the top of `ranking` while the next one fits in `limit`.

    Stops at the first column that does not fit (the quantile s~): the kept set is a prefix
    of the ranking. Returns {field: kept columns in ranking order} (fields with none omitted)."""
    if not ranking:
        return {}
    c = np.array([cost[f] for f, _ in ranking], np.int64)
    fits = np.cumsum(c) <= limit
    n = len(ranking) if fits.all() else int(np.argmin(fits))  # first index that overflows
    kept: dict[str, list[int]] = {}
    for f, j in ranking[:n]:
        kept.setdefault(f, []).append(j)
    return kept


def quantise(kept: dict[str, list[int]], scores: dict[str, np.ndarray], cost: dict[str, int],
             limit: int, control_dims: dict[str, int]) -> dict[str, list[int]]:
    """Round every field's kept count to a multiple of 4 within `limit` (rule: module docstring).

    `kept[f]` is the field's greedy count; the field keeps its top-scored columns. Returns
    {field: kept columns (sorted)} for every field of `control_dims` ([] = pruned)."""
    order = {f: np.lexsort((np.arange(len(np.ravel(s))), -np.asarray(s, np.float64).ravel()))
             for f, s in scores.items()}  # each field's columns, best first
    count = {f: len(kept.get(f, [])) for f in control_dims}
    down = {f: n // QUANTUM * QUANTUM for f, n in count.items()}
    spent = sum(cost[f] * d for f, d in down.items())
    # candidates: fields that lost columns when rounded down, by total score of the next 4
    cands = []
    for f, n in count.items():
        up = down[f] + QUANTUM
        if n > down[f] and up <= control_dims[f]:
            gain = float(np.asarray(scores[f], np.float64).ravel()[order[f][down[f]:up]].sum())
            cands.append((-gain, list(control_dims).index(f), f))
    final = dict(down)
    for _, _, f in sorted(cands):
        extra = cost[f] * QUANTUM
        if spent + extra <= limit:
            final[f] += QUANTUM
            spent += extra
    return {f: sorted(int(j) for j in order[f][:d]) if d else [] for f, d in final.items()}


def allocate(scores: dict[str, np.ndarray], budget: Budget, control_dims: dict[str, int],
             num_embeddings: dict[str, int], rank_by: dict[str, np.ndarray] | None = None,
             eligible: dict[str, np.ndarray] | None = None) -> Allocation:
    """Greedy selection (SSEDS eq. 12) then quantisation to multiples of 4, within `budget`.

    scores[f]: one score per control column of field f (higher = keep first). `rank_by`, if
    given, replaces the scores for the global ranking only (e.g. saliency per parameter); the
    columns a field keeps and its round-up order still follow `rank_by` so that a field keeps
    exactly the columns the ranking chose. `eligible[f]` excludes columns from selection.
    Raises BudgetError if no field can keep 4 columns."""
    fields = [f for f, d in control_dims.items() if d > 0]
    for f in fields:
        if len(np.ravel(scores[f])) != control_dims[f]:
            raise BudgetError(f"field {f!r}: {len(np.ravel(scores[f]))} scores for {control_dims[f]} columns")
    key = {f: np.asarray((rank_by or scores)[f], np.float64).ravel() for f in fields}
    cost = budget.cost({f: num_embeddings[f] for f in fields})
    limit = budget.limit(control_dims, num_embeddings)
    # a field whose 4 cheapest-possible columns exceed the whole budget can never be kept:
    # leave it out of the ranking, or its first column would end the prefix for everyone
    eligible = {f: (np.asarray(eligible[f], bool) if eligible is not None and f in eligible
                    else np.ones(control_dims[f], bool)) & (QUANTUM * cost[f] <= limit) for f in fields}
    kept = greedy_select(rank_columns(key, eligible), cost, limit)
    cols = quantise(kept, key, cost, limit, {f: control_dims[f] for f in fields})
    dims = {f: 0 for f in control_dims} | {f: len(c) for f, c in cols.items()}
    if not any(dims.values()):
        raise BudgetError(f"the {budget.kind} budget {limit} is too small to keep {QUANTUM} columns of any field")
    kept_columns = {f: cols.get(f, []) for f in control_dims}
    return Allocation(dims, kept_columns, budget.spent(dims, num_embeddings), limit)
