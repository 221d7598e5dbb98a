"""The per-window history: an append-only log in the state dir, and the bounded summary.

STATE/history.jsonl holds one JSON record per closed window, appended and fsynced when the
window's checkpoint is durable. The checkpoint holds only the log's length (and the last
record, see `History.resume`), so neither the checkpoint nor the per-window cost grows with the
daemon's age. summary.json and the plot cover the most recent `RECENT` windows plus running
totals; `dimstream report` and the benchmarks read the whole log (`read_log`).

Exactly once: the log is cut back to the checkpoint's length at start, so a record whose
checkpoint never landed (killed between the two) does not survive the restart, and a record
the checkpoint names but that never reached the disk is re-appended from the checkpoint.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> h = History(d)
>>> h.append({"index": 0, "rows": 5, "arms": {}}); h.append({"index": 1, "rows": 7, "arms": {}})
>>> len(h), h.totals["rows"]
(2, 12)
>>> h2 = History(d); h2.resume(1, {"index": 0, "rows": 5, "arms": {}})   # checkpoint after window 0
>>> [r["index"] for r in read_log(d)], h2.totals["rows"]
([0], 5)
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)
LOG_FILE = "history.jsonl"
RECENT = 24  # windows in summary.json and the plot: a day of hourly windows


def read_log(state_dir: Path) -> list[dict]:
    """Every record of the log, oldest first (a torn last line, from a crash, is skipped)."""
    path = Path(state_dir) / LOG_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            log.warning("%s: skipping a torn line (%d bytes)", path, len(line))
    return out


class History:
    """The log plus what the summary needs: the recent records and running totals."""

    def __init__(self, state_dir: Path, recent: int = RECENT, *, writer: bool = True):
        self.path = Path(state_dir) / LOG_FILE
        # ranks other than 0 keep the same records and totals in memory but never write the log
        self.writer = writer
        self.recent: deque[dict] = deque(maxlen=recent)
        # the same records as JSON, encoded once when logged: summary.json is joined from them,
        # so writing it costs the same at window 700 as at window 10
        self._recent_json: deque[bytes] = deque(maxlen=recent)
        self.totals: dict = _empty_totals()
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def resume(self, length: int, last: dict | None) -> None:
        """Cut the log back to the checkpoint's `length` records; re-append its `last` record if
        the crash came before it reached the log. Then rebuild the recent span and the totals."""
        records = read_log(self.path.parent)[:length]
        if len(records) == length - 1 and last is not None:
            records.append(last)
        if len(records) != length:
            raise RuntimeError(
                f"{self.path} holds {len(records)} windows, the checkpoint {length}: "
                "the log was edited or lost; use a fresh --state-dir"
            )
        if self.writer:
            self._rewrite(records)
        self.recent.clear()
        self._recent_json.clear()
        self.totals, self._length = _empty_totals(), 0
        for r in records:
            self._count(r)

    def append(self, record: dict) -> None:
        """Append one window's record durably (fsync) before anything else refers to it."""
        if not self.writer:
            self._count(record)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            line = json.dumps(record).encode()
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._count(record, line)

    def summary_json(self, header: dict, truth: dict | None = None) -> bytes:
        """summary.json as `summary(header, recent, totals, truth)` gives it, joined from the
        records' JSON encoded when they were logged."""
        tail = {"totals": self.totals} | ({"truth": truth} if truth is not None else {})
        tail["reallocations"] = reallocation_costs(list(self.recent))
        head = json.dumps(header).encode()
        windows = b"[" + b", ".join(self._recent_json) + b"]"
        return head[:-1] + (b", " if header else b"") + b'"windows": ' + windows + b", " + json.dumps(tail).encode()[1:]

    def _count(self, r: dict, line: bytes | None = None) -> None:
        self.recent.append(r)
        self._recent_json.append(line if line is not None else json.dumps(r).encode())
        self._length += 1
        t = self.totals
        t["windows"] += 1
        t["rows"] += int(r.get("rows", 0))
        t["rejected_rows"] += int(r.get("rejected_rows", 0))
        for reason, n in r.get("rejected", {}).items():
            t["rejected"][reason] = t["rejected"].get(reason, 0) + int(n)
        if r.get("reallocation"):
            t["reallocations"] += 1
        if r.get("search"):
            t["searches"] += 1

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(b"".join(json.dumps(r).encode() + b"\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _empty_totals() -> dict:
    return {"windows": 0, "rows": 0, "rejected_rows": 0, "rejected": {}, "searches": 0, "reallocations": 0}


def reallocation_costs(history: list[dict]) -> list[dict]:
    """The cost of each re-allocation: the slim arm's AUC on the window after it against the
    window before it (the window whose close triggered the change)."""
    out = []
    for before, after in zip(history, history[1:]):
        change = before.get("reallocation")
        if not change or "slim" not in before["arms"] or "slim" not in after["arms"]:
            continue
        a0, a1 = before["arms"]["slim"].get("auc"), after["arms"]["slim"].get("auc")
        out.append(
            {
                "window": before["index"],
                "source": change.get("source"),
                "method": change.get("method"),
                "auc_before": a0,
                "auc_after": a1,
                "auc_change": (a1 - a0) if a0 is not None and a1 is not None else None,
            }
        )
    return out


def summary(header: dict, windows: list[dict], totals: dict | None = None, truth: dict | None = None) -> dict:
    """summary.json: `header` (source, model, window length), the given windows, totals, truth."""
    out = dict(header) | {"windows": windows}
    if totals is not None:
        out["totals"] = totals
    if truth is not None:
        out["truth"] = truth
    out["reallocations"] = reallocation_costs(windows)
    return out
