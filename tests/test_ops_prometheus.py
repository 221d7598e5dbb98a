"""The Prometheus scrape config and alert rules, checked by the real promtool."""

import os
import re
import shutil
import subprocess

import pytest
import yaml

import dimstream.ops.metrics as m
from tests.helpers import REPO

PROM = REPO / "ops" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="promtool not installed (apt-get install prometheus; CI installs it)",
)


def exported_names() -> set[str]:
    """Every series name the daemon can export (counters with _total, histograms' parts), the
    source-status collector's included."""
    from prometheus_client.metrics import MetricWrapperBase

    metrics = m.Metrics()
    families = [f for obj in vars(metrics).values() if isinstance(obj, MetricWrapperBase) for f in obj.describe()]
    families += m.SourceStatusCollector(None).describe()
    names = set()
    for family in families:
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def _promtool(*args) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool must be installed on CI"
    return subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_config_and_rules_are_valid_and_the_rule_unit_tests_pass():
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "rules.yml"],
        ["test", "rules", "rules_test.yml"],
    ):
        r = _promtool(*args)
        assert r.returncode == 0, r.stdout + r.stderr
    r = _promtool("test", "rules", "rules_test.yml")
    assert "SUCCESS" in r.stdout


# One wrong edit per alert; the unit tests of rules_test.yml must catch each of them.
MUTATIONS = {
    "SlimAUCSignificantlyBelowControl": ("and on(job, instance) changes(dimstream_window_index[90m]) > 0", ""),
    "NoSuccessfulSearch": ("> 3 * 3600", "> 6 * 3600"),
    "NoWindowClosed": ("> 2 * dimstream_window_length_seconds", "> 2 * 3600"),
    "KafkaBrokerDown": ("for: 5m", "for: 1m"),
    "DeadLetterRateHigh": ("> 0.01", "> 0.5"),
    "MostRowsRejected": ("recent_ratio > 0.5", "recent_ratio > 0.95"),
}


@needs_promtool
@pytest.mark.parametrize("alert", sorted(MUTATIONS))
def test_a_broken_rule_fails_its_unit_test(tmp_path, alert):
    """The rule tests can fail: the same tests against a rule with a wrong edit do."""
    assert PROMTOOL, "promtool must be installed on CI"
    old, new = MUTATIONS[alert]
    rules = (PROM / "rules.yml").read_text()
    assert rules.count(old) == 1, f"mutation for {alert} no longer matches rules.yml"
    (tmp_path / "rules.yml").write_text(rules.replace(old, new))
    (tmp_path / "rules_test.yml").write_text((PROM / "rules_test.yml").read_text())
    assert subprocess.run([PROMTOOL, "check", "rules", "rules.yml"], cwd=tmp_path).returncode == 0
    r = subprocess.run(
        [PROMTOOL, "test", "rules", "rules_test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and alert in r.stdout + r.stderr, r.stdout + r.stderr


def test_every_alert_has_unit_tests_for_firing_and_not_firing():
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "SlimAUCSignificantlyBelowControl",
        "NoSuccessfulSearch",
        "NoWindowClosed",
        "KafkaBrokerDown",
        "DeadLetterRateHigh",
        "MostRowsRejected",
    }
    tests = yaml.safe_load((PROM / "rules_test.yml").read_text())
    fires, silent = set(), set()
    for t in tests["tests"]:
        for a in t.get("alert_rule_test", []):
            (fires if a["exp_alerts"] else silent).add(a["alertname"])
    assert fires == alerts and silent == alerts, (alerts - fires, alerts - silent)


def test_scrape_config_targets_the_daemon_metrics_addr():
    """prometheus.yml scrapes the CLI's default --metrics-addr and `dimstream serve`'s default
    --addr; the compose copy scrapes the daemon service."""
    from dimstream.ops.cli import build_parser
    from dimstream.ops.config import RunConfig

    serve = build_parser().parse_args(["serve", "--export-dir", "x"]).addr
    for name, want in (("prometheus.yml", [RunConfig.metrics_addr, serve]), ("compose.yml", ["daemon:9100"])):
        cfg = yaml.safe_load((PROM / name).read_text())
        assert cfg["rule_files"] == ["rules.yml"]
        targets = [t for sc in cfg["scrape_configs"] for s in sc["static_configs"] for t in s["targets"]]
        assert targets == want, (name, targets)
        assert all(sc.get("metrics_path", "/metrics") == "/metrics" for sc in cfg["scrape_configs"])


def test_every_metric_in_the_rules_is_exported():
    text = (PROM / "rules.yml").read_text()
    used = set(re.findall(r"\b(dimstream_[a-z_]+)", text))
    assert used and used <= exported_names(), used - exported_names()
