"""The dimension search inside the daemon: plans from the cron job, searches of its own.

At every window boundary (after training, before the checkpoint):
1. a pending plan written by `dimstream search` (STATE/plans/pending.json) is claimed by an
   atomic rename, validated (schema, budget, widths) and applied to the slim arm, then archived
   as plans/applied/<window>.json; a bad plan is logged in one line, counted, moved to
   plans/rejected/<window>.json, and the previous allocation stays;
2. every `search_every` windows the daemon runs the search itself (SSEDS or HAM) on the control
   arm over the window's rows and re-shapes the slim arm (models/realloc.py).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from models.arm import ArmSpec
from models.realloc import reallocate
from ops import metrics
from search.budget import Budget, SearchResult
from search.plan import Plan, PlanError, read_plan, validate_plan

log = logging.getLogger("dimstream.search")


def plans_dir(state_dir: Path) -> Path:
    d = Path(state_dir) / "plans"
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_search(method: str, control, batch, kappa: float, rows: int) -> SearchResult:
    """One search on `control` with the rows of `batch` (most recent last)."""
    budget = Budget("params", kappa=kappa)
    if method == "sseds":
        from search.sseds import sseds_search
        result = sseds_search(control, batch, budget, rows=rows)
    elif method == "ham":
        from search.ham import ham_search, split_holdout
        train, val = split_holdout(batch)
        result = ham_search(control, train, val, budget)
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


def search_hook(runner, window, record: dict) -> None:
    cfg = runner.cfg
    if "slim" not in cfg.arms:
        return
    take_pending_plan(runner, record)
    due = cfg.search != "none" and cfg.search_every > 0 and (record["index"] + 1) % cfg.search_every == 0
    if not due or len(window.batch) == 0:
        return
    result = run_search(cfg.search, runner.arm("control"), window.batch, cfg.budget, cfg.search_rows)
    record["search"] = {"method": result.method, "seconds": result.duration_seconds,
                        "budget_asked": result.budget_asked, "budget_reached": result.budget_reached,
                        "rows": result.rows_used}
    apply_allocation(runner, result.dims, result.kept_columns, "daemon", result.method, record)


def install(runner) -> None:
    runner.hooks.append(search_hook)
