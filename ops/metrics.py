"""Every Prometheus metric dimstream exports, declared once (units in the names).

Labels:
  arm    -- model arm: "control", "slim", "uniform", ...
  field  -- feature (embedding table) name from the schema
  method -- dimension-search method: "sseds" or "ham"
  reason -- why rows/messages were rejected: see stream.decode.REASONS
  partition -- Kafka partition number (as a string)
  outcome -- "applied" or "rejected" (plans)
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# --- per arm: quality of the last closed window (progressive, test-then-train) ---
ARM_AUC = Gauge("dimstream_arm_auc", "Progressive AUC of the last closed window", ["arm"])
ARM_LOGLOSS = Gauge("dimstream_arm_logloss", "Progressive log-loss of the last closed window", ["arm"])
ARM_CTR_PREDICTED = Gauge("dimstream_arm_ctr_predicted_ratio", "Mean predicted CTR, last window", ["arm"])
ARM_CTR_OBSERVED = Gauge("dimstream_arm_ctr_observed_ratio", "Observed CTR, last window", ["arm"])
ARM_CTR_CALIBRATION = Gauge("dimstream_arm_ctr_calibration_ratio",
                            "Predicted over observed CTR, last window (1 = calibrated)", ["arm"])
ARM_AUC_DIFF = Gauge("dimstream_arm_auc_diff_vs_control", "AUC minus control's AUC, last window", ["arm"])
ARM_AUC_DIFF_LOW = Gauge("dimstream_arm_auc_diff_vs_control_ci_low",
                         "Lower end of the 95% interval of the AUC difference to control", ["arm"])
ARM_AUC_DIFF_HIGH = Gauge("dimstream_arm_auc_diff_vs_control_ci_high",
                          "Upper end of the 95% interval of the AUC difference to control", ["arm"])
ARM_EMBEDDING_PARAMS = Gauge("dimstream_arm_embedding_params", "Embedding parameters (rows x dims)", ["arm"])
ARM_EMBEDDING_BYTES = Gauge("dimstream_arm_embedding_bytes", "Embedding weights in bytes (fp32)", ["arm"])
ARM_ROWS_TRAINED = Counter("dimstream_arm_rows_trained_total", "Rows trained into the arm", ["arm"])
ARM_TRAIN_ROWS_PER_SECOND = Gauge("dimstream_arm_train_rows_per_second",
                                  "Training throughput of the last window", ["arm"])
ARM_FIELD_DIM = Gauge("dimstream_arm_field_embedding_dim", "Embedding dimension per arm and field (0 = pruned)",
                      ["arm", "field"])

# --- dimension search and re-allocation ---
SEARCH_DURATION = Histogram("dimstream_search_duration_seconds", "Duration of one dimension search",
                            ["method"], buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
SEARCH_LAST_SUCCESS = Gauge("dimstream_search_last_success_timestamp_seconds",
                            "Unix time of the last successful search", ["method"])
FIELD_CHECK_KEEP = Gauge("dimstream_field_check_keep",
                         "Last held-out field check: 1 if the field's removal raised held-out loss, else 0",
                         ["field"])
PLANS = Counter("dimstream_plans_total", "Allocation plans handled by the daemon", ["outcome"])
REALLOCATIONS = Counter("dimstream_reallocations_total", "Re-allocations applied to an arm", ["arm"])

# --- stream ---
ROWS_CONSUMED = Counter("dimstream_rows_consumed_total", "Rows read from the source")
ROWS_REJECTED = Counter("dimstream_rows_rejected_total", "Rows (or batches) rejected, by reason", ["reason"])
WINDOWS_CLOSED = Counter("dimstream_windows_closed_total", "Windows trained and checkpointed")
WINDOW_INDEX = Gauge("dimstream_window_index", "Index of the last closed window")
WINDOW_CLOSE_TIME = Gauge("dimstream_window_close_timestamp_seconds", "Unix time the last window closed")
WINDOW_SECONDS = Gauge("dimstream_window_length_seconds", "Configured window length (event time)")
KAFKA_UP = Gauge("dimstream_kafka_up", "1 if the Kafka broker answers, else 0")
KAFKA_ROWS_HANDED_OVER = Counter("dimstream_kafka_rows_handed_over_total",
                                 "Rows skipped after a rebalance or restart because an earlier owner of "
                                 "the partition had already trained them")
KAFKA_LAG = Gauge("dimstream_kafka_consumer_lag_messages", "Consumer lag per partition", ["partition"])
SECONDS_SINCE_LAST_MESSAGE = Gauge("dimstream_seconds_since_last_message",
                                   "Seconds since the source last delivered data")
CONSUME_ROWS_PER_SECOND = Gauge("dimstream_consume_rows_per_second", "Rows consumed per second (last window)")
MODEL_LOADED = Gauge("dimstream_model_loaded", "1 once a model is built or restored")
