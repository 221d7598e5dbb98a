"""`dimstream` command line: run (the daemon), search (the hourly cron job), replay, export, ...

Bad options or config give one clear line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dimstream.ops.config import ConfigError, RunConfig

log = logging.getLogger("dimstream")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"dimstream: error: {message}\n")
        sys.exit(2)


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train on a stream (the daemon)")
    p.set_defaults(func=cmd_run)
    p.add_argument("--config", type=Path, help="TOML file with the same keys as the options")
    p.add_argument(
        "--source", help="synthetic | files:DIR | ml-100k:DIR | criteo:FILE | avazu:FILE | kafka://HOST:PORT/TOPIC"
    )
    p.add_argument("--model", choices=["deepfm", "wdl", "fm", "dcnv2"])
    p.add_argument("--windows", type=int, help="total windows to have processed (default 24)")
    p.add_argument("--window", help="window length: 1h (default), 1d, 30m, ...")
    p.add_argument("--state-dir", type=Path, help="checkpoints, summary, dead letters (default ./dimstream-state)")
    p.add_argument("--metrics-addr", help="HOST:PORT for /metrics, /healthz, /readyz (port 0: any free port)")
    p.add_argument("--seed", type=int)
    p.add_argument("--arms", help="comma-separated: control,slim,uniform")
    p.add_argument(
        "--search",
        metavar="METHOD",
        help="dimension search: a registered method (sseds, ham, ...) or none; checked by the config",
    )
    p.add_argument("--budget", type=float, help="kappa: slim params <= kappa x control params (default 0.25)")
    p.add_argument("--search-every", type=int, help="windows between searches; 0 = only apply cron plans")
    p.add_argument("--search-warmup", type=int, help="windows the control trains before the first search")
    p.add_argument(
        "--budget-fill",
        action=argparse.BooleanOptionalAction,
        help="spend what the search's ranking leaves of the budget on the next blocks that fit (on)",
    )
    p.add_argument("--control-dim", type=int, help="uniform width of the control arm (multiple of 4)")
    p.add_argument("--rows-per-window", type=int, help="synthetic source: rows per window (default 50000)")
    p.add_argument("--grace-seconds", type=float, help="on SIGTERM: finish the window if it fits, else abandon it (30)")
    p.add_argument("--allowed-lateness", type=int, help="seconds a row may arrive after its window's end (0)")
    p.add_argument(
        "--max-event-time-skew",
        type=int,
        help="seconds a row may lie ahead of the stream before it is dead-lettered as bad_event_time (86400; 0: off)",
    )
    p.add_argument("--idle-timeout", type=float, help="close the open window after this many seconds without data")
    p.add_argument("--export-dir", type=Path, help="publish the slim arm for serving after every window")
    p.add_argument("--base-every", type=int, help="with --export-dir: a full base every N windows, deltas between (24)")
    p.add_argument("--linger-seconds", type=float, help="keep serving /metrics this long after the run ends")
    p.add_argument(
        "--realloc-min-gain",
        type=float,
        help="re-shape the slim arm only if the allocation scores this fraction above its current one (0: off)",
    )
    p.add_argument(
        "--saliency-decay",
        type=float,
        help="moving average of the searches' column scores, s <- decay*s + (1-decay)*s_new (0.8; 0 = latest only)",
    )
    p.add_argument(
        "--field-check-rows",
        type=int,
        help="before a search window trains, check each field on this many of its rows (held out then; 8192); 0 = off",
    )
    p.add_argument(
        "--field-check-z",
        type=float,
        help="the field check keeps a field iff its held-out loss increase > Z standard errors (0.5; 0: any increase)",
    )
    p.add_argument(
        "--field-check-min-rows",
        type=int,
        help="the averaged field check drops no field before its effective held-out rows reach N (50000; 0: at once)",
    )
    p.add_argument(
        "--tiers",
        type=int,
        metavar="L",
        help="with --search autosrh: L frequency tiers per field, one slim table per (field, tier) (1: field level)",
    )
    p.add_argument(
        "--noise-floor",
        type=float,
        metavar="K",
        help="SSEDS: a field whose saliency is within K standard deviations of its noise null gets 0 (off)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="dense part in bf16 autocast (fp32 master weights); auto: bf16 where the hardware has it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_config(args) -> RunConfig:
    keys = [
        "source",
        "model",
        "windows",
        "window",
        "state_dir",
        "metrics_addr",
        "seed",
        "arms",
        "search",
        "budget",
        "search_every",
        "search_warmup",
        "budget_fill",
        "control_dim",
        "rows_per_window",
        "grace_seconds",
        "linger_seconds",
        "export_dir",
        "base_every",
        "allowed_lateness",
        "max_event_time_skew",
        "idle_timeout",
        "realloc_min_gain",
        "saliency_decay",
        "field_check_rows",
        "field_check_z",
        "field_check_min_rows",
        "noise_floor",
        "tiers",
        "precision",
    ]
    given = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.no_progress:
        given["progress"] = False
    if args.config is not None:
        return RunConfig.from_toml(args.config, given)
    return RunConfig.from_mapping(given)


def cmd_run(args) -> int:
    cfg = _run_config(args)
    from dimstream.ops.daemon import Runner  # heavy imports only once the options are valid

    runner = Runner.from_config(cfg)
    summary = runner.run()
    done = len(summary["windows"])
    if runner.rank0:  # under torchrun, one line from rank 0
        print(f"dimstream: {done} windows in {cfg.state_dir} (summary.json, summary.png)")
    if runner.rank0 and done:
        _verdict_and_report(cfg.state_dir)
    return 0


def _verdict_and_report(state_dir: Path) -> None:
    """The A/B verdict over the whole history's second half, and the HTML report beside it."""
    from dimstream.ops.report import state_summary, write_report
    from dimstream.ops.verdict import format_verdict, verdict

    full = state_summary(state_dir)
    print(format_verdict(verdict(full)))
    print(f"dimstream report: {write_report(full, Path(state_dir) / 'report')}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dimstream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _run_parser(sub)
    for extra in _extra_commands():
        extra(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) if hasattr(args, "func") else cmd_run(args)
    except ConfigError as e:
        sys.stderr.write(f"dimstream: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130


def _extra_commands():
    """Sub-commands defined in their own modules (search, replay, export, ...)."""
    import importlib
    import importlib.util

    mods = ("dimstream.ops.search_cli", "dimstream.ops.replay_cli", "dimstream.ops.export", "dimstream.ops.report_cli")
    mods += ("dimstream.ops.plan", "dimstream.ops.serve")
    return [importlib.import_module(m).register for m in mods if importlib.util.find_spec(m) is not None]


if __name__ == "__main__":
    sys.exit(main())
