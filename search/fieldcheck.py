"""The held-out field check: does a field tell the control arm anything about rows it has not seen?

SSEDS eq. 9 defines a column's importance as the loss change when its mask goes from 1 to 0;
eq. 10 approximates it by the gradient on training rows. On a stream that approximation cannot
tell a field the model has merely memorised from one it has learnt: the tables are re-fitted
to every recent row, so the ids of a pure-noise field carry recent labels, and masking them
moves the loss on those rows as much as masking a weak signal field (the noise fields' summed
saliency overlaps the signal fields': benchmarks/results/search.json, runs[].sseds_default).
HAM's alpha moves on held-out rows, but a whole noise field changes the held-out loss by an
amount (runs[].field_check.delta) that, spread over its columns, is below the noise of the
mini-batch steps.

This check evaluates eq. 9 exactly, at field level, on held-out rows: for each field i,

    delta_i = mean over rows of [ l(x with e_i replaced by its mean over the rows) - l(x) ],

with its standard error from the paired per-row differences, and keeps field i only if
delta_i > z * stderr_i (one-sided test, default z = 2). The field is replaced by its MEAN
pooled embedding, not by zero: a field's embeddings share a common component that the FM and
DNN use as a constant (a bias), which a re-shaped arm relearns in its bias and other fields;
only the part that varies with the row is information (compare runs[].oracle_field_drop, the
field zeroed, with runs[].field_check.delta, the field replaced by its mean, in
benchmarks/results/search.json).

The rows must be held out for the model checked: on rows it has trained on, memorised noise
looks like information.
The daemon checks the window's rows before the control trains on them (test-then-train), and
averages successive checks (search/policy.py). By default (issue 14: 8,192 rows, z = 0.5) the
average may drop a field only once it pools `min_rows` = 50,000 effective held-out rows: the
first windows' checks, on a control that has not learnt its id fields yet, dropped user_id and
ad_campaign for good (benchmarks/results/noise_floor.json, diagnosis); pooled, a memorised noise
field's delta is below 0 and a weak signal field's above.
Cost: one head forward per field over the rows (the embeddings are looked up once).

    check = check_fields(control_arm, next_window_rows)      # rows the control has not trained on
    check.keep            # {field: bool}
    sseds_search(control_arm, recent_rows, budget, field_check=check)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dimstream.search.masks import ctr_model, pooled_embeddings
from dimstream.search.sseds import minibatches
from dimstream.stream.batch import SparseBatch


@dataclass
class FieldCheck:
    """delta[f]: held-out loss increase when field f is replaced by its mean (SSEDS eq. 9 at
    field level); stderr[f]: its standard error; keep[f]: delta > z * stderr. `rows`: the
    held-out rows behind delta (for a pooled check, search/policy.py, its effective number);
    below `min_rows` of them the check keeps every field: it may not drop a field yet."""

    delta: dict[str, float]
    stderr: dict[str, float]
    keep: dict[str, bool]
    z: float
    rows: int
    seconds: float
    min_rows: int = 0

    @classmethod
    def decide(
        cls,
        delta: dict[str, float],
        stderr: dict[str, float],
        z: float,
        rows: int,
        seconds: float,
        min_rows: int = 0,
    ) -> FieldCheck:
        """The check that keeps field f iff delta[f] > z * stderr[f] (one-sided test), or
        every field while `rows` < `min_rows` (too few held-out rows to drop one)."""
        keep = {f: rows < min_rows or delta[f] > z * stderr[f] for f in delta}
        return cls(delta, stderr, keep, float(z), int(rows), float(seconds), int(min_rows))

    @property
    def dropped(self) -> list[str]:
        return [f for f, k in self.keep.items() if not k]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FieldCheck:
        """The inverse of to_dict; ValueError if `d` is not a whole, consistent check."""
        try:
            check = cls(
                {f: float(v) for f, v in d["delta"].items()},
                {f: float(v) for f, v in d["stderr"].items()},
                {f: bool(v) for f, v in d["keep"].items()},
                float(d["z"]),
                int(d["rows"]),
                float(d["seconds"]),
                int(d.get("min_rows", 0)),  # checks written before min_rows existed
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"not a field check: {e!r}") from None
        if not set(check.delta) == set(check.stderr) == set(check.keep):
            raise ValueError("not a field check: delta, stderr and keep name different fields")
        return check


def _row_losses(model, embs: list[torch.Tensor], wide, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model.head(embs, wide if wide is not None else 0.0)
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").double()


def ablation_diffs(control, rows: SparseBatch, how: str = "mean", batch_size: int = 8192, seed: int = 0) -> dict:
    """{field: per-row loss increase l(x with e_i ablated) - l(x)} of `control` on `rows`.

    how "mean": e_i replaced by its mean over all of `rows` (the module docstring's eq. 9);
    how "shuffle": e_i permuted across the rows (permutation importance, as PaddleRec's slot
    importance): the field keeps its marginal distribution, only its tie to the row is cut."""
    if how not in ("mean", "shuffle"):
        raise ValueError(f"how must be mean or shuffle, got {how!r}")
    m = ctr_model(control)
    names = m.feature_names
    parts = minibatches(rows, batch_size)
    pooled = [pooled_embeddings(m, p.to_kjt(names)) for p in parts]
    full = [torch.cat([e[i] for e, _ in pooled]) for i in range(len(names))]
    gen = torch.Generator().manual_seed(seed)
    if how == "mean":
        repl = [x.double().mean(0).to(x.dtype).expand_as(x) for x in full]
    else:  # one permutation per field over all rows, so a row's stand-in comes from any part
        repl = [x[torch.randperm(len(x), generator=gen)] for x in full]
    diffs = {f: [] for f in names}
    start = 0
    for part, (embs, wide) in zip(parts, pooled):
        labels, n = part.labels_tensor(), len(part)
        base = _row_losses(m, embs, wide, labels)
        for i, f in enumerate(names):
            ablated = list(embs)
            ablated[i] = repl[i][start : start + n]
            diffs[f].append(_row_losses(m, ablated, wide, labels) - base)
        start += n
    return {f: torch.cat(d).numpy() for f, d in diffs.items()}


def check_fields(
    control, rows: SparseBatch, z: float = 2.0, batch_size: int = 8192, how: str = "mean", min_rows: int = 0
) -> FieldCheck:
    """Run the check (module docstring) of every field of `control` (an Arm, its DMP or a
    CTRModel) on `rows`, which the model must not have trained on. Field means are taken over
    all of `rows`; losses are computed in mini-batches of `batch_size` rows; `how` as
    `ablation_diffs`; `min_rows` as FieldCheck's (the daemon pools successive checks)."""
    t0 = time.perf_counter()
    if len(rows) < 2:
        raise ValueError("the field check needs at least 2 held-out rows")
    if z < 0:
        raise ValueError(f"z must be >= 0, got {z}")
    diffs = ablation_diffs(control, rows, how, batch_size)
    delta = {f: float(d.mean()) for f, d in diffs.items()}
    stderr = {f: float(d.std(ddof=1) / np.sqrt(len(d))) for f, d in diffs.items()}
    return FieldCheck.decide(delta, stderr, z, len(rows), time.perf_counter() - t0, min_rows)
