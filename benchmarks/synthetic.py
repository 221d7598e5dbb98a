"""Rows per second of the synthetic stream (the embedded default), generation only.

Writes benchmarks/results/synthetic.json.  Run: .venv/bin/python benchmarks/synthetic.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dimstream.stream.synthetic import SyntheticSource

ROOT = Path(__file__).resolve().parents[1]

WINDOWS = 6


def main() -> None:
    src = SyntheticSource(seed=0)
    src.window_table(0)  # warm-up (first-touch of the latent tables)
    t0 = time.perf_counter()
    for w in range(1, WINDOWS + 1):
        src.window_table(w)
    rate = WINDOWS * src.rows_per_window / (time.perf_counter() - t0)
    result = {
        "what": "SyntheticSource default (26 fields), 50,000-row windows, generation only",
        "rows_per_s": rate,
        "checks": {"at_least_200k_rows_per_s": rate >= 200_000},
    }
    out = ROOT / "benchmarks" / "results" / "synthetic.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
