"""`dimstream search`: the hourly re-pruning job (cron, systemd timer or Kubernetes CronJob).

Reads the daemon's latest checkpoint (the control arm) and its recent-rows buffer, runs the
search and writes STATE/plans/pending.json atomically; the daemon applies it at its next window
boundary. A lock file keeps two searches from running at once; the daemon claims a plan by an
atomic rename, so cron and daemon never see each other's partial files. Killing the job
mid-way leaves no partial plan (only a temporary file that the next run removes).
If the daemon runs the held-out field check (--field-check-rows), its latest result
(STATE/field_check.json) is applied to the allocation too: the job's recent rows are rows the
checkpoint has trained on, on which the check cannot be made; `--field-check-z Z` re-decides
that check at Z standard errors (its deltas and standard errors are in the file).
`--tiers L`, `--noise-floor K` and `--field-check-z Z` mean what they mean to the daemon
(`dimstream run`) and are validated by the same rules (ops/config.py `RunConfig`): tiers > 1
only with autosrh, a noise floor only with sseds. With `--tiers L > 1` the ids' tiers come from
the stream-long row counts the daemon checkpoints when it runs with --tiers (search/counts.py),
else from the recent rows' counts; the plan then carries the (field, tier) allocation and the
ids' tiers (search/tierplan.py), and the daemon builds the slim arm's (field, tier) tables from it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import sys
import time
from pathlib import Path

import pyarrow as pa

from dimstream.ops.config import ConfigError, RunConfig

log = logging.getLogger("dimstream.search")


class _Registered:
    """The registered search methods as argparse choices, read only when a value is checked:
    building the parser (every `dimstream` command does) must not import the searches."""

    def __contains__(self, name) -> bool:
        from dimstream.search import registry

        return name in registry.names()

    def __iter__(self):
        from dimstream.search import registry

        return iter(registry.names())


def register(sub) -> None:
    p = sub.add_parser("search", help="the re-pruning job: search on the latest checkpoint, write a plan")
    p.add_argument("--state-dir", type=Path, default=Path("dimstream-state"))
    p.add_argument(
        "--method",
        "--search",
        dest="method",
        choices=_Registered(),
        metavar="METHOD",
        help="a registered search method (search/registry.py); default: the registry's default method",
    )
    p.add_argument("--budget", type=float, default=0.25, help="kappa (default 0.25)")
    p.add_argument(
        "--budget-fill",
        action=argparse.BooleanOptionalAction,
        default=RunConfig.budget_fill,
        help="spend what the ranking leaves on the next blocks that fit, as the daemon does (on)",
    )
    p.add_argument(
        "--rows",
        type=int,
        default=8192,
        help="recent rows to score on, for a method that takes a row count (default 8192)",
    )
    p.add_argument(
        "--field-check",
        choices=["auto", "off"],
        default="auto",
        help="auto: allocate after the daemon's latest held-out field check "
        "(STATE/field_check.json, written with --field-check-rows) if there is one",
    )
    p.add_argument(
        "--field-check-z",
        type=float,
        metavar="Z",
        help="re-decide the daemon's field check: keep a field iff its held-out loss increase > Z standard "
        "errors (default: the Z the daemon checked at)",
    )
    p.add_argument(
        "--tiers",
        type=int,
        default=1,
        metavar="L",
        help="with --method autosrh: L frequency tiers per field, one slim table per (field, tier) (1: field level)",
    )
    p.add_argument(
        "--noise-floor",
        type=float,
        metavar="K",
        help="SSEDS: a field whose saliency is within K standard deviations of its noise null gets 0 (off)",
    )
    p.set_defaults(func=cmd_search)


def search_options(args, name: str) -> RunConfig:
    """The job's method knobs validated as the daemon's (the same ConfigError, exit 2)."""
    z = args.field_check_z if args.field_check_z is not None else RunConfig.field_check_z
    return RunConfig(search=name, budget=args.budget, tiers=args.tiers, noise_floor=args.noise_floor, field_check_z=z)


def load_control(state_dir: Path):
    """(control Arm, schema, checkpoint path, the checkpoint's extra state) from the latest
    complete checkpoint (read only: the job runs beside the daemon and never takes its
    state-dir lock)."""
    from dimstream.ops import checkpoint

    ckpt = checkpoint.latest(state_dir)
    if ckpt is None:
        raise ConfigError(f"no checkpoint in {state_dir}: run the daemon first")
    try:
        restored = checkpoint.load_arms(ckpt, ["control"])
    except checkpoint.CheckpointError as e:
        raise ConfigError(str(e)) from None
    return restored.arms["control"], restored.schema, ckpt, restored.extra


def recent_rows(state_dir: Path, schema):
    from dimstream.stream.decode import Decoder
    from dimstream.stream.sources.files import read_ipc

    path = Path(state_dir) / "recent" / "rows.arrow"
    try:
        table = read_ipc(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise ConfigError(f"cannot read the recent rows {path}: {e}") from None
    return Decoder(schema).decode(table).batch


def stream_counts(extra: dict, schema) -> dict | None:
    """{field: [rows] counts} from the checkpoint's stream-long counts (the daemon ran with
    --tiers), or None (the search then counts the recent rows)."""
    from dimstream.search.counts import StreamCounts

    if "counts" not in extra:
        return None
    counts = StreamCounts.from_state(extra["counts"])
    return counts.counts() if counts.fits(schema.num_embeddings) else None


def latest_field_check(state_dir: Path, fields: list[str], z: float | None = None):
    """The daemon's latest held-out field check, or None if it has written none; with `z`,
    re-decided at z standard errors."""
    from dimstream.ops.searching import FIELD_CHECK_FILE
    from dimstream.search.fieldcheck import FieldCheck

    path = Path(state_dir) / FIELD_CHECK_FILE
    if not path.exists():
        return None
    try:
        check = FieldCheck.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"cannot use the field check {path}: {e}; delete it or pass --field-check off") from None
    if set(check.keep) != set(fields):
        raise ConfigError(
            f"the field check {path} is for other fields than the checkpoint's; delete it or pass --field-check off"
        )
    if z is not None:
        check = FieldCheck.decide(check.delta, check.stderr, z, check.rows, check.seconds, check.min_rows)
    return check


def cmd_search(args) -> int:
    from dimstream.ops.searching import SUPERNET_FILE, plans_dir
    from dimstream.search import registry
    from dimstream.search.budget import Budget
    from dimstream.search.plan import Plan, write_plan

    state = Path(args.state_dir)
    if not state.is_dir():
        raise ConfigError(f"{state} is not a state dir")
    if not 0 < args.budget <= 1:
        raise ConfigError("--budget (kappa) must be in (0, 1]")
    name = args.method or registry.default_name()
    opts = search_options(args, name)
    d = plans_dir(state)
    with open(d / ".search.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("dimstream search: another search is running; nothing to do", file=sys.stderr)
            return 0
        for stale in d.glob(".pending.json.*"):  # temporaries of a killed run
            stale.unlink(missing_ok=True)
        t0 = time.perf_counter()
        control, schema, ckpt, extra = load_control(state)
        batch = recent_rows(state, schema)
        z = args.field_check_z
        check = latest_field_check(state, control.feature_names, z) if args.field_check == "auto" else None
        # supernet_file: the daemon's AdaS&S supernet, for the method that takes it
        knobs = {"noise_floor": opts.noise_floor} | ({"tiers": opts.tiers} if opts.tiers > 1 else {})
        method = registry.build(name, rows=args.rows, supernet_file=state / SUPERNET_FILE, **knobs)
        if (why := method.unfit(batch)) is not None:
            raise ConfigError(
                f"the recent rows of {state} cannot be searched: {why}; run it again after another window"
            )
        counted = "recent rows"
        if opts.tiers > 1:
            method.counts = stream_counts(extra, schema)
            counted = "the stream" if method.counts is not None else counted
        budget = Budget("params", kappa=args.budget, fill=args.budget_fill)
        result = method.run(control, batch, budget, field_check=check)
        plan = Plan.from_result(result, schema.fingerprint(), ckpt.name)
        write_plan(d / "pending.json", plan)
    kept = sum(1 for v in plan.dims.values() if v)
    dropped = f", {len(check.dropped)} dropped by the field check" if check is not None else ""
    tiered = result.details.get("tiers")
    tiers = (
        f"; {opts.tiers} tiers counted on {counted}: {tiered['params']:,} params in (field, tier) tables"
        if tiered
        else ""
    )
    print(
        f"dimstream search: {result.method} on {ckpt.name}, {result.rows_used} rows: {kept} fields kept{dropped}, "
        f"{result.params:,} of {result.control_params:,} embedding params (kappa {args.budget}){tiers} "
        f"in {time.perf_counter() - t0:.1f}s -> {d / 'pending.json'}"
    )
    return 0
