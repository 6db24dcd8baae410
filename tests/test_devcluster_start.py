"""Starting the dev cluster: each step's wait counts from when that step begins.

A first `make up` builds the toolchain for many minutes before anything starts; a deadline
taken before that build has run out by the time etcd starts. These tests play a start on a
fake clock with a 15-minute build, and stand-in processes (`sleep`) for the components.
"""

from __future__ import annotations

import io
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from testbed import cluster as cluster_mod
from testbed import toolchain
from testbed.cluster import STEP_TIMEOUT_S, ClusterError, ComponentRecord, LocalCluster

COLD_BUILD_S = 900.0
READY_AFTER_POLLS = 25  # 5 s of 0.2 s polls


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeApi:
    """The API server as the start steps see it: ready after a few polls."""

    def __init__(self, polls: Counter[str]) -> None:
        self.polls = polls

    def ok(self, path: str) -> bool:
        self.polls["kube-apiserver"] += 1
        return self.polls["kube-apiserver"] >= READY_AFTER_POLLS

    def get(self, path: str) -> dict[str, Any]:
        return {"metadata": {"name": "default"}}


class StandInCluster(LocalCluster):
    """Real start logic; `sleep` processes instead of the components, a fake API client."""

    polls: Counter[str]

    def _spawn(
        self, name: str, argv: list[str], health: str, env: dict[str, str] | None
    ) -> ComponentRecord:
        return super()._spawn(name, ["sleep", "600"], health, env)

    def client(self) -> Any:
        return FakeApi(self.polls)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def started(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> tuple[StandInCluster, dict[str, float]]:
    """A cluster whose toolchain build takes 15 fake minutes; when each step began."""
    began: dict[str, float] = {}

    def cold_build(*_args: object, **_kwargs: object) -> toolchain.Toolchain:
        clock.advance(COLD_BUILD_S)
        names = toolchain.CLUSTER_BINARIES
        return toolchain.Toolchain(tmp_path, {n: Path("/bin/sleep") for n in names}, (), ())

    polls: Counter[str] = Counter()

    def probe(url: str) -> bool:
        polls[url] += 1
        began.setdefault(url, clock.now)
        return polls[url] >= READY_AFTER_POLLS

    monkeypatch.setattr(toolchain, "ensure", cold_build)
    monkeypatch.setattr(cluster_mod, "probe", probe)
    monkeypatch.setattr(cluster_mod, "_add_local_route", lambda _state: False)
    cluster = StandInCluster(
        tmp_path / "state",
        console=Console(file=io.StringIO()),
        ephemeral=True,
        clock=clock,
        sleep=clock.advance,
    )
    cluster.polls = polls
    return cluster, began


def test_a_cold_toolchain_build_is_not_charged_to_the_start_steps(
    started: tuple[StandInCluster, dict[str, float]], clock: FakeClock
) -> None:
    cluster, _ = started
    try:
        status = cluster.up()
        assert {c.name for c in status.components} == set(cluster_mod.COMPONENT_ORDER)
        assert clock.now - 1000.0 > COLD_BUILD_S > STEP_TIMEOUT_S  # far longer than one budget
    finally:
        cluster.down()


def test_a_step_that_never_gets_ready_times_out_one_budget_after_it_began(
    started: tuple[StandInCluster, dict[str, float]],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster, began = started

    def etcd_never_answers(url: str) -> bool:
        began.setdefault(url, clock.now)
        return False

    monkeypatch.setattr(cluster_mod, "probe", etcd_never_answers)
    with pytest.raises(ClusterError, match=r"timed out waiting for etcd \(180s\)"):
        cluster.up()
    (etcd_began,) = began.values()
    assert etcd_began >= 1000.0 + COLD_BUILD_S
    assert clock.now - etcd_began == pytest.approx(STEP_TIMEOUT_S, abs=0.5)
    assert not any(r.pid for r in _alive_records(cluster)), "the failed start stops what it began"


def _alive_records(cluster: LocalCluster) -> list[ComponentRecord]:
    return [
        r
        for r in cluster_mod._State.load(cluster.state_dir / "state.json").components
        if cluster_mod._alive(r)
    ]


def test_stand_in_processes_are_gone_after_down(
    started: tuple[StandInCluster, dict[str, float]],
) -> None:
    cluster, _ = started
    cluster.up()
    pids = [c.pid for c in cluster.status().components]
    cluster.down()
    alive = subprocess.run(["ps", "-o", "pid=", "-p", ",".join(map(str, pids))], check=False)
    assert alive.returncode != 0
