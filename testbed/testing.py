"""Small helpers shared by the e2e suite (and anyone else testing against a cluster).

They live in the package rather than in ``e2e/conftest.py`` so test modules can import
and type them normally.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from gpumesh.api.base import GROUP, VERSION
from testbed import install, mesh
from testbed.fleet import Fleet, load_fleet
from testbed.ports import free_port

T = TypeVar("T")


@dataclass(frozen=True)
class KubeTarget:
    """The cluster an e2e session runs against.

    ``state_dir`` is None for a cluster named by ``GPUMESH_E2E_KUBECONFIG`` (nothing local
    to inspect); ``fleet`` is None when no simulated fleet was applied (no kwok there).
    """

    kubeconfig: Path
    api: ApiClient
    state_dir: Path | None
    started_here: bool
    fleet: Fleet | None


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float = 60.0,
    interval: float = 0.25,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` on timeout.

    Controllers converge asynchronously, so tests wait for the state they assert on.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class OperatedMesh:
    """The shipped operator and one node agent per fleet node, as processes a test drives.

    The agents play the example fleet's GPUs through fake NVML with its scripted faults
    removed, so health stays steady (the node agent's own e2e covers faults).
    """

    api: ApiClient
    kubeconfig: Path
    logs: Path
    operator_env: dict[str, str] = field(default_factory=dict)
    operator_args: list[str] = field(default_factory=list)
    operator: subprocess.Popen[bytes] | None = None
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    """Each fleet node's agent, by node."""
    agent_argvs: dict[str, list[str]] = field(default_factory=dict)
    operator_kubeconfig: Path | None = None
    identities: install.Identities | None = None
    replicas: dict[str, tuple[subprocess.Popen[bytes], int]] = field(default_factory=dict)
    """More operator replicas (standbys while another leads), by name: process, health port."""

    def share(self, path: Path) -> Path:
        """A copy of ``path`` the agents' user can read (their own files are not root's)."""
        assert self.identities is not None
        return self.identities.share(path)

    def start_operator(self) -> None:
        """The operator, on its ServiceAccount's token (the chart's RBAC, nothing more)."""
        self.operator = self._spawn_operator("operator", free_port())

    def start_replica(self, name: str) -> int:
        """One more operator replica, as the chart's second one; returns its health port."""
        port = free_port()
        self.replicas[name] = (self._spawn_operator(name, port), port)
        return port

    def _spawn_operator(self, name: str, health_port: int) -> subprocess.Popen[bytes]:
        env = {
            **mesh.DEV_OPERATOR_ENV,
            "KUBECONFIG": str(self.operator_kubeconfig or self.kubeconfig),
            **self.operator_env,
        }
        argv = [*mesh.operator_argv(health_port), *self.operator_args]
        return mesh.spawn(name, argv, self.logs, env)[0]

    def kill_operator(self) -> None:
        """SIGKILL, as a node failure or OOM would: no chance to clean up."""
        assert self.operator is not None
        self.operator.kill()
        self.operator.wait(10)

    def start_agent(self, node: str, *extra_args: str) -> None:
        """(Re)start ``node``'s agent, with ``extra_args`` after its usual ones."""
        running = self.agents.get(node)
        if running is not None and running.poll() is None:
            self.kill_agent(node)
        argv = [*self.agent_argvs[node], *extra_args]
        self.agents[node] = mesh.spawn(f"agent-{node}", argv, self.logs)[0]

    def kill_agent(self, node: str) -> None:
        """SIGKILL ``node``'s agent, as a crash or a hang would: no chance to clean up."""
        proc = self.agents[node]
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        procs = [*self.agents.values(), *([self.operator] if self.operator else [])]
        procs += [proc for proc, _ in self.replicas.values()]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def print_troubled_logs(self) -> None:
        """Show the tail of any log with a traceback or an error (pytest keeps it on failure)."""
        for log in sorted(self.logs.glob("*.log")):
            text = log.read_text()
            if "Traceback" in text or "ERROR" in text:
                print(f"--- {log.name}\n{text[-3000:]}")


def find_custom(
    api: ApiClient, group: str, version: str, namespace: str, plural: str, name: str
) -> dict[str, Any] | None:
    """A namespaced custom object, or None when it does not exist."""
    custom: Any = client.CustomObjectsApi(api)
    try:
        found: dict[str, Any] = custom.get_namespaced_custom_object(
            group, version, namespace, plural, name
        )
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    return found


def steady_fleet(source: Path, target: Path) -> Path:
    """The fleet file at ``source`` without scripted faults, written to ``target``."""
    doc = yaml.safe_load(source.read_text())
    for supplier in doc["suppliers"]:
        for node in supplier["nodes"]:
            node.pop("faults", None)
    target.write_text(yaml.safe_dump(doc))
    return target


def verified_gpunodes(api: ApiClient) -> set[str]:
    """GPUNodes whose Verified condition the operator set True."""
    custom: Any = client.CustomObjectsApi(api)
    found: dict[str, Any] = custom.list_cluster_custom_object(GROUP, VERSION, "gpunodes")
    return {
        i["metadata"]["name"]
        for i in found["items"]
        if any(
            c.get("type") == "Verified" and c.get("status") == "True"
            for c in (i.get("status") or {}).get("conditions") or []
        )
    }


def healthy_gpunodes(api: ApiClient) -> set[str]:
    custom: Any = client.CustomObjectsApi(api)
    found: dict[str, Any] = custom.list_cluster_custom_object(GROUP, VERSION, "gpunodes")
    items: list[dict[str, Any]] = found["items"]
    return {i["metadata"]["name"] for i in items if i.get("status", {}).get("health") == "Healthy"}


@contextmanager
def operated_mesh(
    kube: KubeTarget,
    workdir: Path,
    fleet_file: Path,
    namespaces: tuple[str, ...],
    operator_env: dict[str, Any] | None = None,
    operator_args: list[str] | None = None,
) -> Iterator[OperatedMesh]:
    """CRDs, charts and namespaces in place, agents reporting Healthy, then the operator.

    As `make up` runs them: each agent on a token bound to its node's agent pod, as the
    supplier chart's user; the operator on its ServiceAccount's token. Everything started
    here is stopped on the way out.
    """
    assert kube.fleet is not None, "this cluster has no simulated fleet for agents to play"
    mesh.apply_crds(kube.api)
    for namespace in (install.NAMESPACE, *namespaces):
        mesh.ensure_namespace(kube.api, namespace)
    ids = install.Identities.install(
        kube.api, kube.kubeconfig, kube.fleet, install.agents_home(str(workdir)), prune=False
    )
    steady = ids.share(steady_fleet(fleet_file, workdir / "fleet.yaml"))
    world = OperatedMesh(
        kube.api,
        kube.kubeconfig,
        workdir / "logs",
        {k: str(v) for k, v in (operator_env or {}).items()},
        list(operator_args or []),
        operator_kubeconfig=ids.operator_kubeconfig(),
        identities=ids,
    )
    try:
        for supplier, node in kube.fleet.nodes():
            own = ids.kubeconfig(node.name)
            argv = mesh.agent_argv(steady, supplier, node, own, interval=1.0)
            world.agent_argvs[node.name] = install.as_agent_user(argv)
            world.start_agent(node.name)
        gpu_nodes = {n.name for _, n in kube.fleet.nodes() if n.gpu_count}
        wait_for("every GPU node reported Healthy", lambda: healthy_gpunodes(kube.api) >= gpu_nodes)
        world.start_operator()
        honest = {n.name for _, n in load_fleet(fleet_file).nodes() if n.gpu_count and not n.cheat}
        wait_for("every honest GPU node verified", lambda: verified_gpunodes(kube.api) >= honest)
        yield world
    finally:
        world.stop()
        world.print_troubled_logs()
        shutil.rmtree(ids.home, ignore_errors=True)
