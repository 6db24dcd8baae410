"""``gpumesh agent probe``: one look at the host's GPUs, fit to join or not, as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gpumesh.clock import SystemClock
from gpumesh.node_agent.cli import app
from gpumesh.node_agent.health import HealthPolicy
from gpumesh.node_agent.nvml.fake import fake_from_fleet, load_fleet_node
from gpumesh.node_agent.probe import probe as probe_node

FLEET = """suppliers:
  - name: probe-dc
    region: eu-west
    pricePerGpuHour: "2.00"
    nodes:
      - name: good-0
        gpuModel: NVIDIA H100 80GB HBM3
        gpuCount: 2
        gpuMemoryMiB: 81559
        computeCapability: "9.0"
      - name: hot-0
        gpuModel: NVIDIA H100 80GB HBM3
        gpuCount: 1
        gpuMemoryMiB: 81559
        computeCapability: "9.0"
        faults:
          - {atSeconds: 0, gpuIndex: 0, kind: thermal}
      - name: lost-0
        gpuModel: NVIDIA H100 80GB HBM3
        gpuCount: 2
        gpuMemoryMiB: 81559
        computeCapability: "9.0"
        faults:
          - {atSeconds: 0, gpuIndex: 1, kind: gpu_lost}
      - name: liar-0
        gpuModel: NVIDIA H100 80GB HBM3
        gpuCount: 1
        gpuMemoryMiB: 81559
        computeCapability: "9.0"
        cheat: WrongAnswer
"""


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET)
    return path


def probe(fleet: Path, node: str, *extra: str) -> tuple[int, Any]:
    result = CliRunner().invoke(app, ["probe", "--node", node, "--fake-nvml", str(fleet), *extra])
    return result.exit_code, json.loads(result.stdout)


def test_a_healthy_node_whose_products_check_out_is_fit(fleet: Path) -> None:
    code, report = probe(fleet, "good-0", "--proof")
    assert code == 0
    assert report["fit"] is True
    assert report["health"] == "Healthy"
    gpus = report["gpus"]
    assert [g["identity"]["name"] for g in gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    proof = report["proof"]
    assert (proof["engine"], proof["gpus"], proof["checked"]) == ("numpy", 2, 32)
    assert proof["problem"] is None


def test_without_proof_no_challenge_runs(fleet: Path) -> None:
    code, report = probe(fleet, "good-0")
    assert code == 0
    assert "proof" not in report


def test_wrong_products_make_the_node_unfit_and_say_which_entry(fleet: Path) -> None:
    code, report = probe(fleet, "liar-0", "--proof")
    assert code == 1
    assert report["fit"] is False
    assert " is " in report["proof"]["problem"] and ", not " in report["proof"]["problem"]


def test_a_lost_gpu_makes_the_node_unfit_and_says_which(fleet: Path) -> None:
    code, report = probe(fleet, "lost-0")
    assert code == 1
    assert report["health"] == "Lost"
    gpus = report["gpus"]
    assert [g["health"] for g in gpus] == ["Healthy", "Lost"]
    assert gpus[1]["reasons"]


def test_a_degraded_gpu_may_still_join_as_placement_takes_it(fleet: Path) -> None:
    """One sweep: the policy degrades on the first throttled reading (the agent's default
    waits for two, so one hot reading does not flap a running node)."""
    backend = fake_from_fleet(load_fleet_node(fleet, "hot-0"))
    policy = HealthPolicy(degrade_after_sweeps=1)
    report, fit = probe_node(backend, "hot-0", SystemClock(), policy=policy)
    assert report["health"] == "Degraded"
    assert fit
