"""`dimstream report`: an HTML page with PNG plots of a state dir's whole history log."""

from __future__ import annotations

import json
from pathlib import Path

from dimstream.ops.config import ConfigError


def register(sub) -> None:
    p = sub.add_parser("report", help="write an HTML report with plots of the metrics history")
    p.add_argument("--state-dir", type=Path, default=Path("dimstream-state"))
    p.add_argument("--out", type=Path, help="directory (default STATE_DIR/report)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from dimstream.ops.history import read_log, summary
    from dimstream.ops.report import write_report

    path = Path(args.state_dir) / "summary.json"
    try:
        recent = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    # the whole run: every window of the history log (summary.json holds a recent span only)
    windows = read_log(args.state_dir) or recent["windows"]
    header = {k: v for k, v in recent.items() if k not in ("windows", "totals", "truth", "reallocations")}
    full = summary(header, windows, recent.get("totals"), recent.get("truth"))
    page = write_report(full, args.out or Path(args.state_dir) / "report")
    print(f"dimstream report: {page}")
    return 0
