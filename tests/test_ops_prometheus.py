"""The Prometheus scrape config and alert rules, checked by the real promtool."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

import ops.metrics as m
from tests.helpers import REPO

PROM = REPO / "ops" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"),
                                    reason="promtool not installed (apt-get install prometheus; CI installs it)")


def exported_names() -> set[str]:
    """Every series name the daemon exports (counters with _total, histograms' parts)."""
    names = set()
    for obj in vars(m).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                base = family.name
                if family.type == "counter":
                    names.add(base + "_total")
                elif family.type == "histogram":
                    names |= {base + s for s in ("_bucket", "_sum", "_count")}
                else:
                    names.add(base)
    return names


def _promtool(*args) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool must be installed on CI"
    return subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_config_and_rules_are_valid_and_the_rule_unit_tests_pass():
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"],
                 ["test", "rules", "rules_test.yml"]):
        r = _promtool(*args)
        assert r.returncode == 0, r.stdout + r.stderr
    r = _promtool("test", "rules", "rules_test.yml")
    assert "SUCCESS" in r.stdout


@needs_promtool
def test_a_broken_rule_unit_test_fails(tmp_path):
    """The rule tests can fail: the same tests against rules with a wrong threshold do."""
    (tmp_path / "rules.yml").write_text((PROM / "rules.yml").read_text().replace("> 0.01", "> 0.5"))
    (tmp_path / "rules_test.yml").write_text((PROM / "rules_test.yml").read_text())
    r = subprocess.run([PROMTOOL, "test", "rules", "rules_test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "DeadLetterRateHigh" in r.stdout + r.stderr


def test_every_metric_in_the_rules_is_exported():
    text = (PROM / "rules.yml").read_text()
    used = set(re.findall(r"\b(dimstream_[a-z_]+)", text))
    assert used and used <= exported_names(), used - exported_names()
