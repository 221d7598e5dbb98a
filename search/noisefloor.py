"""A noise floor for SSEDS's saliency: is a field's |dL/dalpha| more than sampling noise?

SSEDS eq. 10 estimates g_ij = dL/dalpha_ij at alpha = 1 on a sample of rows, and eq. 11 ranks
columns by |g_ij|. The estimate is a mean over rows of per-row contributions

    c_ij(r) = e_ij(r) * dl_r/de_ij(r)        (pooling is linear: e' = alpha * e, SSEDS eq. 8)

so it carries a sampling error se_ij = std_r c_ij(r) / sqrt(n). A column whose true gradient is
0 still scores |g_ij| ~ |N(0, se_ij^2)|, of mean se_ij sqrt(2/pi) and variance se_ij^2 (1 - 2/pi);
on the synthetic stream that noise is of the same size as the signal columns' saliency, which is
why SSEDS alone keeps most noise fields. The floor is a field-level test against that null:

    T_i = sum_j |g_ij|,   mu_i = sqrt(2/pi) sum_j se_ij,   sd_i = sqrt((1 - 2/pi) sum_j se_ij^2),

and field i keeps its saliency only if T_i > mu_i + K sd_i; otherwise all its columns score 0
(and, with SearchMethod.min_score 0, get no block). Cost: the same one forward-backward as eq. 10
(the per-row contributions come from the gradient of the summed loss with respect to the pooled
embeddings, whose mean over rows is eq. 10's gradient).

Measured (benchmarks/results/noise_floor.json, "offline": a control trained 12 windows, SSEDS on
its last 8,192 trained rows, 2 seeds): the test does not separate noise fields from weak signal
fields. Off, 0 and 3 of 6 noise fields get 0 (Spearman 0.78, 0.55); at K = 2, 2 and 5 of 6, but
Spearman falls to 0.15 and 0.06: most columns of every field are within their sampling noise
(the gradient at alpha = 1 of a trained model is small), so the floor removes signal fields as
readily as noise ones. It is an option (`--noise-floor K`), off by default.

>>> import numpy as np
>>> g = {"strong": np.array([0.5, 0.4, 0.0, 0.0]), "null": np.array([0.01, -0.01, 0.01, 0.0])}
>>> se = {"strong": np.full(4, 0.01), "null": np.full(4, 0.01)}
>>> floor = field_floor(g, se, k=2.0)
>>> floor.keep
{'strong': True, 'null': False}
>>> apply_floor({"strong": np.abs(g["strong"]), "null": np.abs(g["null"])}, floor)["null"].tolist()
[0.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dimstream.search.masks import ctr_model, pooled_embeddings

_HALF_NORMAL_MEAN = float(np.sqrt(2 / np.pi))  # E|N(0, 1)|
_HALF_NORMAL_VAR = 1 - 2 / np.pi  # Var|N(0, 1)|


@dataclass
class FieldFloor:
    """Per field: T (summed |g|), the null's mean mu and sd, and keep = T > mu + k sd."""

    saliency: dict[str, float]
    null_mean: dict[str, float]
    null_sd: dict[str, float]
    keep: dict[str, bool]
    k: float

    @property
    def floored(self) -> list[str]:
        return [f for f, kept in self.keep.items() if not kept]

    def to_dict(self) -> dict:
        return asdict(self) | {"floored": self.floored}


def field_floor(g: dict[str, np.ndarray], se: dict[str, np.ndarray], k: float) -> FieldFloor:
    """The field-level test of the module docstring on gradients g (eq. 10) and their standard
    errors se, with threshold k null standard deviations."""
    if not k >= 0:
        raise ValueError(f"the noise floor's k must be >= 0, got {k}")
    t = {f: float(np.abs(v).sum()) for f, v in g.items()}
    mu = {f: _HALF_NORMAL_MEAN * float(np.sum(se[f])) for f in g}
    sd = {f: float(np.sqrt(_HALF_NORMAL_VAR * np.sum(np.square(se[f])))) for f in g}
    keep = {f: t[f] > mu[f] + k * sd[f] for f in g}
    return FieldFloor(t, mu, sd, keep, float(k))


def apply_floor(scores: dict[str, np.ndarray], floor: FieldFloor) -> dict[str, np.ndarray]:
    """`scores` with every column of a floored field set to 0 (the others unchanged)."""
    kept = {f: floor.keep.get(f, True) for f in scores}
    return {f: np.asarray(v, np.float64) if kept[f] else np.zeros(np.shape(v)) for f, v in scores.items()}


def gradient_and_error(control, batches) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float, int]:
    """(g, se, mean loss, rows): g_ij = dL/dalpha_ij at alpha = 1 of the mean log-loss L over all
    rows of `batches` (SSEDS eq. 10), and se_ij its standard error over the rows, from the
    per-row contributions c_ij(r) (module docstring). Only leaf copies of the pooled embeddings
    receive gradients: the control is not modified."""
    m = ctr_model(control)
    names = m.feature_names
    total, loss_sum = sum(len(b) for b in batches), 0.0
    s1 = {f: np.zeros(d) for f, d in m.dims.items() if d > 0}
    s2 = {f: np.zeros(m.dims[f]) for f in s1}
    for b in batches:
        if len(b) == 0:
            continue
        embs, wide = pooled_embeddings(m, b.to_kjt(names))
        leaves = [e.clone().requires_grad_(True) for e in embs]
        logits = m.head(leaves, wide if wide is not None else 0.0)
        loss = F.binary_cross_entropy_with_logits(logits, b.labels_tensor().to(logits.dtype), reduction="sum")
        for f, e, grad in zip(names, embs, torch.autograd.grad(loss, leaves)):
            c = (e.double() * grad.double()).numpy()  # c_ij(r), row by row
            s1[f] += c.sum(0)
            s2[f] += np.square(c).sum(0)
        loss_sum += float(loss.detach())
    g = {f: s1[f] / total for f in s1}
    var = {f: np.maximum(s2[f] / total - np.square(g[f]), 0.0) * total / max(total - 1, 1) for f in s1}
    se = {f: np.sqrt(var[f] / total) for f in s1}
    return g, se, loss_sum / total, total
