"""dimstream.search: embedding-dimension search on the control arm and the plan it produces.

    from dimstream.search import Budget, registry, Plan, write_plan, read_plan, validate_plan

    method = registry.build("sseds", rows=8192)       # any registered method
    result = method.run(control_arm, recent_rows, Budget("params", kappa=0.25))
    plan = Plan.from_result(result, schema.fingerprint(), checkpoint="ckpt-000011")
    write_plan(state_dir / "plan.json", plan)          # the cron job
    plan = read_plan(state_dir / "plan.json")           # the daemon
    validate_plan(plan, schema.fingerprint(), schema.num_embeddings, control.dims, kappa=0.25)
    decision = AllocationPolicy(0.25, decay=0.8, min_gain=0.05).decide(plan, control.dims, rows, slim_columns)

Modules: registry (SearchMethod, register, names, get, build), budget (Budget, allocate: SSEDS
eqs. 4/8/12 + quantisation to multiples of 4; make_result, the one SearchResult builder),
masks (auxiliary masks alpha on no-grad pooled embeddings), sseds (SSEDS eqs. 10-12),
ham (HAM eqs. 1-3, Algorithm 1), fieldcheck (SSEDS eq. 9 per field on held-out
rows: which fields may keep columns at all), policy (moving average, gain gate and averaged
field check deciding when the slim arm is re-shaped), plan (the plan file). Imports models and
stream, never ops.
"""

from dimstream.search import registry
from dimstream.search.budget import (
    Allocation,
    Budget,
    BudgetError,
    SearchResult,
    allocate,
    kept_score,
    make_result,
    params_of,
    rank_blocks,
    relative_gain,
    select_blocks,
)
from dimstream.search.fieldcheck import FieldCheck, check_fields
from dimstream.search.ham import ham_search, orthogonal_regulariser, split_holdout
from dimstream.search.masks import masked_logits, masked_loss, ones_masks, pooled_embeddings
from dimstream.search.plan import Plan, PlanError, read_plan, validate_plan, write_plan
from dimstream.search.policy import AllocationPolicy, Decision
from dimstream.search.registry import SearchMethod, register
from dimstream.search.sseds import saliency_scores, sseds_search

__all__ = [
    "registry",
    "SearchMethod",
    "register",
    "FieldCheck",
    "check_fields",
    "Allocation",
    "Budget",
    "BudgetError",
    "SearchResult",
    "allocate",
    "kept_score",
    "make_result",
    "relative_gain",
    "select_blocks",
    "params_of",
    "rank_blocks",
    "ham_search",
    "orthogonal_regulariser",
    "split_holdout",
    "masked_logits",
    "masked_loss",
    "ones_masks",
    "pooled_embeddings",
    "Plan",
    "PlanError",
    "read_plan",
    "validate_plan",
    "write_plan",
    "AllocationPolicy",
    "Decision",
    "saliency_scores",
    "sseds_search",
]
