"""The allocation plan: written by `dimstream search` (the cron job), applied by the daemon.

A plan is one JSON object (format 1):

    {"format": 1, "method": "sseds", "dims": {"user_id": 16, "noise_flag": 0, ...},
     "kept_columns": {"user_id": [0, 3, ...], "noise_flag": [], ...},
     "saliency": {"user_id": [0.0012, ...], ...}, "budget_kind": "params",
     "budget_asked": 5054976, "budget_reached": 5041200, "schema_fingerprint": "9f2c...",
     "checkpoint": "ckpt-000011", "created_at": "2026-01-01T12:00:03Z", "duration_seconds": 0.41}

An optional "field_check": {"rows", "z", "dropped": [...]} says which held-out field check the
allocation followed (search/fieldcheck.py); plans without it read as null. An optional "tiers"
(AutoSrh with --tiers L > 1) is the (field, tier) allocation the slim arm is built from, with the
ids' tiers (search/tierplan.py); `validate_plan` checks it too.
dims lists every field of the control arm (0 = the field leaves the slim arm); kept_columns[f]
are the control arm's column indices the slim field starts from (sorted, len == dims[f]).
`write_plan` replaces the file atomically (temporary file, fsync, rename, fsync of the
directory), so the daemon reads the old plan or the new one, never half of one. `read_plan`
checks structure and types; `validate_plan` checks the plan against the running schema,
table sizes, control widths and budget. Both raise PlanError(reason, detail). A plan file
larger than MAX_PLAN_BYTES or nested deeper than MAX_PLAN_DEPTH is "malformed" before it is
parsed; unknown top-level keys are ignored with one WARNING.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dimstream.search.budget import KINDS, QUANTUM, SearchResult, params_of
from dimstream.search.tierplan import encode_tiers, validate_tiers
from dimstream.stream.atomic import write_bytes

log = logging.getLogger(__name__)
FORMAT = 1
MAX_PLAN_BYTES = 16 << 20  # a plan is KBs: dims, kept columns and scores of the control's columns
MAX_PLAN_DEPTH = 32  # a plan nests 3 deep ({"saliency": {"f": [...]}})


class PlanError(ValueError):
    """A plan that cannot be applied. `reason` is a short fixed phrase
    ("malformed", "missing key", "bad type", "another schema", "unknown field", "missing field",
    "width not a multiple of 4", "wider than the control", "bad kept columns", "over budget",
    "keeps no field", "bad tiers"), `detail` says what exactly."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Plan:
    dims: dict[str, int]
    kept_columns: dict[str, list[int]]
    saliency: dict[str, list[float]]
    method: str
    budget_kind: str
    budget_asked: int
    budget_reached: int
    schema_fingerprint: str
    checkpoint: str | None  # name of the checkpoint the control arm was read from
    created_at: str  # ISO 8601, UTC
    duration_seconds: float
    # informative, optional: the held-out field check the allocation followed (rows, z, dropped)
    field_check: dict | None = None
    # optional: AutoSrh's (field, tier) allocation, search/tierplan.py `encode_tiers`
    tiers: dict | None = None

    @classmethod
    def from_result(
        cls, result: SearchResult, schema_fingerprint: str, checkpoint: str | None, created_at: str | None = None
    ) -> Plan:
        return cls(
            dims=dict(result.dims),
            kept_columns={f: list(c) for f, c in result.kept_columns.items()},
            saliency={f: list(s) for f, s in result.saliency.items()},
            method=result.method,
            budget_kind=result.budget_kind,
            budget_asked=int(result.budget_asked),
            budget_reached=int(result.budget_reached),
            schema_fingerprint=schema_fingerprint,
            checkpoint=checkpoint,
            created_at=created_at or utc_now(),
            duration_seconds=float(result.duration_seconds),
            field_check=_check_summary(result),
            tiers=encode_tiers(result.details.get("tiers")),
        )

    def to_dict(self) -> dict:
        return {"format": FORMAT} | asdict(self)


def _check_summary(result: SearchResult) -> dict | None:
    check = result.details.get("field_check")
    if not check:
        return None
    return {"rows": check["rows"], "z": check["z"], "dropped": [f for f, k in check["keep"].items() if not k]}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_plan(path: str | Path, plan: Plan) -> None:
    """Write `plan` as JSON to `path`, atomically."""
    write_bytes(Path(path), json.dumps(plan.to_dict(), indent=1).encode())


# --- reading: structure and types ---------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _check(ok: bool, detail: str) -> None:
    if not ok:
        raise PlanError("bad type", detail)


def _bracket_depth(raw: bytes) -> int:
    """The deepest nesting of [ and { in `raw`, counting brackets inside strings too (an upper
    bound of the JSON's depth for a plan, whose strings hold no brackets), without recursion."""
    b = np.frombuffer(raw, np.uint8)
    step = np.isin(b, (ord("["), ord("{"))).astype(np.int64) - np.isin(b, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def read_plan(path: str | Path) -> Plan:
    """Read and type-check a plan file. Raises PlanError("malformed" | "missing key" |
    "bad type", detail) for an unreadable or non-JSON file, a missing key or a wrong type."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise PlanError("malformed", f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError("malformed", f"{path} is larger than {MAX_PLAN_BYTES:,} bytes")
    depth = _bracket_depth(raw)
    if depth > MAX_PLAN_DEPTH:
        raise PlanError("malformed", f"{path} nests {depth} deep (at most {MAX_PLAN_DEPTH})")
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise PlanError("malformed", f"{path} is not JSON: {e}") from None
    except RecursionError:  # nesting hidden from the bracket count (brackets inside strings)
        raise PlanError("malformed", f"{path} nests too deep to parse") from None
    if not isinstance(d, dict):
        raise PlanError("malformed", f"{path} holds a JSON {type(d).__name__}, not an object")
    if d.get("format", FORMAT) != FORMAT:
        raise PlanError("malformed", f"plan format {d.get('format')!r}, this version reads {FORMAT}")
    names = [k for k in Plan.__dataclass_fields__]
    unknown = sorted(str(k) for k in set(d) - set(names) - {"format"})
    if unknown:
        log.warning("plan %s: ignoring unknown key(s) %s", path, ", ".join(unknown))
    optional = {"field_check", "tiers"}
    missing = [k for k in names if k not in d and k not in optional]
    if missing:
        raise PlanError("missing key", f"{path} lacks {', '.join(missing)}")
    _check(
        isinstance(d["dims"], dict) and all(isinstance(f, str) and _is_int(v) for f, v in d["dims"].items()),
        "dims must map field names to integers",
    )
    _check(
        isinstance(d["kept_columns"], dict)
        and all(isinstance(c, list) and all(_is_int(j) for j in c) for c in d["kept_columns"].values()),
        "kept_columns must map field names to lists of integers",
    )
    _check(
        isinstance(d["saliency"], dict)
        and all(isinstance(s, list) and all(_is_num(x) for x in s) for s in d["saliency"].values()),
        "saliency must map field names to lists of finite numbers",
    )
    _check(isinstance(d["method"], str) and d["method"] != "", "method must be a non-empty string")
    _check(d["budget_kind"] in KINDS, f"budget_kind must be one of {KINDS}")
    _check(_is_num(d["budget_asked"]) and _is_num(d["budget_reached"]), "budget_asked/budget_reached must be numbers")
    _check(isinstance(d["schema_fingerprint"], str), "schema_fingerprint must be a string")
    _check(d["checkpoint"] is None or isinstance(d["checkpoint"], str), "checkpoint must be a string or null")
    _check(isinstance(d["created_at"], str), "created_at must be an ISO 8601 string")
    _check(_is_num(d["duration_seconds"]) and d["duration_seconds"] >= 0, "duration_seconds must be a number >= 0")
    _check(d.get("field_check") is None or isinstance(d["field_check"], dict), "field_check must be an object or null")
    _check(d.get("tiers") is None or isinstance(d["tiers"], dict), "tiers must be an object or null")
    return Plan(**{k: d[k] for k in names if k in d})


# --- validation against the running daemon -------------------------------------------------------


def validate_plan(
    plan: Plan, schema_fingerprint: str, num_embeddings: dict[str, int], control_dims: dict[str, int], kappa: float
) -> None:
    """Raise PlanError unless `plan` can shape the slim arm of this daemon:
    same schema, only known fields and every control field, widths multiples of 4 and no
    wider than the control, kept columns consistent with the widths, and
    sum_i rows_i * d_i <= kappa * control params (SSEDS eq. 4; whatever the plan's budget
    kind, the slim arm's budget is in parameters). A columns-kind plan must also keep
    sum_i d_i <= its budget_asked."""
    if plan.schema_fingerprint != schema_fingerprint:
        raise PlanError(
            "another schema", f"plan made for schema {plan.schema_fingerprint}, the daemon runs {schema_fingerprint}"
        )
    unknown = sorted(set(plan.dims) - set(num_embeddings)) + sorted(set(plan.kept_columns) - set(num_embeddings))
    if unknown:
        raise PlanError("unknown field", f"the schema has no field {', '.join(sorted(set(unknown)))}")
    ctrl = {f: d for f, d in control_dims.items() if d > 0}
    missing = sorted(set(ctrl) - set(plan.dims))
    if missing:
        raise PlanError("missing field", f"the plan gives no width for {', '.join(missing)}")
    bad = {f: d for f, d in plan.dims.items() if d < 0 or d % QUANTUM}
    if bad:
        raise PlanError("width not a multiple of 4", f"{bad}")
    wide = {f: d for f, d in plan.dims.items() if d > control_dims.get(f, 0)}
    if wide:
        raise PlanError("wider than the control", f"{wide} (control: { {f: control_dims.get(f, 0) for f in wide} })")
    for f, d in plan.dims.items():
        cols = plan.kept_columns.get(f, [])
        if len(cols) != d or len(set(cols)) != len(cols) or any(j < 0 or j >= control_dims.get(f, 0) for j in cols):
            raise PlanError(
                "bad kept columns",
                f"field {f}: width {d} but kept columns {cols} "
                f"(must be {d} distinct indices < {control_dims.get(f, 0)})",
            )
    if not any(plan.dims.values()):
        raise PlanError("keeps no field", "every field has width 0")
    used = params_of(plan.dims, num_embeddings)
    limit = math.floor(kappa * params_of(ctrl, num_embeddings))
    if used > limit:
        raise PlanError("over budget", f"{used:,} embedding parameters > kappa {kappa} x control = {limit:,}")
    if plan.budget_kind == "columns" and sum(plan.dims.values()) > plan.budget_asked:
        raise PlanError("over budget", f"{sum(plan.dims.values())} columns > target {plan.budget_asked}")
    if plan.tiers is not None:
        try:
            validate_tiers(plan.tiers, num_embeddings, control_dims, kappa)
        except (ValueError, TypeError, KeyError) as e:
            raise PlanError("bad tiers", str(e)) from None
