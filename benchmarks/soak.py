"""Soak: the daemon over hundreds of small windows, SIGKILLed at random and restarted, with a bad
input every few windows; at the end every window must be in the history once and in order, and
every bad row in the dead letters with its reason.

The input is a `files:` directory (one Parquet file per half window, every row with a unique
`rid`), written before the run, so the expected result is known exactly: the rows each window
trains and the (rid, reason) of every bad row. Bad inputs cycle through: a NaN label, a null
label, a label out of range, a price that is no number (wrong_type), an event time in 2100
(bad_event_time: the skew bound is on, its default), a late row, and a file that is not Parquet
at all (corrupt_input). `dimstream run` is started as a real process and killed with SIGKILL at
random moments (after its first checkpoint), then started again on the same state dir, until it
finishes.

    python benchmarks/soak.py                 # 300 windows (a few minutes), writes results/soak.json
    python benchmarks/soak.py --windows 40 --kills 3 --out /tmp/soak.json   # a short one
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dimstream.ops.history import read_log
from dimstream.stream.deadletter import read as read_deadletters

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WINDOW = 60  # seconds of event time per window
T0 = 1_700_000_000 // 3600 * 3600
YEAR_2100 = 4_102_444_800
BAD_KINDS = ("nan_label", "null_label", "label_out_of_range", "wrong_type", "bad_event_time", "late", "corrupt_input")
SCHEMA_TOML = """
[schema]
label = "label"
event_time = "event_time"
fields = [
  {name = "user", kind = "categorical", num_embeddings = 500},
  {name = "item", kind = "categorical", num_embeddings = 300},
  {name = "price", kind = "numeric", num_embeddings = 16},
]
"""


def _file(rng, rid0: int, n: int, t_lo: int) -> dict:
    """Columns of one good file: n rows with event times in [t_lo, t_lo + WINDOW / 2)."""
    return {
        "rid": np.arange(rid0, rid0 + n, dtype=np.int64),
        "user": rng.integers(0, 400, n),
        "item": rng.integers(0, 250, n),
        "price": rng.lognormal(1, 1, n),
        "label": (rng.random(n) < 0.3).astype(np.int64),
        "event_time": t_lo + np.sort(rng.integers(0, WINDOW // 2, n)),
    }


def write_input(directory: Path, windows: int, rows: int, bad_every: int, seed: int):
    """The files of `windows` windows (two of `rows` rows each); returns the rows each window
    should train and the expected dead letters: {rid: reason} and the corrupt files' names."""
    rng = np.random.default_rng(seed)
    trained = [0] * windows
    bad: dict[int, str] = {}
    corrupt: list[str] = []
    rid = 0
    for w in range(windows):
        for half in range(2):
            name = f"{w:05d}-{half}.parquet"
            cols = _file(rng, rid, rows, T0 + w * WINDOW + half * WINDOW // 2)
            rid += rows
            kind = BAD_KINDS[(w // bad_every) % len(BAD_KINDS)] if w % bad_every == bad_every - 1 and half else None
            n_good = rows
            if kind == "corrupt_input":
                (directory / f"{w:05d}-2.parquet").write_bytes(b"PAR1 this is not a parquet file " * 8)
                corrupt.append(f"{w:05d}-2.parquet")
            elif kind is not None:
                i = int(rng.integers(0, rows))  # one bad row in the file
                bad[int(cols["rid"][i])] = kind
                n_good -= 1
                if kind == "nan_label":
                    cols["label"] = cols["label"].astype(np.float64)
                    cols["label"][i] = np.nan
                elif kind == "null_label":
                    cols["label"] = pa.array(cols["label"], mask=np.arange(rows) == i)
                elif kind == "label_out_of_range":
                    cols["label"][i] = 7
                elif kind == "wrong_type":
                    cols["price"] = np.array([f"{p:.3f}" for p in cols["price"]], dtype=object)
                    cols["price"][i] = "not a number"
                elif kind == "bad_event_time":
                    cols["event_time"][i] = YEAR_2100
                elif kind == "late":
                    cols["event_time"][i] = T0 + (w - 2) * WINDOW  # two windows back: closed already
            pq.write_table(pa.table(cols), directory / name)
            trained[w] += n_good
    return trained, bad, corrupt


def run_with_kills(cmd: list[str], state: Path, kills: int, seed: int, log_path: Path, max_delay: float = 10.0) -> dict:
    """Run `cmd` until it exits 0, SIGKILLing it `kills` times at random moments (each after the
    run has checkpointed since its start, so every kill interrupts real progress)."""
    rng = random.Random(seed)
    killed, starts, t0 = 0, 0, time.time()
    while True:
        starts += 1
        before = len(list((state / "checkpoints").glob("ckpt-*"))) if (state / "checkpoints").exists() else 0
        with open(log_path, "a") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        if killed < kills:
            delay = rng.uniform(min(2.0, max_delay / 5), max_delay)
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:
                ckpts = len(list((state / "checkpoints").glob("ckpt-*"))) if (state / "checkpoints").exists() else 0
                if ckpts > before:  # it has made progress since this start: now wait, then kill
                    time.sleep(delay)
                    break
                time.sleep(0.05)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed += 1
                continue
        rc = proc.wait(timeout=1800)
        if rc != 0:
            raise SystemExit(f"dimstream run exited {rc}; see {log_path}")
        return {"kills": killed, "starts": starts, "wall_seconds": round(time.time() - t0, 1)}


def dead_letters(state: Path) -> tuple[dict[int, list[str]], list[dict]]:
    """Every dead letter of the closed windows: {rid: [reasons]} for rows, and the inputs (no row)."""
    rows: dict[int, list[str]] = {}
    inputs = []
    for path in sorted((state / "deadletter").glob("window-*.arrow")):
        t = read_deadletters(path)
        for reason, detail, row in zip(*(t.column(c).to_pylist() for c in ("reason", "detail", "row")), strict=True):
            rec = json.loads(row) if row else None
            if isinstance(rec, dict) and "rid" in rec:
                rows.setdefault(int(rec["rid"]), []).append(reason)
            else:
                inputs.append({"reason": reason, "detail": detail, "file": path.name})
    return rows, inputs


def check(state: Path, windows: int, trained: list[int], bad: dict, corrupt: list[str]) -> dict:
    log = read_log(state)
    index = [w["index"] for w in log]
    starts = [w["start"] for w in log]
    seconds = [datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() for s in starts]
    rows_dl, inputs = dead_letters(state)
    wrong = {r: (bad.get(r), rows_dl.get(r)) for r in set(bad) | set(rows_dl) if rows_dl.get(r) != [bad.get(r)]}
    corrupt_seen = sorted(
        name
        for name in corrupt
        if sum(1 for i in inputs if i["reason"] == "corrupt_input" and name in i["detail"]) == 1
    )
    return {
        "windows_unique_and_contiguous": index == list(range(windows)) and len(set(starts)) == windows,
        "window_starts_contiguous": seconds == [T0 + WINDOW * i for i in range(len(seconds))],
        "rows_per_window_as_expected": [w["rows"] for w in log] == trained,
        "every_bad_row_dead_lettered_once_with_its_reason": not wrong,
        "every_corrupt_file_dead_lettered_once": corrupt_seen == sorted(corrupt),
        "mismatched_bad_rows": {str(k): v for k, v in sorted(wrong.items())[:10]},
        "rows_trained": int(sum(w["rows"] for w in log)),
        "rows_expected": int(sum(trained)),
        "dead_letter_rows": int(sum(len(v) for v in rows_dl.values())),
        "dead_letter_inputs": len(inputs),
        "replayed_rows": int(sum(w.get("replayed_rows", 0) for w in log)),
    }


def soak(windows: int, rows: int, bad_every: int, kills: int, seed: int, work: Path, max_delay: float = 10.0) -> dict:
    data, state = work / "in", work / "state"
    data.mkdir(parents=True)
    trained, bad, corrupt = write_input(data, windows, rows, bad_every, seed)
    cfg = work / "soak.toml"
    cfg.write_text(
        "\n".join(
            [
                f'source = "files:{data}"',
                f"window_seconds = {WINDOW}",
                f"windows = {windows}",
                'arms = ["control"]',
                'model = "fm"',
                f'state_dir = "{state}"',
                'metrics_addr = "127.0.0.1:0"',
                "progress = false",
            ]
        )
        + "\n"
        + SCHEMA_TOML
    )
    cmd = [sys.executable, "-m", "dimstream.ops.cli", "run", "--config", str(cfg)]
    run = run_with_kills(cmd, state, kills, seed, work / "daemon.log", max_delay)
    reasons: dict[str, int] = {}
    for r in bad.values():
        reasons[r] = reasons.get(r, 0) + 1
    if corrupt:
        reasons["corrupt_input"] = len(corrupt)
    return {
        "windows": windows,
        "rows_per_window": 2 * rows,
        "bad_input_every_windows": bad_every,
        "bad_inputs": reasons,
        "max_event_time_skew": "default (86400 s)",
        **run,
        **check(state, windows, trained, bad, corrupt),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=300)
    p.add_argument("--rows", type=int, default=100, help="rows per file (two files a window)")
    p.add_argument("--bad-every", type=int, default=4, help="a bad input every this many windows")
    p.add_argument("--kills", type=int, default=8, help="SIGKILLs of the daemon, at random moments")
    p.add_argument("--max-kill-delay", type=float, default=10.0, help="seconds after a checkpoint, at most, to kill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dimstream-soak-") as tmp:
        result = soak(args.windows, args.rows, args.bad_every, args.kills, args.seed, Path(tmp), args.max_kill_delay)
    result["command"] = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = all(v for k, v in result.items() if k.startswith(("windows_", "window_", "rows_per_window_as", "every_")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
