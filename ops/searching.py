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
  3. under `--search adass` the AdaS&S supernet (models/supernet.py) trains on every window,
     test-then-train like an arm: its progressive AUC over the sampled subnets goes to the
     window's record ("supernet"), not to the A/B (it is no arm, and the control stays a
     plain model: training the control as the supernet would change the reference every arm
     is compared against). In a search window it first trains on all but the search's
     held-out last rows, the RL search (search/adass.py) scores subnets on those, then it
     trains on them. It is saved to STATE/supernet.pt after every window for `dimstream
     search --method adass` (separately from the checkpoint: a crash between the two trains
     it once more on a replayed window). A re-shape by AdaS&S starts the slim arm's granted
     columns from the supernet's first d columns (the head's column-tied parameters still
     come from the control; the supernet's transforms, eq. 7, have no place in the slim arm's
     head, which maps widths with the projections of SSEDS eq. 13).
  4. under `--tiers L > 1` every window's rows are counted first (`count_window`: np.bincount
     per field of the rows the ids look up, a managed field's through the control's vocabulary,
     its rows that changed owner forgotten) into stream-long counts (search/counts.py
     `StreamCounts`), which AutoSrh's search takes as its ids' counts (`AutoSrh.counts`) in place
     of the window's; they are checkpointed beside the arms (`checkpoint_extra`, the
     checkpoint's replicated blob) and resumed from it, so `dimstream search` reads them too.
The policy's state is `state_dict()`, checkpointed by the runner.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from dimstream.models.arm import ArmSpec
from dimstream.models.evaluation import window_metrics
from dimstream.models.realloc import reallocate
from dimstream.search import registry
from dimstream.search.budget import Budget
from dimstream.search.counts import StreamCounts
from dimstream.search.fieldcheck import check_fields
from dimstream.search.plan import Plan, PlanError, read_plan, validate_plan
from dimstream.search.policy import AllocationPolicy, Decision
from dimstream.search.tierplan import decode_tiers
from dimstream.stream.atomic import write_bytes

log = logging.getLogger("dimstream.search")
FIELD_CHECK_FILE = "field_check.json"  # the daemon's latest held-out field check, in the state dir
SUPERNET_FILE = "supernet.pt"  # --search adass: the daemon's supernet, for `dimstream search`


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
        self.policy = AllocationPolicy(
            cfg.budget, cfg.saliency_decay, cfg.realloc_min_gain, fill=cfg.budget_fill, decay_rows=cfg.search_rows
        )
        self.method = (
            registry.build(cfg.search, rows=cfg.search_rows, noise_floor=cfg.noise_floor, **_tier_knob(cfg))
            if cfg.search != "none"
            else None
        )
        self.check = None  # this window's averaged field check, for its search
        self._owed = False  # a due search a window had too few rows for (`_enough_rows`)
        self.supernet = None  # --search adass: the supernet trained on every window (lazily built)
        self.counts, self.owners = _resumed_counts(runner) if getattr(cfg, "tiers", 1) > 1 else (None, {})

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
            self.runner.arm("control"),
            batch.slice(max(0, len(batch) - cfg.field_check_rows), len(batch)),
            z=cfg.field_check_z,
            min_rows=getattr(cfg, "field_check_min_rows", 0),
        )
        self.runner.metrics.search_duration.labels("field_check").observe(shot.seconds)
        check = self.policy.average_check(shot)
        for f, keep in check.keep.items():
            self.runner.metrics.field_check_keep.labels(f).set(int(keep))
        record.field_check = {
            "rows": shot.rows,
            "pooled_rows": check.rows,  # the average's effective rows: below min_rows it drops nothing
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
        """A pending plan, then the due search; each through the policy. Under --search adass
        the supernet trains test-then-train on the window around it (`_supernet_window`)."""
        self.count_window(window.batch)
        self._take_pending_plan(record)
        due = self._enough_rows(self._owed or self._due(record.index), window.batch, record)
        if self._supernet_mode():
            self._supernet_window(window.batch, record, due)
        elif due:
            self._search(window.batch, record)

    def count_window(self, batch) -> None:
        """--tiers L > 1: the window's rows into the stream-long counts (module docstring, 4)."""
        if self.counts is None or not len(batch):
            return
        rows = looked_up_rows(self.runner.arm("control"), batch, self.owners, self.counts)
        self.counts.add(rows)

    def checkpoint_extra(self) -> dict | None:
        """What the checkpoint keeps beside the arms: the counts and the managed rows' owners."""
        if self.counts is None:
            return None
        return {"counts": self.counts.state_dict(), "owners": {f: torch.from_numpy(o) for f, o in self.owners.items()}}

    def _search(self, batch, record) -> None:
        control = self.runner.arm("control")
        if self.counts is not None and hasattr(self.method, "counts"):
            self.method.counts = self.counts.counts()
        budget = Budget("params", kappa=self.runner.cfg.budget, fill=self.runner.cfg.budget_fill)
        try:
            result = self.method.run(control, batch, budget, field_check=self.check)
        except Exception as e:  # noqa: BLE001 -- one failed search must not stop training (and every restart)
            self._failed(record, e)
            return
        self._observe(result.method, result.duration_seconds)
        record.search = {
            "method": result.method,
            "seconds": result.duration_seconds,
            "budget_asked": result.budget_asked,
            "budget_reached": result.budget_reached,
            "rows": result.rows_used,
        }
        if result.details.get("tiers") is not None and self.counts is not None:
            record.search["tier_counts_windows"] = self.counts.windows  # the tiers' counts span these windows
        keep = self.check.keep if self.check is not None else None
        decision = self._decide(result, keep, self.method.min_score, rows=result.rows_used)
        record.search["gain_over_current"] = decision.to_dict()["gain"]
        if not decision.reshape:
            log.info("slim arm kept after the %s search: %s", result.method, decision.reason)
            return
        self._reshape(decision, "daemon", result.method, record, result.details.get("tiers"))

    # --- the AdaS&S supernet (models/supernet.py): its own model, not an A/B arm ---
    def _supernet_mode(self) -> bool:
        return self.method is not None and self.method.name == "adass"

    def _supernet_window(self, batch, record, due: bool) -> None:
        """Test-then-train of the supernet on the window, the search's held-out rows (its last
        ones) trained on only after the search has scored subnets on them; then saved for
        `dimstream search` (STATE/supernet.pt)."""
        net = self._supernet()
        net.follow(self.runner.arm("control"))  # managed ids: the control's mapping, this window's
        n = len(batch)
        hold = self.method.holdout_rows(n) if due else 0
        t0 = time.perf_counter()
        first = _train_supernet(net, batch.slice(0, n - hold))
        seconds = time.perf_counter() - t0
        if due:
            self.method.supernet = net
            self._search(batch, record)
        t0 = time.perf_counter()
        probs = np.concatenate([first, _train_supernet(net, batch.slice(n - hold, n))])
        seconds += time.perf_counter() - t0
        record.supernet = {"rows": n, "seconds": seconds, "steps": net.steps} | (
            {k: v for k, v in window_metrics(batch.labels, probs).items() if k in ("auc", "logloss")} if n else {}
        )
        t0 = time.perf_counter()
        write_bytes(Path(self.runner.state_dir) / SUPERNET_FILE, net.to_bytes())
        record.supernet["save_seconds"] = time.perf_counter() - t0

    def _supernet(self):
        """The daemon's supernet: the saved one if it fits the control, else a new one."""
        if self.supernet is not None:
            return self.supernet
        from dimstream.models.supernet import Supernet
        from dimstream.search.ham import multi_valued

        control = self.runner.arm("control")
        path = Path(self.runner.state_dir) / SUPERNET_FILE
        if path.exists():
            net = Supernet.from_bytes(path.read_bytes())
            fits = net.num_embeddings == dict(self.runner.schema.num_embeddings)
            if fits and net.max_dim == max(control.dims.values()):
                self.supernet = net
                return net
            log.warning("%s is for another schema or width: a new supernet is trained", path)
        self.supernet = Supernet(
            self.runner.schema.num_embeddings,
            multi_valued(control),
            control.config,
            max(control.dims.values()),
            managed=control.managed,
        )
        return self.supernet

    def _warm_source(self, method: str):
        """The arm the slim arm's granted columns start from (models/realloc.py): the control,
        or under AdaS&S a copy of it whose tables are the supernet's max-tables (the kept
        columns then start from the supernet's first d columns, section 3.3)."""
        control = self.runner.arm("control")
        if method != "adass" or self.supernet is None:
            return control
        from dimstream.search.ham import copy_arm

        source = copy_arm(control, "control-from-supernet")
        self.supernet.copy_tables_into(source)
        return source

    def state_dict(self) -> dict:
        return self.policy.state_dict() | {"search_owed": self._owed}

    def load_state_dict(self, state: dict | None) -> None:
        self.policy.load_state_dict(state)
        self._owed = bool((state or {}).get("search_owed", False))

    # --- parts ---
    def _enough_rows(self, due: bool, batch, record) -> bool:
        """A due search on a window the method cannot search (too few rows: an empty window, a
        quiet day; held-out rows of one class) is owed to the next window it can, and the record
        says why (SearchMethod.unfit)."""
        why = self.method.unfit(batch) if due else None
        if why is None:
            self._owed = False
            return due
        self._owed = True
        record.search_skipped = f"{why} in the window: it runs at the next window that can be searched"
        log.info("window %d: search skipped: %s", record.index, record.search_skipped)
        return False

    def _failed(self, record, error: Exception) -> None:
        """A search that raised: the window's record and the log say why (with the traceback),
        `dimstream_search_failures_total` counts it, and its last-success alert keeps watch; the
        arms stay as they were and the next due search runs as planned."""
        name = self.method.name
        record.search_failed = f"{type(error).__name__}: {error}"
        self.runner.metrics.search_failures.labels(name).inc()
        log.error("window %d: the %s search failed; the arms stay as they were", record.index, name, exc_info=error)

    def _due(self, index: int) -> bool:
        cfg = self.runner.cfg
        if self.method is None or cfg.search_every <= 0 or index < cfg.search_warmup:
            return False
        return (index + 1) % cfg.search_every == 0

    def _observe(self, method: str, seconds: float) -> None:
        self.runner.metrics.search_duration.labels(method).observe(seconds)
        self.runner.metrics.search_last_success.labels(method).set(time.time())

    def _incumbent(self) -> dict[str, list[int]]:
        spec = self.runner.arm("slim").spec
        return {f: spec.column_ids[f][: spec.dims[f]] for f in spec.dims}

    def _decide(
        self, proposal, keep: dict[str, bool] | None, min_score: float | None, rows: int | None = None
    ) -> Decision:
        return self.policy.decide(
            proposal,
            self.runner.arm("control").dims,
            self.runner.schema.num_embeddings,
            self._incumbent(),
            keep=keep,
            min_score=min_score,
            rows=rows,
        )

    def _reshape(self, decision: Decision, source: str, method: str, record, tiers: dict | None = None) -> bool:
        """Re-shape the slim arm to the decision; False if it already has that allocation.

        `tiers` (AutoSrh with --tiers L > 1, search/autosrh.py `tiered_allocation`): the slim
        arm takes the (field, tier) allocation and the ids' tiers instead of the decision's
        field-level one (the policy's gate still decides whether to re-shape)."""
        runner, fields = self.runner, self.runner.schema.feature_names
        slim = runner.arm("slim")
        spec = ArmSpec(
            "slim",
            {f: int(decision.dims.get(f, 0)) for f in fields},
            {f: sorted(int(j) for j in decision.kept_columns.get(f, [])) for f in fields},
        )
        if tiers is not None:
            spec = ArmSpec.from_tiers("slim", fields, tiers)
        elif spec.dims == slim.spec.dims and all(
            spec.column_ids[f] == slim.spec.column_ids[f][: spec.dims[f]] for f in fields
        ):
            return False  # an allocation equal to the current one changes nothing
        runner.replace_arm(reallocate(slim, self._warm_source(method), spec, runner.build_arm))
        runner.metrics.reallocations.labels("slim").inc()
        params = runner.arm("slim").embedding_params
        record.reallocation = {"source": source, "method": method, "dims": spec.dims, "embedding_params": params}
        if spec.tiers:
            record.reallocation["tier_dims"] = {f: [len(c) for c in cols] for f, cols in spec.tiers.items()}
            record.reallocation["tier_rows"] = spec.tier_rows
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
            self._reshape(decision, "plan", plan.method, record, decode_tiers(plan.tiers))
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


def _resumed_counts(runner) -> tuple[StreamCounts, dict]:
    """The counts and managed owners of the checkpoint resumed from, else new ones (also when
    the schema's tables changed size)."""
    extra = getattr(runner.resume, "extra", None) or {}
    if "counts" in extra:
        counts = StreamCounts.from_state(extra["counts"])
        if counts.fits(runner.schema.num_embeddings):
            return counts, {f: t.numpy().copy() for f, t in extra.get("owners", {}).items()}
        log.warning("the checkpoint's row counts are of other table sizes: counting afresh")
    return StreamCounts(runner.schema.num_embeddings), {}


def looked_up_rows(control, batch, owners: dict | None = None, counts: StreamCounts | None = None) -> dict:
    """{field: the table rows `batch`'s ids look up}: a hashed field's ids are its rows; a
    managed field's are mapped by the control's vocabulary (a lookup, nothing admitted). With
    `owners` ({field: the raw id of every row at the last count}, updated in place) and
    `counts`, a managed row that changed owner since then has its count forgotten first."""
    from dimstream.models.vocab import vocabs_of

    vocabs = vocabs_of(control)
    out = {}
    for f, values in batch.values.items():
        if f not in vocabs:
            out[f] = values
            continue
        rows, _ = vocabs[f](torch.from_numpy(np.ascontiguousarray(values, np.int64)), admit=False)
        out[f] = rows.numpy()
        if owners is not None:
            now = vocabs[f].owners().numpy()
            if counts is not None and f in owners:
                counts.reset_rows(f, np.flatnonzero(owners[f] != now))
            owners[f] = now
    return out


def _tier_knob(cfg) -> dict:
    """--tiers L > 1 for AutoSrh's frequency tiers; L = 1 offers nothing (the field level)."""
    return {"tiers": cfg.tiers} if getattr(cfg, "tiers", 1) > 1 else {}


def _train_supernet(net, batch) -> np.ndarray:
    """Test-then-train of the supernet over `batch` in the arms' mini-batches: the sampled
    subnets' click probabilities, each from before its step (progressive validation)."""
    size = net.config.batch_size
    parts = [net.train_step(batch.slice(s, min(s + size, len(batch)))) for s in range(0, len(batch), size)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


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
