"""When and how the slim arm is re-shaped: the moving average of the searches, the gain gate,
and the averaged field check.

One search scores columns on a sample of recent rows, and successive samples rank columns very
differently: re-allocating from each shot alone re-shapes the slim arm at nearly every search,
and every re-shape costs AUC for a few windows (benchmarks/results/arms.json,
datasets.*.runs[].reallocations; the `--saliency-decay 0 --realloc-min-gain 0` run of
benchmarks/arms.py shows the daemon without this policy). So the policy

  1. averages the column scores of successive proposals of one method,
         s <- d * s + (1 - d) * s_new,   d = decay ** (rows / decay_rows),
     so the average's memory is counted in rows, not searches: a proposal scored on `rows`
     rows (the window's, at most `decay_rows`) moves it as much as its rows say. With a fixed d,
     ml-100k's one-day windows (about 470 rows) averaged ~2,400 rows and re-shaped the slim arm
     on noise, below uniform by more than the equal-budget test allows (README, Figures);
     and allocates the average by the rule of search/budget.py (SSEDS eq. 12 over blocks of 4,
     the method's `min_score`, the field check's keep rule); averaging the shots is the "more
     rows" the paper's single mini-batch D_b lacks, at no extra search cost; decay 0 = the
     proposal's own allocation;
  2. re-shapes only if that allocation's score sum(s over kept columns) beats the incumbent's
     under the same scores by `min_gain` (relative, `relative_gain`): on a sample the new
     allocation always wins a little, being the argmax on that sample. A slim arm over the
     budget (control-sized before its first cut) is re-shaped whatever the gain. Fields the
     field check drops score 0 for the incumbent too;
  3. averages the held-out field checks (SSEDS eq. 9 per field, search/fieldcheck.py) of
     successive search windows the same way: delta <- d delta + (1 - d) delta_new and, the
     windows' rows being independent, var <- d^2 var + (1 - d)^2 var_new; keep = delta > z sqrt(var).
     One window's check flips on fields near its threshold, and every flip re-shapes the arm.

A proposal is anything with method, saliency, dims and kept_columns: a SearchResult (the
daemon's own search) or a Plan (the cron job's), so both go through the same average and gate.
The policy knows no runner: its state is `state_dict()` (JSON), checkpointed by the caller.

>>> p = AllocationPolicy(kappa=0.5, decay=0.5, min_gain=0.05)
>>> from types import SimpleNamespace as Proposal
>>> first = Proposal(method="m", saliency={"a": [1.0] * 4, "b": [0.0] * 4}, dims={}, kept_columns={})
>>> d = p.decide(first, {"a": 4, "b": 4}, {"a": 10, "b": 10}, {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]})
>>> d.reshape, d.dims, d.reason
(True, {'a': 4, 'b': 0}, 'over budget')
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from dimstream.search.budget import Budget, allocate, params_of, relative_gain
from dimstream.search.fieldcheck import FieldCheck


@dataclass
class Decision:
    """What to do with the slim arm after one proposal."""

    reshape: bool
    dims: dict[str, int]  # the allocation the policy chose (every control field)
    kept_columns: dict[str, list[int]]
    gain: float  # relative_gain over the incumbent; inf if it scores 0
    reason: str

    def to_dict(self) -> dict:
        """JSON-able; an infinite gain reads null."""
        return {"reshape": self.reshape, "dims": dict(self.dims), "gain": _finite(self.gain), "reason": self.reason}


def _finite(x: float) -> float | None:
    return x if x != float("inf") else None


class AllocationPolicy:
    """The moving average, the gain gate and the averaged field check (module docstring)."""

    def __init__(self, kappa: float, decay: float, min_gain: float, fill: bool = False, decay_rows: int | None = None):
        """decay_rows: the rows a proposal must have been scored on for `decay` to apply as is
        (module docstring, 1); None: every proposal counts as that many."""
        self.budget = Budget("params", kappa=kappa, fill=fill)
        self.decay, self.min_gain, self.decay_rows = decay, min_gain, decay_rows
        self._scores: dict | None = None  # {"method": name, "scores": {field: [score per column]}}
        self._check: dict | None = None  # {"delta": {field: x}, "var": {field: x}}

    # --- 3. the field check ---
    def average_check(self, shot: FieldCheck) -> FieldCheck:
        """`shot` averaged with the earlier checks (module docstring, 3); the state moves on.
        The average's effective rows, (sum of weights)^2 / sum(weight^2 / rows), are its `rows`:
        below the shot's `min_rows` it drops no field."""
        d, prev = self.decay, self._check
        if d == 0 or not prev or set(prev["delta"]) != set(shot.delta):
            delta, var = dict(shot.delta), {f: s * s for f, s in shot.stderr.items()}
            w1, w2 = 1.0, 1.0 / max(shot.rows, 1)
        else:
            delta = {f: d * prev["delta"][f] + (1 - d) * shot.delta[f] for f in shot.delta}
            var = {f: d * d * prev["var"][f] + (1 - d) ** 2 * shot.stderr[f] ** 2 for f in shot.delta}
            # a state saved before the rows were pooled counts as this shot's rows
            w1 = d * prev.get("w1", 1.0) + (1 - d)
            w2 = d * d * prev.get("w2", 1.0 / max(shot.rows, 1)) + (1 - d) ** 2 / max(shot.rows, 1)
        self._check = {"delta": delta, "var": var, "w1": w1, "w2": w2}
        stderr = {f: float(np.sqrt(v)) for f, v in var.items()}
        return FieldCheck.decide(delta, stderr, shot.z, round(w1 * w1 / w2), shot.seconds, shot.min_rows)

    # --- 1. the moving average ---
    def smooth(
        self,
        proposal,
        control_dims: dict[str, int],
        num_embeddings: dict[str, int],
        keep: dict[str, bool] | None = None,
        min_score: float | None = None,
        rows: int | None = None,
    ) -> tuple[dict, dict, dict]:
        """(averaged scores, dims, kept columns); the average restarts when the method changes
        or the fields do (scores of two methods are not on one scale)."""
        new = {f: np.asarray(v, np.float64) for f, v in proposal.saliency.items()}
        prev = self._scores
        if self.decay > 0 and prev and prev.get("method") == proposal.method and set(prev["scores"]) == set(new):
            d = self.row_decay(rows)
            new = {f: d * np.asarray(prev["scores"][f]) + (1 - d) * v for f, v in new.items()}
        self._scores = {"method": proposal.method, "scores": {f: v.tolist() for f, v in new.items()}}
        if self.decay == 0:
            return new, proposal.dims, proposal.kept_columns
        alloc = allocate(new, self.budget, control_dims, num_embeddings, min_score=min_score, keep_fields=keep)
        return new, alloc.dims, alloc.kept_columns

    def row_decay(self, rows: int | None) -> float:
        """d = decay ** (rows / decay_rows), rows capped at decay_rows (module docstring, 1).

        >>> p = AllocationPolicy(0.25, decay=0.8, min_gain=0.0, decay_rows=8192)
        >>> p.row_decay(8192), p.row_decay(None), round(p.row_decay(512), 4)
        (0.8, 0.8, 0.9862)
        """
        if self.decay_rows is None or rows is None:
            return self.decay
        return self.decay ** (min(max(int(rows), 1), self.decay_rows) / self.decay_rows)

    # --- 2. the gate ---
    def decide(
        self,
        proposal,
        control_dims: dict[str, int],
        num_embeddings: dict[str, int],
        current: dict[str, list[int]],
        *,
        keep: dict[str, bool] | None = None,
        min_score: float | None = None,
        rows: int | None = None,
    ) -> Decision:
        """Feed one proposal through the average and the gate.

        current: the slim arm's kept control columns per field (its incumbent allocation);
        keep: the field check the proposal followed ({field: False} = dropped), or None;
        min_score: the proposing method's floor (SearchMethod.min_score);
        rows: the rows the proposal was scored on, or None (a cron plan: a full share)."""
        scores, dims, kept = self.smooth(proposal, control_dims, num_embeddings, keep, min_score, rows)
        over = params_of({f: len(c) for f, c in current.items()}, num_embeddings) > self.budget.limit(
            control_dims, num_embeddings
        )
        if keep is not None:  # a field found to carry nothing is worth nothing to the incumbent either
            scores = {f: v * 0.0 if not keep.get(f, True) else v for f, v in scores.items()}
        gain = relative_gain(scores, kept, current)
        if over:
            return Decision(True, dims, kept, gain, "over budget")
        if gain <= 0:  # the incumbent scores as well: a re-shape would cost a dip for nothing
            return Decision(False, dims, kept, gain, "no gain")
        if gain < self.min_gain:
            return Decision(False, dims, kept, gain, f"gain {gain:.1%} < {self.min_gain:.1%}")
        return Decision(True, dims, kept, gain, f"gain {gain:.1%} >= {self.min_gain:.1%}")

    # --- state ---
    def state_dict(self) -> dict:
        """JSON-able; the keys are those of the daemon's earlier `extra`, so old checkpoints load."""
        return copy.deepcopy({"search_scores": self._scores, "field_check_avg": self._check})

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self._scores = copy.deepcopy(state.get("search_scores")) or None
        self._check = copy.deepcopy(state.get("field_check_avg")) or None
