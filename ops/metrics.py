"""Every Prometheus metric dimstream exports, declared once (units in the names).

`Metrics(registry)` declares them on an injected registry, so two runners in one process
(tests, benchmarks) never share series. A live source's status (broker up, lag, time since the
last message, rows handed over) is not pushed: `SourceStatusCollector` reads
`LiveSource.status()` when Prometheus scrapes.

Labels:
  arm    -- model arm: "control", "slim", "uniform", ...
  field  -- feature (embedding table) name from the schema
  method -- dimension-search method: a name of search.registry.METHODS, or "field_check"
  reason -- why rows/messages were rejected: see dimstream.stream.decode.REASONS
  partition -- Kafka partition number (as a string)
  outcome -- "applied", "kept" (the gain gate kept the slim arm) or "rejected" (plans)

>>> from prometheus_client import CollectorRegistry, generate_latest
>>> m = Metrics(CollectorRegistry())
>>> m.windows_closed.inc()
>>> b"dimstream_windows_closed_total 1.0" in generate_latest(m.registry)
True
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

SEARCH_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The daemon's metrics on one registry (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        if registry is None:  # a fresh registry: with the process metrics the global one has
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = r = registry
        # --- per arm: quality of the last closed window (progressive, test-then-train) ---
        self.arm_auc = Gauge("dimstream_arm_auc", "Progressive AUC of the last closed window", ["arm"], registry=r)
        self.arm_logloss = Gauge(
            "dimstream_arm_logloss", "Progressive log-loss of the last closed window", ["arm"], registry=r
        )
        self.arm_ctr_predicted = Gauge(
            "dimstream_arm_ctr_predicted_ratio", "Mean predicted CTR, last window", ["arm"], registry=r
        )
        self.arm_ctr_observed = Gauge(
            "dimstream_arm_ctr_observed_ratio", "Observed CTR, last window", ["arm"], registry=r
        )
        self.arm_ctr_calibration = Gauge(
            "dimstream_arm_ctr_calibration_ratio",
            "Predicted over observed CTR, last window (1 = calibrated)",
            ["arm"],
            registry=r,
        )
        self.arm_auc_diff = Gauge(
            "dimstream_arm_auc_diff_vs_control", "AUC minus control's AUC, last window", ["arm"], registry=r
        )
        self.arm_auc_diff_low = Gauge(
            "dimstream_arm_auc_diff_vs_control_ci_low",
            "Lower end of the 95% interval of the AUC difference to control",
            ["arm"],
            registry=r,
        )
        self.arm_auc_diff_high = Gauge(
            "dimstream_arm_auc_diff_vs_control_ci_high",
            "Upper end of the 95% interval of the AUC difference to control",
            ["arm"],
            registry=r,
        )
        self.arm_embedding_params = Gauge(
            "dimstream_arm_embedding_params", "Embedding parameters (rows x dims)", ["arm"], registry=r
        )
        self.arm_embedding_bytes = Gauge(
            "dimstream_arm_embedding_bytes", "Embedding weights in bytes (fp32)", ["arm"], registry=r
        )
        self.arm_rows_trained = Counter(
            "dimstream_arm_rows_trained_total", "Rows trained into the arm", ["arm"], registry=r
        )
        self.arm_train_rows_per_second = Gauge(
            "dimstream_arm_train_rows_per_second", "Training throughput of the last window", ["arm"], registry=r
        )
        self.arm_field_dim = Gauge(
            "dimstream_arm_field_embedding_dim",
            "Embedding dimension per arm and field (0 = pruned)",
            ["arm", "field"],
            registry=r,
        )
        # --- dimension search and re-allocation ---
        self.search_duration = Histogram(
            "dimstream_search_duration_seconds",
            "Duration of one dimension search",
            ["method"],
            buckets=SEARCH_BUCKETS,
            registry=r,
        )
        self.search_last_success = Gauge(
            "dimstream_search_last_success_timestamp_seconds",
            "Unix time of the last successful search",
            ["method"],
            registry=r,
        )
        self.search_failures = Counter(
            "dimstream_search_failures_total",
            "Dimension searches that raised: the arms stay as they were, training goes on",
            ["method"],
            registry=r,
        )
        self.field_check_keep = Gauge(
            "dimstream_field_check_keep",
            "Last held-out field check: 1 if the field's removal raised held-out loss, else 0",
            ["field"],
            registry=r,
        )
        self.plans = Counter("dimstream_plans_total", "Allocation plans handled by the daemon", ["outcome"], registry=r)
        self.reallocations = Counter(
            "dimstream_reallocations_total", "Re-allocations applied to an arm", ["arm"], registry=r
        )
        # --- stream ---
        self.rows_consumed = Counter("dimstream_rows_consumed_total", "Rows read from the source", registry=r)
        self.rows_rejected = Counter(
            "dimstream_rows_rejected_total", "Rows (or batches) rejected, by reason", ["reason"], registry=r
        )
        self.rows_rejected_recent_ratio = Gauge(
            "dimstream_rows_rejected_recent_ratio",
            "Share of the last 1,000 rows read that were rejected (updated as rows are read)",
            registry=r,
        )
        self.windows_closed = Counter("dimstream_windows_closed_total", "Windows trained and checkpointed", registry=r)
        self.window_index = Gauge("dimstream_window_index", "Index of the last closed window", registry=r)
        self.window_close_time = Gauge(
            "dimstream_window_close_timestamp_seconds", "Unix time the last window closed", registry=r
        )
        self.window_seconds = Gauge(
            "dimstream_window_length_seconds", "Configured window length (event time)", registry=r
        )
        self.consume_rows_per_second = Gauge(
            "dimstream_consume_rows_per_second", "Rows consumed per second (last window)", registry=r
        )
        self.model_loaded = Gauge("dimstream_model_loaded", "1 once a model is built or restored", registry=r)
        self._declare_vocab(r)

    def _declare_vocab(self, r: CollectorRegistry) -> None:
        """Managed vocabularies (schema vocab = "managed", models/vocab.py), per arm and field."""
        af = ["arm", "field"]
        self.vocab_rows_in_use = Gauge(
            "dimstream_vocab_rows_in_use", "Rows of a managed field holding a live id", af, registry=r
        )
        self.vocab_capacity_rows = Gauge(
            "dimstream_vocab_capacity_rows", "Rows of a managed field's table (default row included)", af, registry=r
        )
        self.vocab_admissions = Counter(
            "dimstream_vocab_admissions", "Ids given a row of their own (admitted)", af, registry=r
        )
        self.vocab_evictions = Counter(
            "dimstream_vocab_evictions", "Live ids that gave their row up to a new id", af, registry=r
        )
        self.vocab_window_admissions = Gauge(
            "dimstream_vocab_window_admissions", "Ids admitted in the last window", af, registry=r
        )
        self.vocab_window_evictions = Gauge(
            "dimstream_vocab_window_evictions", "Ids evicted in the last window", af, registry=r
        )
        self.vocab_default_row_ratio = Gauge(
            "dimstream_vocab_default_row_lookup_ratio",
            "Share of the last window's training lookups that read the default row (ids not admitted)",
            af,
            registry=r,
        )

    def observe_vocab(self, arms) -> None:
        """Each managed field of each arm over the window just trained (its counters restart)."""
        for arm in arms:
            stats = arm.vocab_stats() if hasattr(arm, "vocab_stats") else {}
            for f, st in stats.items():
                self.vocab_rows_in_use.labels(arm.name, f).set(st["rows_in_use"])
                self.vocab_capacity_rows.labels(arm.name, f).set(st["capacity"])
                self.vocab_admissions.labels(arm.name, f).inc(st["admissions"])
                self.vocab_evictions.labels(arm.name, f).inc(st["evictions"])
                self.vocab_window_admissions.labels(arm.name, f).set(st["admissions"])
                self.vocab_window_evictions.labels(arm.name, f).set(st["evictions"])
                self.vocab_default_row_ratio.labels(arm.name, f).set(st["default_share"])

    def observe_arms(self, arms) -> None:
        """Size and allocation of every arm (at start and after each window: a re-shape)."""
        for arm in arms:
            self.arm_embedding_params.labels(arm.name).set(arm.embedding_params)
            self.arm_embedding_bytes.labels(arm.name).set(4 * arm.embedding_params)
            for f, d in arm.dims.items():
                self.arm_field_dim.labels(arm.name, f).set(d)

    def observe_window(self, window, record, arms) -> None:
        """A closed window: window counters and each arm's progressive quality (rows read and
        rejected are counted as they happen: ops/deadletters.py)."""
        self.windows_closed.inc()
        self.window_index.set(record.index)
        self.window_close_time.set(time.time())
        if window.read_seconds > 0:
            self.consume_rows_per_second.set(window.rows_read / window.read_seconds)
        for name, m in record.arms.items():
            if "auc" in m:
                self._observe_arm(name, m)
        self.observe_arms(arms)
        self.observe_vocab(arms)

    def _observe_arm(self, name: str, m: dict) -> None:
        self.arm_auc.labels(name).set(m["auc"])
        self.arm_logloss.labels(name).set(m["logloss"])
        self.arm_ctr_predicted.labels(name).set(m["ctr_pred"])
        self.arm_ctr_observed.labels(name).set(m["ctr_obs"])
        if m["ctr_obs"] > 0:
            self.arm_ctr_calibration.labels(name).set(m["ctr_pred"] / m["ctr_obs"])
        self.arm_train_rows_per_second.labels(name).set(m["train_rows_per_s"])
        d = m.get("auc_diff_vs_control")
        if d is not None:
            self.arm_auc_diff.labels(name).set(d["diff"])
            self.arm_auc_diff_low.labels(name).set(d["ci_low"])
            self.arm_auc_diff_high.labels(name).set(d["ci_high"])

    def watch_source(self, source) -> SourceStatusCollector:
        """Export a live source's status, read at every scrape."""
        collector = SourceStatusCollector(source)
        self.registry.register(collector)
        return collector


class SourceStatusCollector(Collector):
    """dimstream_kafka_* and dimstream_seconds_since_last_message from `source.status()`."""

    def __init__(self, source):
        self.source = source

    def describe(self):
        return self.collect(status=None)

    def collect(self, status="read"):
        if status == "read":
            status = self.source.status()
        up = GaugeMetricFamily("dimstream_kafka_up", "1 if the Kafka broker answers, else 0")
        lag = GaugeMetricFamily(
            "dimstream_kafka_consumer_lag_messages", "Consumer lag per partition", labels=["partition"]
        )
        since = GaugeMetricFamily(
            "dimstream_seconds_since_last_message", "Seconds since the source last delivered data"
        )
        handed = CounterMetricFamily(
            "dimstream_kafka_rows_handed_over",
            "Rows skipped after a rebalance or restart because an earlier owner of "
            "the partition had already trained them",
        )
        resets = CounterMetricFamily(
            "dimstream_source_offset_resets",
            "Partitions restarted from their earliest offset because their offsets went back "
            "(a broker that came back empty, a topic re-created)",
        )
        if status is not None:
            resets.add_metric([], float(status.offset_resets))
            up.add_metric([], 1.0 if status.up else 0.0)
            for partition, n in sorted(status.lag.items()):
                lag.add_metric([str(partition)], float(n))
            if status.last_message_time is not None:
                since.add_metric([], max(0.0, time.time() - status.last_message_time))
            handed.add_metric([], float(status.handed_over_rows))
        return [up, lag, since, handed, resets]
