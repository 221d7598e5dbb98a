"""Plots of the metrics history (summary.json): AUC and log-loss per window per arm."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_summary(summary: dict, path: Path) -> None:
    windows = summary.get("windows", [])
    arms = sorted({a for w in windows for a in w.get("arms", {})}, key=lambda a: (a != "control", a))
    fig, (ax_auc, ax_ll) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [w["index"] for w in windows]
    for arm in arms:
        auc = [w["arms"].get(arm, {}).get("auc", float("nan")) for w in windows]
        ll = [w["arms"].get(arm, {}).get("logloss", float("nan")) for w in windows]
        ax_auc.plot(x, auc, marker="o", ms=3, label=arm)
        ax_ll.plot(x, ll, marker="o", ms=3, label=arm)
    bayes = [w.get("bayes_auc") for w in windows]
    if any(b is not None for b in bayes):
        ax_auc.plot(x, [b if b is not None else float("nan") for b in bayes], "k--", lw=1, label="Bayes-optimal")
    ax_auc.set(title="Progressive AUC (test-then-train)", xlabel="window", ylabel="AUC")
    ax_ll.set(title="Progressive log-loss", xlabel="window", ylabel="log-loss")
    for ax in (ax_auc, ax_ll):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
