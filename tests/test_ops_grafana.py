"""The Grafana dashboard queries only what the daemon exports, in valid PromQL."""

import json
import re
import shutil
import subprocess

import yaml

import dimstream.ops.metrics as m
from tests.helpers import REPO
from tests.test_ops_prometheus import exported_names, needs_promtool

DASHBOARD = REPO / "ops" / "grafana" / "dashboards" / "dimstream.json"
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "le", "max_over_time", "label_values"}


def _exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def _labels() -> dict[str, set[str]]:
    """Every series name with its label names, from a live registry (the source-status
    collector included), so the test reads what a scrape would show."""
    from dimstream.stream.sources.base import SourceStatus

    class Live:  # a live source with one partition, for the collector's series
        def status(self):
            return SourceStatus(up=True, lag={"0": 1}, last_message_time=0.0, handed_over_rows=0)

    from dimstream.ops.serve import ServeMetrics  # the scoring server's own registry

    metrics, serve = m.Metrics(), ServeMetrics()
    metrics.watch_source(Live())
    out = {}
    for family in [*metrics.registry.collect(), *serve.registry.collect()]:
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    for obj in [*vars(metrics).values(), *vars(serve).values()]:  # labelled series with no sample yet
        if hasattr(obj, "_labelnames") and hasattr(obj, "_name"):
            for suffix in ("", "_total", "_bucket", "_sum", "_count"):
                out.setdefault(obj._name + suffix, set()).update(
                    set(obj._labelnames) | ({"le"} if suffix == "_bucket" else set())
                )
    return out


def test_every_query_names_an_exported_metric_with_its_labels():
    labels = _labels()
    exported = exported_names() | set(labels)  # the daemon's, and dimstream serve's
    exprs = _exprs()
    assert len(exprs) >= 14
    needed = {
        "dimstream_arm_auc",
        "dimstream_arm_logloss",
        "dimstream_arm_auc_diff_vs_control_ci_low",
        "dimstream_arm_ctr_predicted_ratio",
        "dimstream_arm_ctr_observed_ratio",
        "dimstream_arm_embedding_params",
        "dimstream_arm_field_embedding_dim",
        "dimstream_search_duration_seconds_bucket",
        "dimstream_kafka_consumer_lag_messages",
        "dimstream_arm_train_rows_per_second",
        "dimstream_rows_rejected_total",
        "dimstream_vocab_rows_in_use",
        "dimstream_vocab_evictions_total",
        "dimstream_vocab_default_row_lookup_ratio",
        "dimstream_serve_request_seconds_bucket",
        "dimstream_serve_model_lag_seconds",
        "dimstream_serve_reloads_total",
    }
    used = set()
    for e in exprs:
        for name, matchers in re.findall(r"(dimstream_[a-z_]+)(\{[^}]*\})?", e):
            assert name in exported, f"{name} is not exported ({e})"
            used.add(name)
            for label in re.findall(r"(\w+)\s*=~?", matchers):
                assert label in labels[name], f"{name} has no label {label!r} ({e})"
        for label in re.findall(r"by \(([^)]*)\)", e):
            for lab in (x.strip() for x in label.split(",")):
                assert any(lab in labels.get(n, set()) for n in re.findall(r"dimstream_[a-z_]+", e)), (lab, e)
    assert needed <= used, needed - used


@needs_promtool
def test_every_query_is_valid_promql(tmp_path):
    # Grafana substitutes its variables before the query reaches Prometheus.
    q = [e.replace("$arm", ".*").replace("$__rate_interval", "5m") for e in _exprs()]
    rules = {
        "groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(q)]}]
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(rules))
    r = subprocess.run(
        [shutil.which("promtool"), "check", "rules", str(tmp_path / "r.yml")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "bad.yml").write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(dimstream_rows_consumed_total[5m]"}]}
                ]
            }
        )
    )
    assert (
        subprocess.run(
            [shutil.which("promtool"), "check", "rules", str(tmp_path / "bad.yml")], capture_output=True
        ).returncode
        != 0
    )


def test_provisioning_points_at_the_dashboards():
    ds = yaml.safe_load((REPO / "ops/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((REPO / "ops/grafana/provisioning/dashboards/dimstream.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert "./ops/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
