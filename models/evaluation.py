"""Progressive-validation metrics of a window: AUC, log-loss, predicted and observed CTR.

>>> import numpy as np
>>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
0.75
"""

from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged (vectorised)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    r = np.empty(len(x), np.float64)
    r[order] = np.repeat(avg, ends - starts)
    return r


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); NaN when only one class is present."""
    y = np.asarray(labels) > 0.5
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = _ranks(np.asarray(scores, np.float64))
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    y = np.asarray(labels, np.float64)
    if len(y) == 0:
        return float("nan")
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def window_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        "ctr_pred": float(np.mean(probs)) if len(probs) else float("nan"),
        "ctr_obs": float(np.mean(labels)) if len(labels) else float("nan"),
    }


def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components V10 (per positive) and V01 (per negative)."""
    pos, neg = scores[y], scores[~y]
    m, n = len(pos), len(neg)
    tz = _ranks(np.concatenate([pos, neg]))
    tx, ty = _ranks(pos), _ranks(neg)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return float(v10.mean()), v10, v01


def auc_difference(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, z: float = 1.959964
) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same rows with DeLong's 95% interval (paired; DeLong et al. 1988,
    the fast form of Sun & Xu 2014). NaNs when a class is missing.

    >>> y = np.array([0, 0, 1, 1, 0, 1]); a = np.array([.1, .2, .8, .9, .3, .7])
    >>> auc_difference(y, a, a)["diff"]
    0.0
    """
    y = np.asarray(labels) > 0.5
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        return {"diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    auc_a, a10, a01 = _delong_components(y, np.asarray(scores_a, np.float64))
    auc_b, b10, b01 = _delong_components(y, np.asarray(scores_b, np.float64))
    var = np.var(a10 - b10, ddof=1) / m + np.var(a01 - b01, ddof=1) / n
    diff, half = auc_a - auc_b, z * float(np.sqrt(max(var, 0.0)))
    return {"diff": diff, "ci_low": diff - half, "ci_high": diff + half}


def progressive_val_score(arms, batch, batch_size: int, on_step=None) -> dict[str, dict]:
    """Test-then-train over one window (progressive validation, like River's function of the
    same name): every mini-batch is scored by every arm before that arm trains on it, the
    scores coming from the training forward pass itself. Returns per arm its window metrics,
    training rows/s and the scores; every other arm's AUC against the arm named "control" on the
    same rows, with DeLong's 95% interval of the difference.

    `on_step(arm_index, rows_done, seconds_so_far)` is called after every step (progress bars,
    a stop request; it may raise to abandon the window).
    """
    import time

    n = len(batch)
    out: dict[str, dict] = {}
    for i, arm in enumerate(arms):
        t0 = time.perf_counter()
        probs = np.empty(n, np.float32)
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            probs[lo:hi] = arm.train_step(batch.slice(lo, hi))
            if on_step is not None:
                on_step(i, hi, time.perf_counter() - t0)
        dt = time.perf_counter() - t0
        m = window_metrics(batch.labels, probs) if n else {}
        out[arm.name] = m | {"train_rows_per_s": n / dt if dt > 0 else 0.0, "scores": probs}
    for name, m in out.items():
        if name != "control" and "control" in out and n:
            m["auc_diff_vs_control"] = auc_difference(batch.labels, m["scores"], out["control"]["scores"])
    return out
