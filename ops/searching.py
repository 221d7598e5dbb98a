"""The dimension search inside the daemon: plans from the cron job, searches of its own.

`DaemonSearch(runner)` is called by the window loop twice per window:
  before_training: with `field_check_rows` > 0, a search window's rows are first used, before
     any arm trains on them, for the held-out field check (search/fieldcheck.py): at that
     moment the control has not seen them. Successive checks are averaged (search/policy.py);
     the fields the average drops get no columns in that window's allocation.
  after_training (before the checkpoint):
  1. a pending plan written by `dimstream search` (STATE/plans/pending.json) is claimed by an
     atomic rename and validated (schema, budget, widths); a bad plan is logged in one line,
     counted, moved to plans/rejected/<window>.json, and the previous allocation stays. A valid
     plan's scores go through the same policy as the daemon's own searches (moving average,
     gain gate): it is archived as plans/applied/<window>.json if the slim arm was re-shaped by
     it, or plans/kept/<window>.json if the gate kept the incumbent; either way with the
     policy's "decision" (gain, reason) added to the archived JSON (a plan the gate lets through
     but whose allocation the slim arm already has is applied without a re-shape). A claimed
     plan a dead daemon left behind (.claimed-<pid>.json) is rejected, never retried, as
     plans/rejected/<window>.stale-<n>.json;
  2. every `search_every` windows the daemon runs the search itself (any registered method,
     search/registry.py) on the control arm over the window's rows, and the policy decides
     whether the slim arm is re-shaped (models/realloc.py).
The policy's state is `state_dict()`, checkpointed by the runner.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from dimstream.models.arm import ArmSpec
from dimstream.models.realloc import reallocate
from dimstream.search import registry
from dimstream.search.budget import Budget
from dimstream.search.fieldcheck import check_fields
from dimstream.search.plan import Plan, PlanError, read_plan, validate_plan
from dimstream.search.policy import AllocationPolicy, Decision
from dimstream.stream.atomic import write_bytes

log = logging.getLogger("dimstream.search")
FIELD_CHECK_FILE = "field_check.json"  # the daemon's latest held-out field check, in the state dir


def plans_dir(state_dir: Path) -> Path:
    d = Path(state_dir) / "plans"
    d.mkdir(parents=True, exist_ok=True)
    return d


class DaemonSearch:
    """The search of one runner. Uses of the runner: cfg, schema, state_dir, metrics, arm(name),
    replace_arm(arm), build_arm(spec); nothing else, and it sets nothing on it."""

    def __init__(self, runner):
        self.runner = runner
        cfg = runner.cfg
        self.policy = AllocationPolicy(kappa=cfg.budget, decay=cfg.saliency_decay, min_gain=cfg.realloc_min_gain)
        self.method = registry.build(cfg.search, rows=cfg.search_rows) if cfg.search != "none" else None
        self.check = None  # this window's averaged field check, for its search

    # --- the runner's calls ---
    def before_training(self, window, record) -> None:
        """The held-out field check of the control on the window's most recent
        `field_check_rows` rows, averaged with the earlier ones, kept for the search."""
        self.check = None
        cfg = self.runner.cfg
        if cfg.field_check_rows <= 0 or not self._due(record.index) or len(window.batch) < 2:
            return
        batch = window.batch
        shot = check_fields(
            self.runner.arm("control"), batch.slice(max(0, len(batch) - cfg.field_check_rows), len(batch))
        )
        self.runner.metrics.search_duration.labels("field_check").observe(shot.seconds)
        check = self.policy.average_check(shot)
        for f, keep in check.keep.items():
            self.runner.metrics.field_check_keep.labels(f).set(int(keep))
        record.field_check = {
            "rows": shot.rows,
            "seconds": shot.seconds,
            "z": check.z,
            "dropped": check.dropped,
            "delta": check.delta,
            "stderr": check.stderr,
            "this_window": {"delta": shot.delta, "stderr": shot.stderr},
        }
        if not any(check.keep.values()):  # e.g. a control that has not learnt anything yet
            record.field_check["ignored"] = "no field passed"
            log.warning("field check on %d rows: no field passed; this search allocates without it", shot.rows)
            return
        self.check = check
        # for `dimstream search` (its recent rows are trained rows: it cannot check fields itself)
        write_bytes(
            Path(self.runner.state_dir) / FIELD_CHECK_FILE,
            json.dumps(check.to_dict() | {"window": record.index}).encode(),
        )
        log.info(
            "field check on %d held-out rows in %.1fs: %d fields carry nothing (%s)",
            shot.rows,
            shot.seconds,
            len(check.dropped),
            ", ".join(check.dropped) or "none",
        )

    def after_training(self, window, record) -> None:
        """A pending plan, then the due search; each through the policy."""
        self._take_pending_plan(record)
        if not self._due(record.index) or len(window.batch) == 0:
            return
        control = self.runner.arm("control")
        budget = Budget("params", kappa=self.runner.cfg.budget)
        result = self.method.run(control, window.batch, budget, field_check=self.check)
        self._observe(result.method, result.duration_seconds)
        record.search = {
            "method": result.method,
            "seconds": result.duration_seconds,
            "budget_asked": result.budget_asked,
            "budget_reached": result.budget_reached,
            "rows": result.rows_used,
        }
        keep = self.check.keep if self.check is not None else None
        decision = self._decide(result, keep, self.method.min_score)
        record.search["gain_over_current"] = decision.to_dict()["gain"]
        if not decision.reshape:
            log.info("slim arm kept after the %s search: %s", result.method, decision.reason)
            return
        self._reshape(decision, "daemon", result.method, record)

    def state_dict(self) -> dict:
        return self.policy.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.policy.load_state_dict(state)

    # --- parts ---
    def _due(self, index: int) -> bool:
        cfg = self.runner.cfg
        return self.method is not None and cfg.search_every > 0 and (index + 1) % cfg.search_every == 0

    def _observe(self, method: str, seconds: float) -> None:
        self.runner.metrics.search_duration.labels(method).observe(seconds)
        self.runner.metrics.search_last_success.labels(method).set(time.time())

    def _incumbent(self) -> dict[str, list[int]]:
        spec = self.runner.arm("slim").spec
        return {f: spec.column_ids[f][: spec.dims[f]] for f in spec.dims}

    def _decide(self, proposal, keep: dict[str, bool] | None, min_score: float | None) -> Decision:
        return self.policy.decide(
            proposal,
            self.runner.arm("control").dims,
            self.runner.schema.num_embeddings,
            self._incumbent(),
            keep=keep,
            min_score=min_score,
        )

    def _reshape(self, decision: Decision, source: str, method: str, record) -> bool:
        """Re-shape the slim arm to the decision; False if it already has that allocation."""
        runner, fields = self.runner, self.runner.schema.feature_names
        slim = runner.arm("slim")
        spec = ArmSpec(
            "slim",
            {f: int(decision.dims.get(f, 0)) for f in fields},
            {f: sorted(int(j) for j in decision.kept_columns.get(f, [])) for f in fields},
        )
        if spec.dims == slim.spec.dims and all(
            spec.column_ids[f] == slim.spec.column_ids[f][: spec.dims[f]] for f in fields
        ):
            return False  # an allocation equal to the current one changes nothing
        runner.replace_arm(reallocate(slim, runner.arm("control"), spec, runner.build_arm))
        runner.metrics.reallocations.labels("slim").inc()
        params = runner.arm("slim").embedding_params
        record.reallocation = {"source": source, "method": method, "dims": spec.dims, "embedding_params": params}
        log.info("slim arm re-allocated by %s (%s): %s params", source, method, f"{params:,}")
        return True

    def _take_pending_plan(self, record) -> None:
        d = plans_dir(self.runner.state_dir)
        self._reject_stale_claims(d, record.index)
        claimed = d / f".claimed-{os.getpid()}.json"
        try:
            os.rename(d / "pending.json", claimed)  # atomic: the cron may write a new pending.json meanwhile
        except FileNotFoundError:
            return
        try:
            plan = read_plan(claimed)
            validate_plan(
                plan,
                self.runner.schema.fingerprint(),
                self.runner.schema.num_embeddings,
                self.runner.arm("control").dims,
                self.runner.cfg.budget,
            )
        except PlanError as e:
            self._archive(claimed, "rejected", record.index)
            record.plan_rejected = str(e)
            log.error("plan rejected (%s); the slim arm keeps its allocation", e)
            return
        decision = self._decide(plan, _plan_keep(plan), _min_score(plan.method))
        if decision.reshape:
            self._reshape(decision, "plan", plan.method, record)
        else:
            log.info("plan of %s kept out, the slim arm keeps its allocation: %s", plan.created_at, decision.reason)
        self._archive(claimed, "applied" if decision.reshape else "kept", record.index, plan, decision)
        self._observe(plan.method, plan.duration_seconds)

    def _reject_stale_claims(self, d: Path, index: int) -> None:
        """A plan claimed by a daemon that died before archiving it (one daemon runs per state
        dir, and it archives every plan it claims before going on): rejected, never retried, as
        it may be what killed that daemon."""
        for n, stale in enumerate(sorted(d.glob(".claimed-*.json"))):
            dest = d / "rejected"
            dest.mkdir(exist_ok=True)
            os.replace(stale, dest / f"{index:06d}.stale-{n}.json")
            self.runner.metrics.plans.labels("rejected").inc()
            log.error("plan %s was claimed by a daemon that died before archiving it: rejected", stale.name)

    def _archive(
        self, claimed: Path, outcome: str, index: int, plan: Plan | None = None, decision: Decision | None = None
    ) -> None:
        """plans/<outcome>/<window>.json: the claimed file, with the policy's decision if any."""
        dest = plans_dir(self.runner.state_dir) / outcome
        dest.mkdir(exist_ok=True)
        if decision is not None:
            write_bytes(
                dest / f"{index:06d}.json",
                json.dumps(plan.to_dict() | {"decision": decision.to_dict()}, indent=1).encode(),
            )
            claimed.unlink()
        else:
            os.replace(claimed, dest / f"{index:06d}.json")
        self.runner.metrics.plans.labels(outcome).inc()


def _plan_keep(plan: Plan) -> dict[str, bool] | None:
    """The field check the plan's allocation followed, as a keep rule (None: none)."""
    if not plan.field_check:
        return None
    dropped = set(plan.field_check.get("dropped", []))
    return {f: f not in dropped for f in plan.dims}


def _min_score(method: str) -> float | None:
    """The floor of the plan's method; None for a method this daemon does not know."""
    try:
        return registry.lookup(method).min_score
    except ValueError:
        return None
