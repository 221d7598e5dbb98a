"""The training daemon: windows from a source, test-then-train on every arm, then the commit.

`Runner.from_config(cfg)` builds the parts (source, arms restored from the latest checkpoint
or new, metrics on a registry) and `Runner(cfg, source, arms, ...)` takes them from any other
caller (tests, benchmarks). Both first check that the state dir is writable and take its lock
(`StateLock`, STATE/daemon.lock): one daemon per state dir, held until the end of `run()` (or
`close()`); the readers (`dimstream search`, `export`, `report`) never take it. Per closed
window the runner
  1. evaluates and trains every arm on it (`progressive_val_score`, models/evaluation.py),
     the search's field check running first on rows no arm has seen (ops/searching.py);
  2. lets the search re-shape the slim arm (plans from the cron job, its own searches);
  3. hands the window to the `Committer` (dead letters, checkpoint, history, publish, source
     commit: ops/committer.py);
  4. writes the bounded summary and plot, exports metrics (ops/metrics.py) and logs a line.

Ranks (torchrun): every arm is one model sharded over all ranks (models/distributed.py). Every
rank reads the whole window of a files/synthetic source and trains its share of the rows (row i
to rank i mod N; `row_split` weights for a skewed split); the ranks check with a collective that
they close the same window (bounds and rows), take the same number of steps (zero-weight
padding), and score the union of their rows. A Kafka source is split by partition instead
(partition p to rank p mod N, `KafkaSource.assign_ranks`): each rank windows its own partitions
and the windows close in lockstep (stream/lockstep.py: a few ints all-gathered every 0.2 s);
the record counts, and the checkpoint's positions cover, every rank's partitions
(`_union`, `_merge_positions`). The search runs on every rank on the whole window
(the sharded control's gradient over all rows; the ranks check they reach the same shapes). Every
rank writes its checkpoint shard; rank 0 alone writes the summary, the plot, the history log,
dead letters, the publication and the source commit (`self.rank0`). A stop request (SIGTERM)
takes effect at the next window close that all ranks agree on, never mid-window.

Audit: with DIMSTREAM_TRAINED_IDS naming a column of unique integer row ids, every rank writes
the ids it trained per window (`_write_trained_ids`), so exactly-once is checked row by row.
"""

from __future__ import annotations

import dataclasses
import fcntl
import io
import logging
import os
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dimstream.models import distributed
from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.distributed import rank, world_size
from dimstream.models.evaluation import auc, progressive_val_score
from dimstream.ops import checkpoint
from dimstream.ops.committer import Committer
from dimstream.ops.config import ConfigError, RunConfig, parse_addr
from dimstream.ops.deadletters import DeadLetters
from dimstream.ops.history import History, summary
from dimstream.ops.http import Readiness, serve
from dimstream.ops.metrics import Metrics
from dimstream.ops.record import WindowRecord
from dimstream.ops.report import plot_summary
from dimstream.stream.atomic import write_bytes
from dimstream.stream.batch import SparseBatch
from dimstream.stream.decode import Decoder
from dimstream.stream.lockstep import Lockstep
from dimstream.stream.sources.base import LiveSource, Source
from dimstream.stream.sources.registry import SourceOptions
from dimstream.stream.sources.registry import open_source as open_spec
from dimstream.stream.synthetic import TRUTH_COLUMN
from dimstream.stream.window import Window, Windower, concat_tables

log = logging.getLogger("dimstream")
# the PNG is redrawn at most this often (the first one this long after the start), and at the
# end of a run: a draw costs about 0.5 s, which short windows would pay every few seconds
PLOT_EVERY_SECONDS = 30.0
CHECKPOINT_FORMAT = 3  # 3: sharded (DCP) checkpoints; 2: history in STATE/history.jsonl
# names a column of unique row ids: every rank writes the ids it trained per window (an audit of
# exactly-once, read by the tests; Runner._write_trained_ids)
TRAINED_IDS_ENV = "DIMSTREAM_TRAINED_IDS"


def open_source(cfg: RunConfig) -> Source:
    options = SourceOptions(
        schema_config=cfg.schema,
        seed=cfg.seed,
        kafka=cfg.kafka or {},
        rows_per_window=cfg.rows_per_window,
        window_seconds=cfg.window_seconds,
    )
    try:
        source = open_spec(cfg.source, options)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--source {cfg.source}: {e}") from None
    if isinstance(source, LiveSource) and _launch_world() > 1:
        # each rank reads its own partitions (p mod N, assigned by hand: no group rebalance moves
        # them mid-window) and the ranks close windows in lockstep (Runner: stream/lockstep.py)
        assign = getattr(source, "assign_ranks", None)
        if assign is None:
            source.close()
            raise ConfigError(
                f"--source {cfg.source}: a live source without partitions per rank runs on one rank only "
                f"(world size {_launch_world()})"
            )
        assign(_launch_rank(), _launch_world())
    return source


def _launch_world() -> int:
    """The world size torchrun launched (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "MASTER_ADDR" in os.environ else 1


def uniform_width(control_dim: int, budget: float) -> int:
    """Largest multiple of 4 whose uniform allocation stays within kappa x control's params."""
    return max(4, int(budget * control_dim) // 4 * 4)


def initial_specs(cfg: RunConfig, fields: list[str]) -> list[ArmSpec]:
    specs = [ArmSpec("control", {f: cfg.control_dim for f in fields})]
    if "uniform" in cfg.arms:
        specs.append(ArmSpec("uniform", {f: uniform_width(cfg.control_dim, cfg.budget) for f in fields}))
    if "slim" in cfg.arms:
        # until the first search the slim arm is the control's shape; the first search
        # (at the close of window 0) prunes it to the budget
        specs.append(ArmSpec("slim", {f: cfg.control_dim for f in fields}))
    return specs


def make_arm(spec: ArmSpec, schema, model) -> Arm:
    return Arm(spec, schema.num_embeddings, schema.multi_valued, model, managed=schema.managed)


@dataclass
class Resume:
    """Where a checkpoint leaves the run: source positions, the log's length, the search."""

    position: dict | None = None
    watermark: int | None = None
    read_upto: dict | None = None
    history_length: int = 0
    last_record: dict | None = None
    search: dict | None = None
    extra: dict | None = None  # the checkpoint's extra tensors (the search's stream counts)

    @classmethod
    def from_meta(cls, meta: dict) -> Resume:
        return cls(
            meta["position"],
            meta["watermark"],
            meta["read_upto"],
            meta["history_length"],
            meta.get("last_record"),
            meta.get("search"),
        )


def adopt_schema(cfg: RunConfig, source: Source) -> None:
    """A source without a declared schema (Kafka, no [schema]) adopts one: the schema its last
    checkpointed position holds, else the stream's. A stream that carries none is a ConfigError
    (exit 2): without a schema no model can be built, and a daemon that has never trained has
    nothing to serve."""
    if not getattr(source, "adopting", False):
        return
    ckpt = checkpoint.latest(cfg.state_dir)
    position = checkpoint.read_meta(ckpt).get("position") if ckpt is not None else None
    try:
        source.adopt_schema(position)
    except ValueError as e:
        raise ConfigError(f"--source {cfg.source}: {e}") from None


def check_model(cfg: RunConfig, saved: dict) -> None:
    """The checkpoint's model settings against the run's: any difference but the precision is a
    ConfigError naming the settings. The precision is how the heads compute, not what the model
    is (weights and optimizer state are fp32 either way), so a run may change it: a state dir of
    the fp32 default resumes under `auto`."""
    want = cfg.model.to_dict()
    differ = sorted(k for k in want.keys() | saved.keys() if k != "precision" and want.get(k) != saved.get(k))
    if differ:
        said = ", ".join(f"{k} {saved.get(k)!r} (this run: {want.get(k)!r})" for k in differ)
        raise ConfigError(
            f"state dir {cfg.state_dir} holds a {saved.get('model')} model with other settings: {said}; "
            "use the same options or a fresh --state-dir"
        )
    if saved.get("precision") != want["precision"]:
        log.info(
            "the checkpoint was trained at precision %s; this run continues at %s",
            saved.get("precision"),
            want["precision"],
        )


def restore(cfg: RunConfig, schema) -> tuple[list[Arm], Resume] | None:
    """The arms and resume point of the state dir's latest checkpoint, or None if it has none."""
    ckpt = checkpoint.latest(cfg.state_dir)
    if ckpt is None:
        broken = checkpoint.checkpoint_dirs(cfg.state_dir)
        if broken:  # starting afresh would cut the history log to nothing
            raise ConfigError(
                f"state dir {cfg.state_dir} holds checkpoints ({', '.join(p.name for p in broken)}) but none is "
                "complete (see the warnings); move them away or use a fresh --state-dir"
            )
        return None
    meta = checkpoint.read_meta(ckpt)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"state dir {cfg.state_dir} was written by an older dimstream; use a fresh --state-dir")
    if meta.get("schema_fingerprint") != schema.fingerprint():
        raise ConfigError(f"state dir {cfg.state_dir} was written for another schema; use a fresh --state-dir")
    check_model(cfg, meta.get("model") or {})
    restored = checkpoint.load_arms(ckpt, restore_rng=True, precision=cfg.model.precision)
    log.info("resumed from %s: %d windows done", ckpt.name, meta["history_length"])
    resume = Resume.from_meta(meta)
    resume.extra = restored.extra
    return list(restored.arms.values()), resume


def check_writable(state_dir: Path) -> None:
    """Create the state dir if missing and make sure a file can be created in it; ConfigError
    (one line) otherwise, before anything is trained."""
    d = Path(state_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / f".write-test-{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(d / f".write-test-{os.getpid()}")
    except OSError as e:
        raise ConfigError(f"state dir {d} is not writable: {e.strerror or e}") from None


class StateLock:
    """An exclusive `fcntl.flock` on STATE/daemon.lock (per rank), held for the daemon's life:
    a second daemon on the same state dir refuses to start. The kernel drops the lock when its
    process dies, so a lock file left by a dead daemon blocks nothing; the file holds the pid
    for the message. Readers (`dimstream search`, `export`, `report`) never take it."""

    def __init__(self, state_dir: Path, rank: int = 0):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / ("daemon.lock" if rank == 0 else f"daemon-rank{rank}.lock")
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> StateLock:
        if self.fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"state dir {self.state_dir} is not writable: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.read(fd, 32).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            who = f"pid {pid}" if pid.isdigit() else "another process"
            raise ConfigError(
                f"state dir {self.state_dir} in use by {who} (a running daemon); stop it or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # the pid is stale from now on
        except OSError:
            pass
        os.close(fd)  # closing the descriptor drops the flock


def _launch_rank() -> int:
    """This process's rank as torchrun sets it (before the process group exists)."""
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ.get("RANK", "0"))
    return 0


class WindowAbandoned(Exception):
    """SIGTERM arrived and the window's training would not finish within the grace period."""


class Runner:
    def __init__(
        self,
        cfg: RunConfig,
        source: Source,
        arms: list[Arm],
        *,
        metrics: Metrics | None = None,
        resume: Resume | None = None,
        lock: StateLock | None = None,
        row_split: tuple[int, ...] | None = None,
    ):
        self.cfg = cfg
        self.row_split = row_split  # weights of the rows' split over ranks (None: even)
        self.source = source
        self.schema = source.schema
        self.arms = arms
        self.metrics = metrics or Metrics()
        self.resume = resume or Resume()
        self.state_dir = Path(cfg.state_dir)
        self.rank0 = rank() == 0
        # ranks reading their own partitions of a live source (Kafka): windows closed in lockstep
        self.split = isinstance(source, LiveSource) and world_size() > 1
        self.search_view: Window | None = None  # the window the search sees (split: every rank's rows)
        # held from before the history log is touched (below) until the end of run()
        own = lock is None
        if own:
            check_writable(self.state_dir)
            lock = StateLock(self.state_dir, rank()).acquire()
        self.lock = lock
        try:
            self._setup()
        except BaseException:
            if own:
                lock.release()
            raise

    def _setup(self) -> None:
        cfg, source = self.cfg, self.source
        self.window_seconds = cfg.window_seconds or source.default_window_seconds or 3600
        self.decoder = Decoder(self.schema)
        self.readiness = Readiness()
        self.readiness.window_seconds = self.window_seconds
        self.stop_requested = False
        self._stop_agreed = False
        self.stop_deadline = float("inf")
        self._last_plot = time.monotonic()
        # observers(runner, window, record), called after training and before the commit
        self.observers: list = []
        self.history = History(self.state_dir, writer=self.rank0)
        self.history.resume(self.resume.history_length, self.resume.last_record)
        # rejections are written, sent and counted as they happen (rank 0 writes the files)
        # split: rank r > 0 alone sees its partitions' rejections, written to STATE/rank<r>/deadletter
        own_dir = self.state_dir if self.rank0 or not self.split else self.state_dir / f"rank{rank()}"
        self.deadletters = DeadLetters(own_dir, source, self.metrics, rank0=self.rank0 or self.split)
        self.committer = Committer(
            self.state_dir,
            source,
            self.deadletters,
            rank0=self.rank0,
            recent_rows=cfg.recent_rows,
            export_dir=cfg.export_dir,
            base_every=cfg.base_every,
        )
        self.search = None
        if "slim" in cfg.arms:
            from dimstream.ops.searching import DaemonSearch

            self.search = DaemonSearch(self)
            if self.resume.search is not None:
                self.search.load_state_dict(self.resume.search)

    @classmethod
    def from_config(cls, cfg: RunConfig, registry=None) -> Runner:
        """Every part from the config: the source, the arms (restored or new), the metrics."""
        if cfg.model.interaction_dim is None:
            # one interaction width for every arm: a slim arm then starts as the masked control
            cfg.model.interaction_dim = cfg.control_dim
        check_writable(cfg.state_dir)
        lock = StateLock(cfg.state_dir, _launch_rank()).acquire()  # before the source or the state is read
        source = None
        try:
            source = open_source(cfg)
            adopt_schema(cfg, source)
            if _launch_world() > 1 and getattr(source, "adopting", False):  # each rank read its own first message
                distributed.ensure_process_group()
                crc = zlib.crc32(source.schema.fingerprint().encode())
                distributed.agree("the schema adopted from the stream", [crc])
            found = restore(cfg, source.schema)
            if found is None:
                arms = [make_arm(s, source.schema, cfg.model) for s in initial_specs(cfg, source.schema.feature_names)]
                return cls(cfg, source, arms, metrics=Metrics(registry), lock=lock)
            arms, resume = found
            return cls(cfg, source, arms, metrics=Metrics(registry), resume=resume, lock=lock)
        except BaseException:
            lock.release()
            if source is not None:
                source.close()
            raise

    def close(self) -> None:
        """Release the state dir (run() does at its end); a runner never run can call it."""
        self.lock.release()

    # --- arms ---
    def build_arm(self, spec: ArmSpec) -> Arm:
        return make_arm(spec, self.schema, self.cfg.model)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def replace_arm(self, new: Arm) -> None:
        self.arms = [new if a.name == new.name else a for a in self.arms]

    def meta(self, record: WindowRecord) -> dict:
        """The checkpoint's meta: what resuming needs, bounded whatever the daemon's age."""
        return {
            "format": CHECKPOINT_FORMAT,
            "schema_fingerprint": self.schema.fingerprint(),
            "schema": self.schema.to_dict(),
            "model": self.cfg.model.to_dict(),
            "source": self.cfg.source,
            "window_seconds": self.window_seconds,
            "arms": [a.spec.to_dict() for a in self.arms],
            "position": self.resume.position,
            "watermark": self.resume.watermark,
            "read_upto": self.resume.read_upto,
            "history_length": len(self.history) + 1,
            "last_record": record.to_dict(),
            "search": self.search.state_dict() if self.search is not None else None,
        }

    # --- the loop ---
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> dict:
        self.lock.acquire()  # again, if run twice
        host, port = parse_addr(self.cfg.metrics_addr)
        if port and rank() != 0:  # ranks on one host: each its own port
            port += int(os.environ.get("LOCAL_RANK", rank()))
        if isinstance(self.source, LiveSource):  # broker status, read at every scrape
            self.metrics.watch_source(self.source)
        try:
            server = serve(host, port, self.readiness, self.metrics.registry)
        except OSError as e:
            raise ConfigError(
                f"cannot serve metrics on {self.cfg.metrics_addr}: {e.strerror} "
                "(use --metrics-addr HOST:PORT; port 0 picks a free one)"
            ) from None
        log.info("metrics on http://%s:%d/metrics", host, server.server_port)
        self.metrics_port = server.server_port
        self.readiness.model_loaded = True
        self.metrics.model_loaded.set(1)
        self.metrics.window_seconds.set(self.window_seconds)
        self.metrics.observe_arms(self.arms)
        old_term = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        try:
            if len(self.history) >= self.cfg.windows:
                log.info("%d windows already done (asked for %d)", len(self.history), self.cfg.windows)
            else:
                self._loop()
            self._linger()
        finally:
            if len(self.history) and self.rank0:
                self._plot()
            server.shutdown()
            server.server_close()  # the port is free when run() returns, not at garbage collection
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            self.source.close()
        return self.summary()

    def _linger(self) -> None:
        if self.cfg.linger_seconds <= 0 or self.stop_requested:
            return
        log.info("run done; serving metrics for %.0fs more", self.cfg.linger_seconds)
        deadline = time.monotonic() + self.cfg.linger_seconds
        while time.monotonic() < deadline and not self.stop_requested:
            time.sleep(0.2)

    def _on_sigterm(self, *_):
        log.warning(
            "SIGTERM: finishing the current window if it fits in %.0fs, else abandoning it", self.cfg.grace_seconds
        )
        self.stop_requested = True
        self.stop_deadline = time.monotonic() + self.cfg.grace_seconds

    def _loop(self) -> None:
        r = self.resume
        if isinstance(self.source, LiveSource) and r.position is not None and (self.rank0 or not self.split):
            # a crash may have come between the checkpoint and telling the source: tell it now
            # (ranks: rank 0 publishes the positions of every partition)
            self.source.recover(r.position, r.watermark, r.read_upto, len(self.history) - 1)
        windower = Windower(
            self.source,
            self.decoder,
            self.window_seconds,
            self.cfg.allowed_lateness,
            self.cfg.idle_timeout,
            r.position,
            r.watermark,
            r.read_upto,
            stop=lambda: self.stop_agreed,
            max_event_time_skew=self.cfg.max_event_time_skew,
            observer=self.deadletters,
            lockstep=self._lockstep() if self.split else None,
        )
        for window in windower.windows():
            if self.split:  # each rank its own partitions' rows: the same bounds
                distributed.agree("the window's bounds", [window.start, window.end])
            else:
                distributed.agree("the window's bounds and rows", [window.start, window.end, len(window.batch)])
            try:
                record = self.process(window)
            except WindowAbandoned:
                # nothing of this window is saved: the last checkpoint (and what it committed)
                # stays the resume point, so the window is trained once, after the restart
                log.warning("window abandoned on SIGTERM; resuming will train it from its start")
                break
            if self.search is not None:
                self.search.after_training(self.search_view or window, record)
                distributed.agree("the arms' shapes after the search", [self._shapes_crc()])
            for observer in self.observers:
                observer(self, window, record)
            self.close_window(window, record)
            if world_size() > 1:
                self.stop_agreed = distributed.any_rank(self.stop_requested)
            if self.stop_agreed or len(self.history) >= self.cfg.windows:
                break

    def _lockstep(self) -> Lockstep:
        """Split: windows close as the ranks agree, each rank's event time bounded by its
        partitions still being read (KafkaSource.event_time_floor)."""
        return Lockstep(self._lockstep_round, getattr(self.source, "event_time_floor", None))

    def _lockstep_round(self, values: list[int]):
        """One round of the ranks' window agreement (stream/lockstep.py), the stop request folded
        in: a SIGTERM on any rank stops every rank after the same round."""
        seen = distributed.all_gather_ints([*values, int(self.stop_requested)])
        if seen[:, -1].any():
            self._stop_agreed = True
        return seen[:, :-1]

    def _union(self, window: Window, record: WindowRecord) -> Window:
        """Split: the record counts every rank's rows, rejections and replays (one collective), and
        the search, if any, sees the union of the ranks' rows (as in the row split, where every
        rank holds the whole window)."""
        table = window.table
        has_truth = table is not None and TRUTH_COLUMN in table.column_names
        truth = table.column(TRUTH_COLUMN).to_numpy() if has_truth else None
        mine = {
            "rows": len(window.batch),
            "rejected": dict(window.rejected_counts),
            "replayed": window.replayed_rows,
            "truth": (window.batch.labels, truth) if truth is not None else None,
            "window": (window.batch, table) if self.search is not None else None,
        }
        everyone = distributed.gather_objects(mine)
        record.rows = sum(e["rows"] for e in everyone)
        rejected: dict[str, int] = {}
        for e in everyone:
            for reason, n in e["rejected"].items():
                rejected[reason] = rejected.get(reason, 0) + n
        record.rejected, record.rejected_rows = rejected, sum(rejected.values())
        record.replayed_rows = sum(e["replayed"] for e in everyone)
        truths = [e["truth"] for e in everyone if e["truth"] is not None]
        record.bayes_auc = auc(*map(np.concatenate, zip(*truths))) if truths else None
        if self.search is None:
            return window
        tables = [e["window"][1] for e in everyone if e["window"][1] is not None]
        batch = SparseBatch.concat([e["window"][0] for e in everyone])
        return dataclasses.replace(window, batch=batch, table=concat_tables(tables) if tables else None)

    def _merge_positions(self, window: Window) -> None:
        """Split: the window's positions of every rank's partitions (one collective), so the
        checkpoint (every rank's meta, rank 0's file) and rank 0's commit cover the whole topic."""
        everyone = distributed.gather_objects((window.resume, window.read_upto))
        log.info(
            "rank %d of %d: window [%s .. %s] rows %d from partitions %s",
            rank(),
            world_size(),
            _iso(window.start),
            _iso(window.end),
            len(window.batch),
            sorted(int(p) for p in ((window.read_upto or {}).get("offsets") or {})),
        )
        # new objects: the windower keeps its own (this rank's) positions to rewind to
        window.resume = self.source.merge_positions([e[0] for e in everyone])
        window.read_upto = self.source.merge_positions([e[1] for e in everyone])

    @property
    def stop_agreed(self) -> bool:
        """The stop request every rank acts on (one process: its own, at once)."""
        return self.stop_requested if world_size() == 1 else self._stop_agreed

    @stop_agreed.setter
    def stop_agreed(self, value: bool) -> None:
        self._stop_agreed = value

    def _shapes_crc(self) -> int:
        shapes = [(a.name, sorted(a.spec.dims.items()), sorted(a.spec.column_ids.items())) for a in self.arms]
        return zlib.crc32(repr(shapes).encode())

    def local_rows(self, window: Window):
        """This rank's share of the window's rows (all of them in a world of one)."""
        if world_size() == 1 or self.split:  # split: the window holds this rank's partitions' rows
            return window.batch
        return window.batch.take(distributed.share_mask(len(window.batch), rank(), world_size(), self.row_split))

    def process(self, window: Window) -> WindowRecord:
        """Test-then-train every arm on the window (the search's field check first)."""
        batch = window.batch
        record = WindowRecord(
            index=len(self.history),
            start=_iso(window.start),
            end=_iso(window.end),
            rows=len(batch),
            rejected_rows=sum(window.rejected_counts.values()),
            rejected=dict(window.rejected_counts),
            replayed_rows=window.replayed_rows,
        )
        if window.table is not None and TRUTH_COLUMN in window.table.column_names:
            record.bayes_auc = auc(batch.labels, window.table.column(TRUTH_COLUMN).to_numpy())
        self.search_view = self._union(window, record) if self.split else None
        if self.search is not None:
            self.search.before_training(self.search_view or window, record)
        with _Progress(self, record.index, len(batch)) as progress:
            if world_size() == 1:
                results = progressive_val_score(self.arms, batch, self.cfg.model.batch_size, on_step=progress.step)
            else:
                results = distributed.progressive_val_score(
                    self.arms, self.local_rows(window), self.cfg.model.batch_size, on_step=progress.step
                )
        for arm in self.arms:
            m = results[arm.name]
            quality = {k: m[k] for k in ("auc", "logloss", "ctr_pred", "ctr_obs") if k in m}
            record.arms[arm.name] = quality | {
                "embedding_params": arm.embedding_params,
                "dims": arm.dims,
                "train_rows_per_s": m["train_rows_per_s"],
            }
            if "auc_diff_vs_control" in m:
                record.arms[arm.name]["auc_diff_vs_control"] = m["auc_diff_vs_control"]
            self.metrics.arm_rows_trained.labels(arm.name).inc(len(batch))
        record.read_seconds = window.read_seconds
        return record

    def close_window(self, window: Window, record: WindowRecord) -> None:
        if self.split:
            self._merge_positions(window)
            if not self.rank0:
                self.deadletters.rotate(record.index)  # rank 0's are rotated by the committer
        if os.environ.get(TRAINED_IDS_ENV):
            self._write_trained_ids(window, record.index, os.environ[TRAINED_IDS_ENV])
        self.resume.position, self.resume.watermark = window.resume, window.end
        self.resume.read_upto = window.read_upto
        publish = self.arm("slim" if "slim" in self.cfg.arms else "control")
        extra = self.search.checkpoint_extra() if self.search is not None else None
        self.committer.close(window, record, self.meta, self.arms, self.history, publish, extra=extra)
        if self.rank0:
            t0 = time.perf_counter()
            write_bytes(self.state_dir / "summary.json", self.history.summary_json(self._header(), self.source.truth()))
            if time.monotonic() - self._last_plot >= PLOT_EVERY_SECONDS:  # many short windows: throttle
                self._plot()
            record.summary_seconds = time.perf_counter() - t0
        self.metrics.observe_window(window, record, self.arms)
        self.readiness.last_close = time.time()
        self._log_window(record)

    def _write_trained_ids(self, window: Window, index: int, column: str) -> None:
        """The audit of exactly-once (env DIMSTREAM_TRAINED_IDS=COLUMN, a column of unique integer
        row ids the stream carries): this rank's trained rows' ids, STATE/trained-ids/window-<n>.rank<r>.npy.
        Written before the checkpoint, so a window trained again after a crash (at any world size:
        rank 0 drops the files of ranks the world no longer has) rewrites its files, and the
        files of the windows in the history log are the rows the model learnt from."""
        table = window.table
        if table is not None and column not in table.column_names:
            raise ConfigError(f"{TRAINED_IDS_ENV}={column}: window {index} has no column {column!r}")
        ids = np.asarray(table.column(column).to_numpy() if table is not None else [], np.int64)
        if world_size() > 1 and not self.split:  # the rows this rank trained (local_rows)
            ids = ids[distributed.share_mask(len(ids), rank(), world_size(), self.row_split)]
        out = self.state_dir / "trained-ids"
        if self.rank0:
            for stale in out.glob(f"window-{index:06d}.rank*.npy"):
                if int(stale.name.split(".rank")[1].split(".")[0]) >= world_size():
                    stale.unlink()
        buf = io.BytesIO()
        np.save(buf, ids)
        write_bytes(out / f"window-{index:06d}.rank{rank()}.npy", buf.getvalue())

    # --- output (rank 0) ---
    def _plot(self) -> None:
        plot_summary(self.summary(), self.state_dir / "summary.png")
        self._last_plot = time.monotonic()

    def summary(self) -> dict:
        """The recent windows (a bounded span) and totals; the whole run is in the history log."""
        return summary(self._header(), list(self.history.recent), self.history.totals, self.source.truth())

    def _header(self) -> dict:
        return {"source": self.cfg.source, "model": self.cfg.model.model, "window_seconds": self.window_seconds}

    def _log_window(self, r: WindowRecord) -> None:
        if not self.rank0:
            return  # one log line per window, from rank 0
        arms = " | ".join(
            f"{n} auc {m.get('auc', float('nan')):.4f} logloss {m.get('logloss', float('nan')):.4f} "
            f"params {m['embedding_params']:,} {m.get('train_rows_per_s', 0):,.0f} rows/s"
            for n, m in r.arms.items()
        )
        bayes = f" bayes {r.bayes_auc:.4f}" if r.bayes_auc is not None else ""
        log.info(
            "window %d [%s .. %s] rows %d rejected %d%s | %s",
            r.index,
            r.start,
            r.end,
            r.rows,
            r.rejected_rows,
            bayes,
            arms,
        )


class _Progress:
    """Progress bars per arm, and the SIGTERM budget: after a stop request the window goes on
    only if its remaining training fits in the grace period."""

    def __init__(self, runner: Runner, index: int, rows: int):
        self.runner, self.index, self.rows = runner, index, rows
        self.bar, self.arm = None, -1

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def step(self, arm: int, done: int, seconds: float) -> None:
        if arm != self.arm:
            if self.bar is not None:
                self.bar.close()
            self.arm, self.shown = arm, 0
            self.bar = tqdm(
                total=self.rows,
                unit="row",
                unit_scale=True,
                leave=False,
                file=sys.stderr,
                desc=f"window {self.index} {self.runner.arms[arm].name}",
                disable=not self.runner.cfg.progress,
            )
        self.bar.update(done - self.shown)
        self.shown = done
        if self.runner.stop_requested and world_size() == 1:  # ranks never abandon alone
            self._finish_or_abandon(len(self.runner.arms) - 1 - arm, done, seconds)

    def _finish_or_abandon(self, arms_after: int, done: int, seconds: float) -> None:
        rate = done / max(seconds, 1e-9)
        remaining = ((self.rows - done) + arms_after * self.rows) / rate
        if time.monotonic() + remaining + 5.0 > self.runner.stop_deadline:  # 5 s for the checkpoint
            raise WindowAbandoned()


def _iso(t: int) -> str:
    return datetime.fromtimestamp(int(t), tz=UTC).isoformat().replace("+00:00", "Z")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
