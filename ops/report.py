"""Plots of the metrics history (summary.json): AUC and log-loss per window per arm."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

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


def _arms(windows: list[dict]) -> list[str]:
    return sorted({a for w in windows for a in w.get("arms", {})}, key=lambda a: (a != "control", a))


def _series(windows, arm, key):
    return [w["arms"].get(arm, {}).get(key, float("nan")) for w in windows]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def report_pngs(summary: dict, out: Path) -> list[tuple[str, str]]:
    """(title, file) of every plot of the report, written into `out`."""
    windows = summary.get("windows", [])
    x = [w["index"] for w in windows]
    arms = _arms(windows)
    made = []

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for arm in arms:
        a1.plot(x, _series(windows, arm, "auc"), marker="o", ms=3, label=arm)
        a2.plot(x, _series(windows, arm, "logloss"), marker="o", ms=3, label=arm)
    a1.set(title="Progressive AUC per arm", xlabel="window", ylabel="AUC")
    a2.set(title="Progressive log-loss per arm", xlabel="window", ylabel="log-loss")
    for a in (a1, a2):
        a.grid(alpha=0.3), a.legend()
    made.append(("AUC and log-loss", _save(fig, out / "auc_logloss.png")))

    fig, ax = plt.subplots(figsize=(13, 4.5))
    for arm in arms[1:]:
        d = [w["arms"].get(arm, {}).get("auc_diff_vs_control", {}) for w in windows]
        diff = [v.get("diff", float("nan")) for v in d]
        ax.plot(x, diff, marker="o", ms=3, label=f"{arm} - control")
        ax.fill_between(
            x, [v.get("ci_low", float("nan")) for v in d], [v.get("ci_high", float("nan")) for v in d], alpha=0.2
        )
    ax.axhline(0, color="k", lw=1)
    ax.set(title="AUC difference to control with DeLong 95% interval", xlabel="window", ylabel="AUC difference")
    ax.grid(alpha=0.3), ax.legend()
    made.append(("AUC difference to control", _save(fig, out / "auc_diff.png")))

    fig, ax = plt.subplots(figsize=(13, 4.5))
    for arm in arms:
        ax.plot(x, [p / 1e6 for p in _series(windows, arm, "embedding_params")], marker="o", ms=3, label=arm)
    ax.set(title="Embedding parameters per arm", xlabel="window", ylabel="millions")
    ax.grid(alpha=0.3), ax.legend()
    made.append(("Parameters", _save(fig, out / "params.png")))

    arm = "slim" if "slim" in arms else arms[0]
    fields = list(windows[-1]["arms"][arm]["dims"]) if windows else []
    if fields:
        grid = np.array([[w["arms"].get(arm, {}).get("dims", {}).get(f, np.nan) for w in windows] for f in fields])
        fig, ax = plt.subplots(figsize=(13, 0.28 * len(fields) + 1.5))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(fields)), fields, fontsize=8)
        ax.set(title=f"Embedding dimension per field, arm {arm}", xlabel="window")
        fig.colorbar(im, ax=ax, label="dimension")
        made.append(("Allocation per field", _save(fig, out / "allocation.png")))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4))
    search = [(w["index"], w["search"]["seconds"]) for w in windows if "search" in w]
    if search:
        a1.bar([s[0] for s in search], [s[1] for s in search])
    a1.set(title="Search time per window", xlabel="window", ylabel="seconds")
    for arm in arms:
        a2.plot(x, _series(windows, arm, "train_rows_per_s"), marker="o", ms=3, label=arm)
    a2.set(title="Training throughput", xlabel="window", ylabel="rows/s")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend()
    made.append(("Search time and throughput", _save(fig, out / "search_throughput.png")))
    return made


def state_summary(state_dir: Path) -> dict:
    """summary.json's header, truth and totals over every window of the state dir's history log
    (summary.json itself holds a recent span only)."""
    import json

    from dimstream.ops.history import read_log, summary

    recent = json.loads((Path(state_dir) / "summary.json").read_text())
    windows = read_log(state_dir) or recent["windows"]
    header = {k: v for k, v in recent.items() if k not in ("windows", "totals", "truth", "reallocations")}
    return summary(header, windows, recent.get("totals"), recent.get("truth"))


def write_report(summary: dict, out: Path) -> Path:
    from html import escape

    from dimstream.ops.verdict import format_verdict, verdict

    out.mkdir(parents=True, exist_ok=True)
    pngs = report_pngs(summary, out)
    text = format_verdict(verdict(summary))
    windows = summary.get("windows", [])
    rows = ""
    if windows:
        last = windows[-1]
        for arm, m in last["arms"].items():
            d = m.get("auc_diff_vs_control")
            ci = f"{d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if d else "—"
            rows += (
                f"<tr><td>{arm}</td><td>{m.get('auc', float('nan')):.4f}</td><td>{m.get('logloss', float('nan')):.4f}"
                f"</td><td>{m['embedding_params']:,}</td><td>{ci}</td></tr>"
            )
    html = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>dimstream report</title>"
        f"<style>body{{font-family:sans-serif;max-width:1400px;margin:auto}}td,th{{padding:4px 10px}}</style>"
        f"</head><body><h1>dimstream report</h1><p>source {summary.get('source')}, model {summary.get('model')}, "
        f"{len(windows)} windows</p><h2>Verdict</h2><pre>{escape(text)}</pre>"
        f"<h2>Last window</h2><table border=1><tr><th>arm</th><th>AUC</th>"
        f"<th>log-loss</th><th>embedding params</th><th>AUC - control [95% CI]</th></tr>{rows}</table>"
        + "".join(f"<h2>{t}</h2><img src='{f}' alt='{t}'>" for t, f in pngs)
        + "</body></html>"
    )
    (out / "index.html").write_text(html)
    return out / "index.html"
