"""`python -m testbed up` on a running mesh: the agents become the fleet file's, and no more."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from corpus import ROOT
from testbed.fleet import load_fleet
from testbed.mesh import (
    MeshProcess,
    agent_fingerprint,
    agent_name,
    departed,
    plan_agents,
)


@pytest.fixture
def live_pid() -> Iterator[int]:
    """A real process standing in for a running agent."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def running(name: str, fingerprint: str, pid: int) -> MeshProcess:
    return MeshProcess(agent_name(name), pid, f"/logs/{name}.log", fingerprint)


def test_agents_of_nodes_that_left_the_fleet_stop_and_their_nodes_are_named(
    live_pid: int,
) -> None:
    desired = {agent_name("a"): "a-v1"}
    recorded = [running("a", "a-v1", live_pid), running("b", "b-v1", live_pid)]
    assert [p.name for p in departed(desired, recorded)] == ["agent-b"]
    plan = plan_agents(desired, recorded)
    assert [p.name for p in plan.stop] == ["agent-b"]
    assert plan.start == ()


def test_a_re_scripted_node_restarts_its_agent_and_keeps_its_gpunode(live_pid: int) -> None:
    desired = {agent_name("a"): "a-rescripted"}
    plan = plan_agents(desired, [running("a", "a-v1", live_pid)])
    assert [p.name for p in plan.stop] == ["agent-a"]
    assert plan.start == ("agent-a",)
    assert departed(desired, [running("a", "a-v1", live_pid)]) == []


def test_new_and_dead_agents_start_and_running_ones_are_left_alone(live_pid: int) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    desired = {
        agent_name("a"): "a-v1",
        agent_name("b"): "b-v1",
        agent_name("c"): "c-v1",
    }
    recorded = [
        running("a", "a-v1", live_pid),
        running("b", "b-v1", dead.pid),
    ]
    plan = plan_agents(desired, recorded)
    assert plan.stop == ()
    assert plan.start == ("agent-b", "agent-c")


def test_the_operator_is_not_an_agent(live_pid: int) -> None:
    operator = MeshProcess("operator", live_pid, "/logs/operator.log")
    assert plan_agents({}, [operator]).stop == ()
    assert os.getpid() != live_pid


def test_the_same_node_in_another_fleet_file_keeps_its_fingerprint_and_a_changed_one_not() -> None:
    fleet = load_fleet(ROOT / "examples" / "fleet.yaml")
    supplier = fleet.suppliers[0]
    node = supplier.nodes[0]
    same = agent_fingerprint(supplier, node, "/kubeconfig", 2.0)
    assert agent_fingerprint(supplier.model_copy(), node.model_copy(), "/kubeconfig", 2.0) == same
    faulty = node.model_copy(update={"gpu_count": node.gpu_count - 1})
    assert agent_fingerprint(supplier, faulty, "/kubeconfig", 2.0) != same
    assert agent_fingerprint(supplier, node, "/kubeconfig", 1.0) != same
