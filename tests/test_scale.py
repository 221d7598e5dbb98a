"""`dimstream plan` (TorchRec's planner on hardware not at hand) and the scale-out manifest."""

from __future__ import annotations

import yaml

from dimstream.ops.cli import build_parser, main
from tests.helpers import REPO

MANIFEST = REPO / "ops" / "k8s" / "scaleout.yaml"
CRITEO = REPO / "ops" / "examples" / "criteo-1tb.toml"


def test_plan_for_8_gpus_of_a_criteo_1tb_schema_shards_every_table_and_the_slim_arm_takes_a_quarter(capsys):
    assert (
        main(["plan", "--world-size", "8", "--device", "cuda", "--memory-per-rank", "80", "--config", str(CRITEO)]) == 0
    )
    out = capsys.readouterr().out
    control, slim = out.split("\ncontrol (")[1].split("\nslim (")
    assert "24,034,333,568 embedding parameters" in control and "6,008,583,392 embedding parameters" in slim
    for part in (control, slim):
        rows = [line.split() for line in part.splitlines() if line[:4].strip().isdigit()]
        assert [int(r[0]) for r in rows] == list(range(8))  # one line per rank
        per_rank = [float(r[1]) for r in rows]
        assert all(0 < m <= 80 for m in per_rank)  # every rank holds shards, within its memory
    total = {p: float(p.split("total memory ")[1].split(" GB")[0]) for p in (control, slim)}
    assert 0.2 < total[slim] / total[control] < 0.3  # a quarter of the parameters, a quarter of the memory


def test_plan_refuses_a_schema_that_does_not_fit_in_one_line(capsys):
    code = main(["plan", "--world-size", "1", "--device", "cuda", "--memory-per-rank", "1", "--config", str(CRITEO)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dimstream: error: no plan for 1 x cuda")


def test_the_scale_out_manifest_runs_the_cli_under_torchrun_with_one_rank_per_pod_and_a_rendezvous():
    svc, sts, pvc = yaml.safe_load_all(MANIFEST.read_text())
    assert svc["kind"] == "Service" and svc["spec"]["clusterIP"] == "None"
    assert sts["kind"] == "StatefulSet" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["torchrun"]
    args = c["args"]
    opt = {
        args[i]: args[i + 1] for i in range(args.index("--no-python")) if args[i].startswith("--") and i + 1 < len(args)
    }
    assert int(opt["--nnodes"]) == sts["spec"]["replicas"]  # scaled together
    host, port = opt["--rdzv-endpoint"].split(":")
    assert host == f"{sts['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]] and opt["--rdzv-backend"] == "c10d"
    cli = args[args.index("--no-python") + 1 :]
    assert cli[0] == "dimstream"
    build_parser().parse_args(cli[1:])  # the daemon's options as the real parser takes them
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    state_dir = cli[cli.index("--state-dir") + 1]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == state_dir)
    assert claims[mount["name"]] == pvc["metadata"]["name"] and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
