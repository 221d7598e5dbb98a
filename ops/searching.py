"""The dimension search inside the daemon: plans from the cron job, searches of its own.

At every window boundary (after training, before the checkpoint):
1. a pending plan written by `dimstream search` (STATE/plans/pending.json) is claimed by an
   atomic rename, validated (schema, budget, widths) and applied to the slim arm, then archived
   as plans/applied/<window>.json; a bad plan is logged in one line, counted, moved to
   plans/rejected/<window>.json, and the previous allocation stays;
2. every `search_every` windows the daemon runs the search itself (SSEDS or HAM) on the control
   arm over the window's rows and re-shapes the slim arm (models/realloc.py).
With `field_check_rows` > 0, a search window's rows are first used, before any arm trains on
them, for the held-out field check (search/fieldcheck.py): at that moment the control has not
seen them. The fields it drops get no columns in that window's allocation.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from dimstream.models.arm import ArmSpec
from dimstream.models.realloc import reallocate
from dimstream.ops import metrics
from dimstream.search.budget import Budget, SearchResult, allocate, params_of, relative_gain
from dimstream.search.fieldcheck import FieldCheck, check_fields
from dimstream.search.plan import Plan, PlanError, read_plan, validate_plan
from dimstream.stream.atomic import write_bytes

log = logging.getLogger("dimstream.search")
FIELD_CHECK_FILE = "field_check.json"  # the daemon's latest held-out field check, in the state dir


def plans_dir(state_dir: Path) -> Path:
    d = Path(state_dir) / "plans"
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_search(method: str, control, batch, kappa: float, rows: int,
               field_check: FieldCheck | None = None) -> SearchResult:
    """One search on `control` with the rows of `batch` (most recent last)."""
    budget = Budget("params", kappa=kappa)
    if method == "sseds":
        from dimstream.search.sseds import sseds_search
        result = sseds_search(control, batch, budget, rows=rows, field_check=field_check)
    elif method == "ham":
        from dimstream.search.ham import ham_search, split_holdout
        train, val = split_holdout(batch)
        result = ham_search(control, train, val, budget, field_check=field_check)
    else:
        raise ValueError(f"unknown search method {method!r}")
    metrics.SEARCH_DURATION.labels(method).observe(result.duration_seconds)
    metrics.SEARCH_LAST_SUCCESS.labels(method).set(time.time())
    return result


def apply_allocation(runner, dims: dict, kept: dict, source: str, method: str, record: dict) -> bool:
    """Re-shape the slim arm to `dims`/`kept`; False if it already has that allocation."""
    slim = runner.arm("slim")
    fields = runner.schema.feature_names
    spec = ArmSpec("slim", {f: int(dims.get(f, 0)) for f in fields},
                   {f: sorted(int(j) for j in kept.get(f, [])) for f in fields})
    if spec.dims == slim.spec.dims and all(spec.column_ids[f] == slim.spec.column_ids[f][: spec.dims[f]]
                                           for f in fields):
        return False  # an allocation equal to the current one changes nothing
    runner.replace_arm(reallocate(slim, runner.arm("control"), spec, runner.build_arm))
    metrics.REALLOCATIONS.labels("slim").inc()
    record["reallocation"] = {"source": source, "method": method, "dims": spec.dims,
                              "embedding_params": runner.arm("slim").embedding_params}
    log.info("slim arm re-allocated by %s (%s): %s params", source, method,
             f"{runner.arm('slim').embedding_params:,}")
    return True


def take_pending_plan(runner, record: dict) -> None:
    d = plans_dir(runner.state_dir)
    pending = d / "pending.json"
    claimed = d / f".claimed-{os.getpid()}.json"
    try:
        os.rename(pending, claimed)  # atomic: the cron may write a new pending.json meanwhile
    except FileNotFoundError:
        return
    index = record["index"]
    try:
        plan = read_plan(claimed)
        control = runner.arm("control")
        validate_plan(plan, runner.schema.fingerprint(), runner.schema.num_embeddings, control.dims,
                      runner.cfg.budget)
        apply_allocation(runner, plan.dims, plan.kept_columns, "plan", plan.method, record)
    except PlanError as e:
        (d / "rejected").mkdir(exist_ok=True)
        os.replace(claimed, d / "rejected" / f"{index:06d}.json")
        metrics.PLANS.labels("rejected").inc()
        record["plan_rejected"] = str(e)
        log.error("plan rejected (%s); the slim arm keeps its allocation", e)
        return
    (d / "applied").mkdir(exist_ok=True)
    os.replace(claimed, d / "applied" / f"{index:06d}.json")
    metrics.PLANS.labels("applied").inc()
    metrics.SEARCH_DURATION.labels(plan.method).observe(plan.duration_seconds)
    metrics.SEARCH_LAST_SUCCESS.labels(plan.method).set(time.time())


def search_due(cfg, index: int) -> bool:
    return cfg.search != "none" and cfg.search_every > 0 and (index + 1) % cfg.search_every == 0


def field_check_hook(runner, window, record: dict) -> None:
    """Before any arm trains on a search window: the held-out field check of the control on
    the window's most recent `field_check_rows` rows, averaged with the earlier checks
    (`averaged_check`), kept for the search after training."""
    runner.field_check = None
    cfg = runner.cfg
    if cfg.field_check_rows <= 0 or not search_due(cfg, record["index"]) or len(window.batch) < 2:
        return
    batch = window.batch
    rows = batch.slice(max(0, len(batch) - cfg.field_check_rows), len(batch))
    shot = check_fields(runner.arm("control"), rows)
    metrics.SEARCH_DURATION.labels("field_check").observe(shot.seconds)
    check = averaged_check(runner, shot)
    for f, keep in check.keep.items():
        metrics.FIELD_CHECK_KEEP.labels(f).set(int(keep))
    record["field_check"] = {"rows": shot.rows, "seconds": shot.seconds, "z": check.z,
                             "dropped": check.dropped, "delta": check.delta, "stderr": check.stderr,
                             "this_window": {"delta": shot.delta, "stderr": shot.stderr}}
    if not any(check.keep.values()):  # e.g. a control that has not learnt anything yet
        record["field_check"]["ignored"] = "no field passed"
        log.warning("field check on %d rows: no field passed; this search allocates without it", shot.rows)
        return
    runner.field_check = check
    # for `dimstream search` (its recent rows are trained rows: it cannot check fields itself)
    write_bytes(Path(runner.state_dir) / FIELD_CHECK_FILE,
                json.dumps(check.to_dict() | {"window": record["index"]}).encode())
    log.info("field check on %d held-out rows in %.1fs: %d fields carry nothing (%s)", shot.rows,
             shot.seconds, len(check.dropped), ", ".join(check.dropped) or "none")


def averaged_check(runner, shot: FieldCheck) -> FieldCheck:
    """The checks of successive search windows averaged like the saliency (decay
    `saliency_decay`): delta <- d * delta + (1 - d) * delta_new and, the windows' rows being
    independent, var <- d^2 * var + (1 - d)^2 * var_new; keep = delta > z * sqrt(var). One window's
    check flips on fields near its threshold, and every flip re-shapes the slim arm; the
    average decides on all the evidence so far. Checkpointed with the arms (runner.extra)."""
    d = runner.cfg.saliency_decay
    prev = runner.extra.get("field_check_avg")
    if d == 0 or not prev or set(prev["delta"]) != set(shot.delta):
        delta, var = dict(shot.delta), {f: s * s for f, s in shot.stderr.items()}
    else:
        delta = {f: d * prev["delta"][f] + (1 - d) * shot.delta[f] for f in shot.delta}
        var = {f: d * d * prev["var"][f] + (1 - d) ** 2 * shot.stderr[f] ** 2 for f in shot.delta}
    runner.extra["field_check_avg"] = {"delta": delta, "var": var}
    stderr = {f: float(np.sqrt(v)) for f, v in var.items()}
    return FieldCheck.decide(delta, stderr, shot.z, shot.rows, shot.seconds)


def search_hook(runner, window, record: dict) -> None:
    cfg = runner.cfg
    if "slim" not in cfg.arms:
        return
    take_pending_plan(runner, record)
    if not search_due(cfg, record["index"]) or len(window.batch) == 0:
        return
    control = runner.arm("control")
    check = runner.field_check
    result = run_search(cfg.search, control, window.batch, cfg.budget, cfg.search_rows, check)
    record["search"] = {"method": result.method, "seconds": result.duration_seconds,
                        "budget_asked": result.budget_asked, "budget_reached": result.budget_reached,
                        "rows": result.rows_used}
    scores, dims, kept = smoothed_allocation(runner, result, control, check)
    slim = runner.arm("slim")
    current = {f: slim.spec.column_ids[f][: slim.spec.dims[f]] for f in slim.spec.dims}
    over_budget = params_of(slim.spec.dims, runner.schema.num_embeddings) > result.budget_asked
    if check is not None:  # a field found to carry nothing is worth nothing to the incumbent either
        scores = {f: v * 0.0 if not check.keep.get(f, True) else v for f, v in scores.items()}
    gain = relative_gain(scores, kept, current)
    record["search"]["gain_over_current"] = gain if gain != float("inf") else None
    if not over_budget and gain < cfg.realloc_min_gain:  # before its first cut slim is control-sized
        log.info("slim arm kept: the searched allocation scores %.1f%% above its current one (< %.1f%%)",
                 100 * gain, 100 * cfg.realloc_min_gain)
        return
    apply_allocation(runner, dims, kept, "daemon", result.method, record)


def smoothed_allocation(runner, result: SearchResult, control,
                        check: FieldCheck | None = None) -> tuple[dict, dict, dict]:
    """(scores, dims, kept columns) from an exponential moving average of the searches' column
    scores, s <- decay * s + (1 - decay) * s_new, re-allocated by the same rule (search/budget.py).

    One SSEDS shot on 8,192 rows ranks columns very differently from one window to the next
    (measured: the searched allocation scored 18-84% above the slim arm's current one at every
    hourly search of the synthetic stream, so the slim arm was re-shaped, and dipped, every
    hour); averaging the shots is the "more rows" the paper's single mini-batch lacks, at no
    extra search cost. decay 0 = the latest search alone."""
    decay = runner.cfg.saliency_decay
    new = {f: np.asarray(v, np.float64) for f, v in result.saliency.items()}
    prev = runner.extra.get("search_scores")  # checkpointed with the arms: survives a restart
    if decay > 0 and prev and prev.get("method") == result.method and set(prev["scores"]) == set(new):
        new = {f: decay * np.asarray(prev["scores"][f]) + (1 - decay) * v for f, v in new.items()}
    runner.extra["search_scores"] = {"method": result.method, "scores": {f: v.tolist() for f, v in new.items()}}
    if decay == 0:
        return new, result.dims, result.kept_columns
    alloc = allocate(new, Budget("params", kappa=runner.cfg.budget), control.dims, runner.schema.num_embeddings,
                     min_score=0.0 if result.method == "ham" else None,
                     keep_fields=check.keep if check is not None else None)
    return new, alloc.dims, alloc.kept_columns



def install(runner) -> None:
    runner.field_check = None
    runner.pre_hooks.append(field_check_hook)
    runner.hooks.append(search_hook)
