"""The A/B verdict `dimstream run` prints at its end: every arm against control, second half.

A plain function over the history (the records of history.jsonl, or summary.json's windows):

  - per arm: progressive AUC, its difference to control with a 95% interval, log-loss,
    calibration (predicted / observed CTR), embedding parameters and their share of control's;
  - the slim arm's allocation: its widest and its pruned fields;
  - on a source that knows its truth (synthetic): Spearman's rho between the allocation and
    the true field ranks, and how many pure-noise fields (true rank 0) it pruned.

The second half of the stream is measured because the first half is warm-up: every arm starts
untrained and the slim arm is re-shaped by its first searches.

>>> arms = lambda c, s: {
...     "control": {"auc": c, "logloss": 0.2, "ctr_pred": 0.05, "ctr_obs": 0.05, "embedding_params": 400,
...                 "dims": {"a": 8, "b": 8}},
...     "slim": {"auc": s, "logloss": 0.19, "ctr_pred": 0.05, "ctr_obs": 0.05, "embedding_params": 100,
...              "dims": {"a": 4, "b": 0},
...              "auc_diff_vs_control": {"diff": s - c, "ci_low": s - c - 0.01, "ci_high": s - c + 0.01}}}
>>> windows = [{"index": i, "rows": 1000, "arms": arms(0.70, 0.70 + 0.002 * i)} for i in range(4)]
>>> v = verdict({"windows": windows, "truth": {"field_rank": {"a": 2, "b": 0}}})
>>> v["windows"], round(v["arms"]["slim"]["auc_diff"]["diff"], 4), v["arms"]["slim"]["params_share"]
([2, 3], 0.005, 0.25)
>>> v["allocation"]["pruned"], v["truth"]["spearman"], v["truth"]["noise_pruned"]
(['b'], 1.0, [1, 1])
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959964  # the two-sided 95% normal quantile, as models/evaluation.py auc_difference uses


def second_half(windows: list[dict]) -> list[dict]:
    """The windows of the stream's second half that trained on rows."""
    trained = [w for w in windows if w.get("rows", 0) > 0 and w.get("arms")]
    return trained[len(trained) // 2 :]


def _weighted(values: list[float], weights: list[float]) -> float:
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None and not math.isnan(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


def pooled_difference(diffs: list[dict], rows: list[int]) -> dict[str, float]:
    """Row-weighted mean of per-window AUC differences with a 95% interval.

    Each window's DeLong interval gives its standard error, se_i = (high_i - low_i) / (2 z).
    The windows' progressive scores lie on disjoint rows, so the differences are taken as
    independent: Var(sum_i w_i d_i) = sum_i w_i^2 se_i^2 with w_i = n_i / sum n (a fixed-effect
    pooling of the windows' DeLong estimates).

    >>> d = pooled_difference([{"diff": 0.01, "ci_low": 0.0, "ci_high": 0.02}] * 4, [10] * 4)
    >>> round(d["diff"], 4), round(d["ci_low"], 4), round(d["ci_high"], 4)
    (0.01, 0.005, 0.015)
    """
    ok = [(d, n) for d, n in zip(diffs, rows) if d and not math.isnan(d.get("diff", float("nan")))]
    if not ok:
        return {"diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    total = sum(n for _, n in ok)
    diff = sum(d["diff"] * n for d, n in ok) / total
    var = sum((n / total) ** 2 * ((d["ci_high"] - d["ci_low"]) / (2 * Z95)) ** 2 for d, n in ok)
    half = Z95 * math.sqrt(var)
    return {"diff": diff, "ci_low": diff - half, "ci_high": diff + half}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks (ties share their mean rank).

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 40]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    rx, ry = _average_ranks(np.asarray(x, float)), _average_ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(round(np.corrcoef(rx, ry)[0, 1], 12))


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):  # per distinct value, not per row: a few dozen fields at most
        tie = v == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def _arm_verdict(name: str, half: list[dict], control_params: int) -> dict:
    rows = [w["rows"] for w in half if name in w["arms"]]
    ms = [w["arms"][name] for w in half if name in w["arms"]]
    pred = sum(m.get("ctr_pred", float("nan")) * n for m, n in zip(ms, rows))
    obs = sum(m.get("ctr_obs", float("nan")) * n for m, n in zip(ms, rows))
    params = ms[-1]["embedding_params"]
    out = {
        "rows": sum(rows),
        "auc": _weighted([m.get("auc") for m in ms], rows),
        "logloss": _weighted([m.get("logloss") for m in ms], rows),
        "calibration": pred / obs if obs else float("nan"),  # pooled predicted / observed CTR
        "embedding_params": params,
        "params_share": params / control_params if control_params else float("nan"),
    }
    if name != "control":
        out["auc_diff"] = pooled_difference([m.get("auc_diff_vs_control") for m in ms], rows)
    return out


def allocation(dims: dict[str, int], widest: int = 5) -> dict:
    """The widest fields (widest first, ties in schema order) and the pruned ones (width 0)."""
    ranked = sorted(dims, key=lambda f: -dims[f])  # sorted() is stable: schema order on ties
    return {
        "widest": [(f, dims[f]) for f in ranked[:widest] if dims[f] > 0],
        "pruned": [f for f in dims if dims[f] == 0],
        "fields": len(dims),
    }


def truth_agreement(dims: dict[str, int], field_rank: dict[str, int]) -> dict:
    """The allocation against the generator's true field ranks (0 = pure noise)."""
    fields = [f for f in dims if f in field_rank]
    noise = [f for f in fields if field_rank[f] == 0]
    return {
        "spearman": spearman([dims[f] for f in fields], [field_rank[f] for f in fields]),
        "noise_pruned": [sum(dims[f] == 0 for f in noise), len(noise)],
        "noise_kept": [f for f in noise if dims[f] > 0],
    }


def verdict(summary: dict) -> dict:
    """The verdict over `summary["windows"]` (the whole history log, ideally)."""
    half = second_half(summary.get("windows", []))
    if not half:
        return {"windows": [], "arms": {}}
    names = sorted({a for w in half for a in w["arms"]}, key=lambda a: (a != "control", a != "slim", a))
    control_params = half[-1]["arms"].get("control", {}).get("embedding_params", 0)
    out = {
        "windows": [half[0]["index"], half[-1]["index"]],
        "source": summary.get("source"),
        "model": summary.get("model"),
        "arms": {a: _arm_verdict(a, half, control_params) for a in names},
    }
    if searches := search_counts(summary.get("windows", [])):
        out["searches"] = searches
    searched = "slim" if "slim" in half[-1]["arms"] else None
    if searched:
        dims = half[-1]["arms"][searched]["dims"]
        out["allocation"] = allocation(dims)
        rank = (summary.get("truth") or {}).get("field_rank")
        if rank:
            out["truth"] = truth_agreement(dims, rank)
    return out


def search_counts(windows: list[dict]) -> dict | None:
    """Over the whole stream: searches run, skipped (owed to a later window) and failed, with
    the last failure's error; None when no search was ever due.

    >>> search_counts([{"search": {}}, {"search_skipped": "1 rows"}, {"search_failed": "ValueError: x"}, {}])
    {'run': 1, 'skipped': 1, 'failed': 1, 'last_failure': 'ValueError: x'}
    """
    failed = [w["search_failed"] for w in windows if w.get("search_failed")]
    counts = {
        "run": sum("search" in w for w in windows),
        "skipped": sum(bool(w.get("search_skipped")) for w in windows),
        "failed": len(failed),
    }
    if not any(counts.values()):
        return None
    return counts | ({"last_failure": failed[-1]} if failed else {})


def _call(diff: dict) -> str:
    if math.isnan(diff["diff"]):
        return "no interval"
    if diff["ci_low"] > 0:
        return "better than control"
    if diff["ci_high"] < 0:
        return "worse than control"
    return "level with control"


def format_verdict(v: dict) -> str:
    """The verdict as `dimstream run` prints it (plain text, one table and a few lines)."""
    if not v.get("arms"):
        return "dimstream verdict: no window trained on rows yet"
    rows = sum(a["rows"] for a in v["arms"].values()) // len(v["arms"])
    lines = [
        f"dimstream verdict: windows {v['windows'][0]}-{v['windows'][1]} (second half of the stream, "
        f"{rows:,} rows), {v.get('model')} on {v.get('source')}",
        f"{'arm':<9}{'AUC':>8}  {'AUC - control [95% CI]':<30}{'log-loss':>9}{'pred/obs CTR':>14}"
        f"{'emb. params':>14}{'of control':>12}",
    ]
    for name, a in v["arms"].items():
        d = a.get("auc_diff")
        ci = f"{d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if d else "-"
        lines.append(
            f"{name:<9}{a['auc']:>8.4f}  {ci:<30}{a['logloss']:>9.4f}{a['calibration']:>14.3f}"
            f"{a['embedding_params']:>14,}{a['params_share']:>11.1%}"
        )
    if "allocation" in v:
        al = v["allocation"]
        widest = ", ".join(f"{f} {d}" for f, d in al["widest"])
        pruned = ", ".join(al["pruned"]) or "none"
        lines.append(f"slim allocation: widest {widest}; pruned {len(al['pruned'])} of {al['fields']}: {pruned}")
    if "truth" in v:
        t = v["truth"]
        kept = f" (kept {', '.join(t['noise_kept'])})" if t["noise_kept"] else ""
        lines.append(
            f"against the true field ranks: Spearman {t['spearman']:.2f}; "
            f"noise fields pruned {t['noise_pruned'][0]} of {t['noise_pruned'][1]}{kept}"
        )
    if "searches" in v:
        c = v["searches"]
        failure = f" (last: {c['last_failure']})" if c["failed"] else ""
        lines.append(
            f"searches: {c['run']} run, {c['skipped']} skipped (owed to a later window), {c['failed']} failed{failure}"
        )
    lines += _calls(v["arms"])
    return "\n".join(lines)


def _calls(arms: dict) -> list[str]:
    out = []
    for name, a in arms.items():
        if name == "control":
            continue
        out.append(f"{name}: {_call(a['auc_diff'])} at {a['params_share']:.1%} of its embedding parameters")
    if "slim" in arms and "uniform" in arms:
        gap = arms["slim"]["auc"] - arms["uniform"]["auc"]
        out.append(f"slim - uniform (same budget): AUC {gap:+.4f}")
    return out
