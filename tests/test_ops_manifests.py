"""Cron, systemd and Kubernetes manifests: well-formed and consistent with the CLI and the daemon."""

import argparse
import configparser
import shlex

import yaml

from dimstream.ops.cli import build_parser
from tests.helpers import REPO


def subcommands() -> list[str]:
    """The names of every `dimstream` sub-command."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


OPS = REPO / "ops"


def _parses(argv: list[str]) -> None:
    """The arguments are accepted by the real `dimstream` parser (SystemExit on any error)."""
    build_parser().parse_args(argv)


def test_cron_line_runs_the_search_under_a_lock_hourly():
    line = [s for s in (OPS / "cron" / "crontab").read_text().splitlines() if s and not s.startswith("#")]
    assert len(line) == 1
    fields = line[0].split(None, 5)
    assert fields[1:5] == ["*", "*", "*", "*"] and fields[0].isdigit()
    cmd = shlex.split(fields[5].split(">>")[0])
    assert cmd[:2] == ["flock", "-n"] and cmd[3] == "dimstream"
    _parses(cmd[4:])
    assert cmd[4] == "search"


def test_kubernetes_cronjob_and_statefulset_agree():
    cron = yaml.safe_load((OPS / "cron" / "cronjob.yaml").read_text())
    sts = yaml.safe_load((OPS / "k8s" / "statefulset.yaml").read_text())
    svc = yaml.safe_load((OPS / "k8s" / "service.yaml").read_text())
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert sts["kind"] == "StatefulSet" and svc["kind"] == "Service"
    job = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    _parses(job["containers"][0]["args"])
    pod = sts["spec"]["template"]["spec"]
    daemon = pod["containers"][0]
    _parses(daemon["args"])
    assert daemon["args"][0] == "run" and "0.0.0.0:9100" in daemon["args"]
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9100}
    assert daemon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9100}
    grace = float(daemon["args"][daemon["args"].index("--grace-seconds") + 1])
    assert pod["terminationGracePeriodSeconds"] > grace  # the daemon stops before it is killed
    # the cron job mounts the daemon's claim: <template name>-<statefulset name>-0
    claim = f"{sts['spec']['volumeClaimTemplates'][0]['metadata']['name']}-{sts['metadata']['name']}-0"
    assert job["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    mount = {v["name"]: v["mountPath"] for v in daemon["volumeMounts"]}
    assert mount[sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]] == "/var/lib/dimstream"
    assert job["containers"][0]["volumeMounts"][0]["mountPath"] == "/var/lib/dimstream"
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]


def test_systemd_units():
    units = {}
    for name in ("dimstream.service", "dimstream-search.service", "dimstream-search.timer"):
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.optionxform = str
        cp.read_string((OPS / "systemd" / name).read_text())
        units[name] = cp
    daemon = shlex.split(units["dimstream.service"]["Service"]["ExecStart"])
    assert daemon[0].endswith("dimstream") and daemon[1] == "run"
    _parses(daemon[1:])
    assert units["dimstream.service"]["Service"]["KillSignal"] == "SIGTERM"
    grace = float(daemon[daemon.index("--grace-seconds") + 1])
    assert float(units["dimstream.service"]["Service"]["TimeoutStopSec"]) > grace
    search = shlex.split(units["dimstream-search.service"]["Service"]["ExecStart"])
    assert search[1] == "search"
    _parses(search[1:])
    assert "OnCalendar" in units["dimstream-search.timer"]["Timer"]


def test_the_cli_has_the_commands_the_manifests_use():
    assert {"run", "search", "export", "predict", "report"} <= set(subcommands())
