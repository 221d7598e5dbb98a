"""The record of one closed window: what the history log, the summary and the metrics show.

One typed record per window, filled by the window loop (reading, evaluation, checkpoint) and
by the search (search, re-allocation, field check, plans). `to_dict` drops the parts that did
not happen, so the JSON of a window without a search has no "search" key.

>>> r = WindowRecord(index=0, start="2026-01-01T00:00:00Z", end="2026-01-01T01:00:00Z", rows=10)
>>> 'search' in r.to_dict(), r.to_dict()['rows']
(False, 10)
>>> WindowRecord.from_dict(r.to_dict()) == r
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

_OPTIONAL = (
    "bayes_auc",
    "search",
    "search_skipped",
    "search_failed",
    "reallocation",
    "field_check",
    "plan_rejected",
    "supernet",
)


@dataclass
class WindowRecord:
    index: int
    start: str  # ISO 8601, UTC
    end: str
    rows: int  # accepted (trained) rows
    rejected_rows: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by reason
    replayed_rows: int = 0  # skipped after a restart: handled before the crash
    arms: dict[str, dict] = field(default_factory=dict)  # per arm: window_metrics + params, dims, rows/s
    bayes_auc: float | None = None  # synthetic stream: the AUC of the true probabilities
    search: dict | None = None  # the search run at this window's close
    search_skipped: str | None = None  # why a due search did not run (SearchMethod.unfit)
    search_failed: str | None = None  # the error of a search that raised (training went on)
    reallocation: dict | None = None  # the re-shape of the slim arm it (or a plan) caused
    field_check: dict | None = None
    plan_rejected: str | None = None
    supernet: dict | None = None  # --search adass: the supernet's test-then-train on the window (not an arm)
    read_seconds: float = 0.0
    checkpoint_seconds: float | None = None
    summary_seconds: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in _OPTIONAL + ("checkpoint_seconds", "summary_seconds"):
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WindowRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
