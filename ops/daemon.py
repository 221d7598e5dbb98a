"""The training daemon: windows from a source, test-then-train on every arm, checkpoints.

For each closed window: every arm is evaluated on the window before it trains on it
(progressive validation: AUC, log-loss, predicted and observed CTR), then trains one pass in
mini-batches. Then the window's dead letters and the recent-rows buffer are written, plans or
searches re-shape arms (`hooks`), a checkpoint is written atomically, the source is told what
that checkpoint covers (Kafka commits offsets only then), and summary.json and the plot are
updated.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.evaluation import auc, auc_difference, window_metrics
from dimstream.ops import checkpoint, metrics
from dimstream.stream.atomic import write_bytes, write_json
from dimstream.ops.config import ConfigError, RunConfig, parse_addr
from dimstream.ops.http import Readiness, serve
from dimstream.ops.report import plot_summary
from dimstream.stream import deadletter
from dimstream.stream.decode import Decoder
from dimstream.stream.synthetic import TRUTH_COLUMN
from dimstream.stream.window import Window, Windower

log = logging.getLogger("dimstream")
PLOT_EVERY_SECONDS = 10.0  # the PNG is redrawn at most this often, and at the end of a run
SOURCE_EXPORT_SECONDS = 1.0  # broker status (up, lag, time since the last message) refresh period


def open_source(cfg: RunConfig):
    if cfg.source == "synthetic":
        from dimstream.stream.synthetic import SyntheticSource
        return SyntheticSource(seed=cfg.seed, rows_per_window=cfg.rows_per_window,
                               window_seconds=cfg.window_seconds or 3600)
    from dimstream.stream.sources.registry import open_source as open_spec
    try:
        return open_spec(cfg.source, schema_config=cfg.schema, seed=cfg.seed, kafka=cfg.kafka)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--source {cfg.source}: {e}") from None


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


class WindowAbandoned(Exception):
    """SIGTERM arrived and the window's training would not finish within the grace period."""


class Runner:
    def __init__(self, cfg: RunConfig):
        if cfg.model.interaction_dim is None:
            # one interaction width for every arm: a slim arm then starts as the masked control
            cfg.model.interaction_dim = cfg.control_dim
        self.cfg = cfg
        self._export_lock = threading.Lock()
        self._handed_over_exported = 0  # source rows handed over, already added to the counter
        self.state_dir = Path(cfg.state_dir)
        self.source = open_source(cfg)
        self.schema = self.source.schema
        self.window_seconds = cfg.window_seconds or getattr(self.source, "default_window_seconds", None) or 3600
        self.decoder = Decoder(self.schema)
        self.multi = {f.name for f in self.schema.fields if f.kind == "multi"}
        self.readiness = Readiness()
        self.readiness.window_seconds = self.window_seconds
        self.stop_requested = False
        self.stop_deadline = float("inf")
        self._last_plot = -float("inf")
        self.hooks: list = []  # callables(runner, window, record): after training, before the checkpoint
        self.pre_hooks: list = []  # callables(runner, window, record): after reading, before any arm trains
        self._restore_or_init()
        if "slim" in cfg.arms:
            from dimstream.ops.searching import install
            install(self)

    # --- state ---
    def _restore_or_init(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ckpt = checkpoint.latest(self.state_dir)
        self.history: list[dict] = []
        self.position = self.watermark = self.read_upto = None
        self.extra: dict = {}
        if ckpt is None:
            self.arms = [self.build_arm(s) for s in initial_specs(self.cfg, self.schema.feature_names)]
            return
        meta = checkpoint.read_meta(ckpt)
        if meta.get("schema_fingerprint") != self.schema.fingerprint():
            raise ConfigError(f"state dir {self.state_dir} was written for another schema; "
                              "use a fresh --state-dir")
        if meta.get("model") != asdict(self.cfg.model) | {"mlp": list(self.cfg.model.mlp)}:
            raise ConfigError(f"state dir {self.state_dir} holds a {meta['model']['model']} model with other "
                              "settings; use the same options or a fresh --state-dir")
        tensors = checkpoint.read_tensors(ckpt)
        self.arms = []
        for spec in meta["arms"]:
            arm = self.build_arm(ArmSpec(spec["name"], spec["dims"], spec["column_ids"]))
            checkpoint.load_arm_state(arm, tensors[arm.name])
            self.arms.append(arm)
        torch.set_rng_state(tensors["rng"]["torch"])
        self.history = meta["history"]
        self.position, self.watermark, self.read_upto = meta["position"], meta["watermark"], meta["read_upto"]
        self.extra = meta.get("extra", {})
        log.info("resumed from %s: %d windows done", ckpt.name, len(self.history))

    def build_arm(self, spec: ArmSpec) -> Arm:
        return Arm(spec, self.schema.num_embeddings, self.multi, self.cfg.model)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def replace_arm(self, new: Arm) -> None:
        self.arms = [new if a.name == new.name else a for a in self.arms]

    def meta(self) -> dict:
        return {"schema_fingerprint": self.schema.fingerprint(), "schema": self.schema.to_dict(),
                "model": asdict(self.cfg.model) | {"mlp": list(self.cfg.model.mlp)},
                "source": self.cfg.source, "window_seconds": self.window_seconds,
                "arms": [{"name": a.name, "dims": a.spec.dims, "column_ids": a.spec.column_ids} for a in self.arms],
                "position": self.position, "watermark": self.watermark, "read_upto": self.read_upto,
                "history": self.history, "extra": self.extra}

    # --- the loop ---
    def run(self) -> dict:
        host, port = parse_addr(self.cfg.metrics_addr)
        try:
            server = serve(host, port, self.readiness)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {self.cfg.metrics_addr}: {e.strerror} "
                              "(use --metrics-addr HOST:PORT; port 0 picks a free one)") from None
        log.info("metrics on http://%s:%d/metrics", host, server.server_port)
        self.metrics_port = server.server_port
        self.readiness.model_loaded = True
        metrics.MODEL_LOADED.set(1)
        metrics.WINDOW_SECONDS.set(self.window_seconds)
        self._export_arms()
        old_term = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        # broker status is exported between windows too: a hung broker shows on /metrics at once
        exported = threading.Event()
        if getattr(self.source, "kafka_up", None) is not None:
            threading.Thread(target=self._export_source_until, args=(exported,), daemon=True,
                             name="dimstream-source-status").start()
        try:
            if len(self.history) >= self.cfg.windows:
                log.info("%d windows already done (asked for %d)", len(self.history), self.cfg.windows)
            else:
                self._loop()
            if self.cfg.linger_seconds > 0 and not self.stop_requested:
                log.info("run done; serving metrics for %.0fs more", self.cfg.linger_seconds)
                deadline = time.monotonic() + self.cfg.linger_seconds
                while time.monotonic() < deadline and not self.stop_requested:
                    time.sleep(0.2)
        finally:
            exported.set()
            if self.history:
                self._plot()
            server.shutdown()
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            self.source.close()
        return self.summary()

    def _on_sigterm(self, *_):
        log.warning("SIGTERM: finishing the current window if it fits in %.0fs, else abandoning it",
                    self.cfg.grace_seconds)
        self.stop_requested = True
        self.stop_deadline = time.monotonic() + self.cfg.grace_seconds

    def _loop(self) -> None:
        recover = getattr(self.source, "recover", None)
        if recover is not None and self.position is not None:
            # a crash may have come between the checkpoint and telling the source (Kafka): tell it now
            recover(self.position, self.watermark, self.read_upto, len(self.history) - 1)
        windower = Windower(self.source, self.decoder, self.window_seconds, self.cfg.allowed_lateness,
                            self.cfg.idle_timeout, self.position, self.watermark, self.read_upto,
                            stop=lambda: self.stop_requested)
        for window in windower.windows():
            try:
                record = self.process(window)
            except WindowAbandoned:
                # nothing of this window is saved: the last checkpoint (and what it committed)
                # stays the resume point, so the window is trained once, after the restart
                log.warning("window abandoned on SIGTERM; resuming will train it from its start")
                break
            for hook in self.hooks:
                hook(self, window, record)
            self.close_window(window, record)
            if self.stop_requested or len(self.history) >= self.cfg.windows:
                break

    def process(self, window: Window) -> dict:
        index = len(self.history)
        batch = window.batch
        record = {"index": index, "start": _iso(window.start), "end": _iso(window.end),
                  "rows": len(batch), "rejected_rows": sum(window.rejected_counts.values()),
                  "rejected": dict(window.rejected_counts), "replayed_rows": window.replayed_rows, "arms": {}}
        if window.table is not None and TRUTH_COLUMN in window.table.column_names:
            record["bayes_auc"] = auc(batch.labels, window.table.column(TRUTH_COLUMN).to_numpy())
        for hook in self.pre_hooks:
            hook(self, window, record)
        # test-then-train: each mini-batch is scored by every arm before that arm trains on it
        # (progressive validation); the scores come from the training forward pass itself
        bs = self.cfg.model.batch_size
        steps = (len(batch) + bs - 1) // bs
        scores = {}
        for i, arm in enumerate(self.arms):
            t0 = time.perf_counter()
            probs = scores[arm.name] = np.empty(len(batch), np.float32)
            bar = tqdm(total=len(batch), unit="row", unit_scale=True, leave=False, file=sys.stderr,
                       desc=f"window {index} {arm.name}", disable=not self.cfg.progress)
            for s in range(steps):
                lo, hi = s * bs, min((s + 1) * bs, len(batch))
                probs[lo:hi] = arm.train_step(batch.slice(lo, hi))
                bar.update(hi - lo)
                if self.stop_requested:
                    self._finish_or_abandon(t0, len(self.arms) - 1 - i, hi, len(batch))
            bar.close()
            dt = time.perf_counter() - t0
            m = window_metrics(batch.labels, probs) if len(batch) else {}
            record["arms"][arm.name] = m | {"embedding_params": arm.embedding_params, "dims": arm.dims,
                                            "train_rows_per_s": len(batch) / dt if dt > 0 else 0.0}
            metrics.ARM_ROWS_TRAINED.labels(arm.name).inc(len(batch))
        # the A/B view: each arm against control on the same rows, with DeLong's 95% interval
        for name, probs in scores.items():
            if name != "control" and "control" in scores and len(batch):
                record["arms"][name]["auc_diff_vs_control"] = auc_difference(batch.labels, probs, scores["control"])
        record["read_seconds"] = window.read_seconds
        return record

    def _publish(self, index: int) -> None:
        """Export the checkpoint just written for serving and move the `latest` pointer atomically,
        the way online systems publish a model every hour."""
        from dimstream.ops.export import export_arm
        arm = "slim" if "slim" in self.cfg.arms else "control"
        root = Path(self.cfg.export_dir)
        export_arm(self.state_dir, arm, root / f"window-{index:06d}")
        write_bytes(root / "latest", f"window-{index:06d}\n".encode())

    def _finish_or_abandon(self, t0: float, arms_after: int, done: int, rows: int) -> None:
        """After SIGTERM: keep going only if the window's remaining training fits the grace period."""
        rate = done / max(time.perf_counter() - t0, 1e-9)
        remaining = ((rows - done) + arms_after * rows) / rate
        if time.monotonic() + remaining + 5.0 > self.stop_deadline:  # 5 s for the checkpoint
            raise WindowAbandoned()

    def close_window(self, window: Window, record: dict) -> None:
        index = record["index"]
        if window.rejected:
            table = deadletter.to_table(window.rejected)
            write_bytes(self.state_dir / "deadletter" / f"window-{index:06d}.arrow", deadletter.to_ipc_bytes(table))
            send = getattr(self.source, "dead_letter_rows", None)
            if send is not None:  # a Kafka source also puts them on TOPIC.dlq
                send(table)
        if window.table is not None and window.table.num_rows:
            recent = window.table.slice(max(0, window.table.num_rows - self.cfg.recent_rows))
            write_bytes(self.state_dir / "recent" / "rows.arrow", deadletter.to_ipc_bytes(recent))
        self.history.append(record)
        self.position, self.watermark, self.read_upto = window.resume, window.end, window.read_upto
        t0 = time.perf_counter()
        checkpoint.save(self.state_dir, index, self.meta(), self.arms)
        record["checkpoint_seconds"] = time.perf_counter() - t0
        if self.cfg.export_dir is not None:
            self._publish(index)
        commit = getattr(self.source, "commit", None)
        if commit is not None and window.resume is not None:
            commit(window.resume, window.end, window.read_upto, window=index)  # only now: the checkpoint is durable
        t0 = time.perf_counter()
        write_json(self.state_dir / "summary.json", self.summary())
        if time.monotonic() - self._last_plot >= PLOT_EVERY_SECONDS:  # many short windows: throttle
            self._plot()
        record["summary_seconds"] = time.perf_counter() - t0
        self._export_window(window, record)
        self._log_window(record)

    # --- output ---
    def _plot(self) -> None:
        plot_summary(self.summary(), self.state_dir / "summary.png")
        self._last_plot = time.monotonic()

    def summary(self) -> dict:
        out = {"source": self.cfg.source, "model": self.cfg.model.model, "window_seconds": self.window_seconds,
               "windows": self.history}
        rank = getattr(self.source, "field_rank", None)
        if rank is not None:
            out["truth"] = {"field_rank": rank}
        out["reallocations"] = reallocation_costs(self.history)
        return out

    def _export_arms(self) -> None:
        for arm in self.arms:
            metrics.ARM_EMBEDDING_PARAMS.labels(arm.name).set(arm.embedding_params)
            metrics.ARM_EMBEDDING_BYTES.labels(arm.name).set(4 * arm.embedding_params)
            for f, d in arm.dims.items():
                metrics.ARM_FIELD_DIM.labels(arm.name, f).set(d)

    def _export_window(self, window: Window, record: dict) -> None:
        metrics.WINDOWS_CLOSED.inc()
        metrics.WINDOW_INDEX.set(record["index"])
        metrics.WINDOW_CLOSE_TIME.set(time.time())
        metrics.ROWS_CONSUMED.inc(window.rows_read)
        for reason, n in window.rejected_counts.items():
            metrics.ROWS_REJECTED.labels(reason).inc(n)
        if window.read_seconds > 0:
            metrics.CONSUME_ROWS_PER_SECOND.set(window.rows_read / window.read_seconds)
        for name, m in record["arms"].items():
            if "auc" not in m:
                continue
            metrics.ARM_AUC.labels(name).set(m["auc"])
            metrics.ARM_LOGLOSS.labels(name).set(m["logloss"])
            metrics.ARM_CTR_PREDICTED.labels(name).set(m["ctr_pred"])
            metrics.ARM_CTR_OBSERVED.labels(name).set(m["ctr_obs"])
            if m["ctr_obs"] > 0:
                metrics.ARM_CTR_CALIBRATION.labels(name).set(m["ctr_pred"] / m["ctr_obs"])
            metrics.ARM_TRAIN_ROWS_PER_SECOND.labels(name).set(m["train_rows_per_s"])
            d = m.get("auc_diff_vs_control")
            if d is not None:
                metrics.ARM_AUC_DIFF.labels(name).set(d["diff"])
                metrics.ARM_AUC_DIFF_LOW.labels(name).set(d["ci_low"])
                metrics.ARM_AUC_DIFF_HIGH.labels(name).set(d["ci_high"])
        self._export_arms()
        self._export_source()
        self.readiness.last_close = time.time()

    def _export_source_until(self, done: threading.Event) -> None:
        while not done.wait(SOURCE_EXPORT_SECONDS):
            try:
                self._export_source()
            except Exception as e:  # never let the status thread die on a transient error
                log.debug("source status export failed: %s", e)

    def _export_source(self) -> None:
        """Broker status of a live source (Kafka): up, lag, time since the last message."""
        up = getattr(self.source, "kafka_up", None)
        if up is None:
            return
        metrics.KAFKA_UP.set(1 if up else 0)
        last = getattr(self.source, "last_message_time", None)
        if last is not None:
            metrics.SECONDS_SINCE_LAST_MESSAGE.set(time.time() - last)
        for partition, lag in getattr(self.source, "lag", {}).items():
            metrics.KAFKA_LAG.labels(partition).set(lag)
        with self._export_lock:  # called from the status thread and at window closes
            handed = getattr(self.source, "handed_over_rows", 0)
            metrics.KAFKA_ROWS_HANDED_OVER.inc(max(0, handed - self._handed_over_exported))
            self._handed_over_exported = max(handed, self._handed_over_exported)

    def _log_window(self, r: dict) -> None:
        arms = " | ".join(f"{n} auc {m.get('auc', float('nan')):.4f} logloss {m.get('logloss', float('nan')):.4f} "
                          f"params {m['embedding_params']:,} {m.get('train_rows_per_s', 0):,.0f} rows/s"
                          for n, m in r["arms"].items())
        bayes = f" bayes {r['bayes_auc']:.4f}" if "bayes_auc" in r else ""
        log.info("window %d [%s .. %s] rows %d rejected %d%s | %s", r["index"], r["start"], r["end"],
                 r["rows"], r["rejected_rows"], bayes, arms)


def reallocation_costs(history: list[dict]) -> list[dict]:
    """The cost of each re-allocation: the slim arm's AUC on the window after it against the
    window before it (the window whose close triggered the change)."""
    out = []
    for before, after in zip(history, history[1:]):
        change = before.get("reallocation")
        if not change or "slim" not in before["arms"] or "slim" not in after["arms"]:
            continue
        a0, a1 = before["arms"]["slim"].get("auc"), after["arms"]["slim"].get("auc")
        out.append({"window": before["index"], "source": change.get("source"), "method": change.get("method"),
                    "auc_before": a0, "auc_after": a1,
                    "auc_change": (a1 - a0) if a0 is not None and a1 is not None else None})
    return out


def _iso(t: int) -> str:
    return datetime.fromtimestamp(int(t), tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
