"""The charts installed into the local mesh as a mesh operator installs them, and the
identities the local gpumesh processes then run under.

- The operator chart: its RBAC, the agent admission policies and the operator's
  ServiceAccount. Its Deployment is scaled to zero: the operator runs here as a process,
  with a token of that ServiceAccount.
- One supplier chart release per fleet supplier: kwok runs its DaemonSet's pods on that
  supplier's nodes (the ``gpumesh.io/supplier`` label the fleet gives them stands for the
  mesh operator admitting them). Each node's agent process runs with a token bound to its
  own pod, as the kubelet would mount it, and as the user and with the capabilities the
  chart gives it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from kubernetes import client

from gpumesh.api.nodes import agent_account
from testbed import identity, toolchain
from testbed.fleet import Fleet

ROOT: Final = Path(__file__).resolve().parents[1]
CHARTS: Final = ROOT / "charts"
NAMESPACE: Final = "gpumesh-system"
OPERATOR_RELEASE: Final = "gpumesh"
OPERATOR_ACCOUNT: Final = "gpumesh-operator"
SUPPLIER_RELEASE_PREFIX: Final = "supplier-"
AGENT_POD_LABEL: Final = "app.kubernetes.io/name=gpumesh-agent"
AGENT_UID: Final = 65532
"""The user the image runs as (Dockerfile ``USER``), with the chart's one capability."""
AGENT_CAPABILITIES: Final = "net_admin"


class InstallError(RuntimeError):
    """A chart could not be installed, or its pods did not appear."""


def helm(kubeconfig: Path, *args: str) -> str:
    """Run the pinned helm against ``kubeconfig``; its output, or InstallError with why."""
    binary = toolchain.binary_path("helm")
    if not binary.exists():
        toolchain.ensure(["helm"], assets=False)
    done = subprocess.run(
        [str(binary), f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise InstallError(f"helm {' '.join(args[:3])}: {done.stderr.strip()}")
    return done.stdout


def install_operator_chart(kubeconfig: Path, namespace: str = NAMESPACE) -> None:
    """RBAC, admission policies and ServiceAccount; no operator pod (it runs here)."""
    helm(
        kubeconfig,
        "upgrade",
        "--install",
        OPERATOR_RELEASE,
        str(CHARTS / "gpumesh-operator"),
        "-n",
        namespace,
        "--create-namespace",
        "--skip-crds",  # applied server-side by the harness: too big for helm's annotations
        "--set",
        "replicas=0",
    )


def supplier_release(supplier: str) -> str:
    return f"{SUPPLIER_RELEASE_PREFIX}{supplier}"


def install_supplier_chart(
    kubeconfig: Path,
    supplier: str,
    region: str,
    price: str,
    namespace: str = NAMESPACE,
    *,
    head_capable: bool = False,
    mesh: bool = False,
) -> None:
    """One supplier's release: its ServiceAccount, RBAC and agent DaemonSet."""
    helm(
        kubeconfig,
        "upgrade",
        "--install",
        supplier_release(supplier),
        str(CHARTS / "gpumesh-supplier"),
        "-n",
        namespace,
        "--set-string",
        f"supplier={supplier},region={region},pricePerGpuHour={price},"
        f"mesh.operatorNamespace={namespace}",
        "--set",
        f"headCapable={str(head_capable).lower()},mesh.enabled={str(mesh).lower()}",
    )


def install_supplier_charts(
    kubeconfig: Path, fleet: Fleet, namespace: str = NAMESPACE, *, prune: bool = True
) -> list[str]:
    """One release per supplier, as its fleet entry says; ``prune`` uninstalls releases of
    suppliers no longer in the fleet. Returns the suppliers pruned."""
    for supplier in fleet.suppliers:
        price = supplier.model_dump(mode="json", by_alias=True)["pricePerGpuHour"]
        install_supplier_chart(
            kubeconfig,
            supplier.name,
            supplier.region,
            price,
            namespace,
            head_capable=supplier.head_capable,
        )
    if not prune:
        return []
    listed = json.loads(helm(kubeconfig, "list", "-n", namespace, "-o", "json") or "[]")
    wanted = {supplier_release(s.name) for s in fleet.suppliers}
    pruned = []
    for release in listed:
        name = str(release.get("name", ""))
        if name.startswith(SUPPLIER_RELEASE_PREFIX) and name not in wanted:
            helm(kubeconfig, "uninstall", name, "-n", namespace)
            pruned.append(name.removeprefix(SUPPLIER_RELEASE_PREFIX))
    return pruned


def agent_pods(
    api: client.ApiClient, nodes: Mapping[str, str], namespace: str = NAMESPACE, timeout: float = 60
) -> dict[str, Any]:
    """Each node's agent pod (a V1Pod bound to it), once the DaemonSets made them all.

    ``nodes`` maps node names to their suppliers.
    """
    core: Any = client.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    while True:
        listed = core.list_namespaced_pod(namespace, label_selector=AGENT_POD_LABEL)
        found = {
            p.spec.node_name: p
            for p in listed.items
            if p.spec.node_name in nodes
            and p.metadata.deletion_timestamp is None
            and p.spec.service_account_name == agent_account(nodes[p.spec.node_name])
        }
        if set(found) >= set(nodes):
            return found
        if time.monotonic() > deadline:
            missing = sorted(set(nodes) - set(found))
            raise InstallError(f"no agent pod on {', '.join(missing)} after {timeout:.0f}s")
        time.sleep(0.2)


def agent_kubeconfig(
    api: client.ApiClient,
    admin_kubeconfig: Path,
    supplier: str,
    pod: Any,
    directory: Path,
    namespace: str = NAMESPACE,
) -> Path:
    """A kubeconfig holding a token bound to ``pod``, readable by the agent's user only."""
    token = identity.service_account_token(api, namespace, agent_account(supplier), pod)
    node = pod.spec.node_name
    path = identity.write_token_kubeconfig(
        admin_kubeconfig, token, directory / f"agent-{node}.yaml", f"agent-{node}"
    )
    if os.geteuid() == 0:
        os.chown(path, AGENT_UID, AGENT_UID)
    return path


def operator_kubeconfig(
    api: client.ApiClient, admin_kubeconfig: Path, directory: Path, namespace: str = NAMESPACE
) -> Path:
    """A kubeconfig holding a token of the operator chart's ServiceAccount."""
    token = identity.service_account_token(api, namespace, OPERATOR_ACCOUNT)
    return identity.write_token_kubeconfig(
        admin_kubeconfig, token, directory / "operator.yaml", "gpumesh-operator"
    )


def as_agent_user(argv: list[str]) -> list[str]:
    """``argv`` run as the chart runs the agent: its user, and NET_ADMIN only.

    Needs root to switch; otherwise the command runs as the calling user.
    """
    if os.geteuid() != 0:
        return argv
    caps = f"-all,+{AGENT_CAPABILITIES}"
    return [
        "setpriv",
        f"--reuid={AGENT_UID}",
        f"--regid={AGENT_UID}",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        f"--bounding-set={caps}",
        "--",
        *argv,
    ]


class Identities:
    """What each fleet node's agent runs as, the charts installed: a token bound to its
    node's agent pod, and the chart's user and capability.

    The files those agents read (their kubeconfigs, a fleet file) live in ``home``, a
    directory the agents' user can enter but not list; kubeconfigs are readable by that
    user only.
    """

    def __init__(
        self,
        api: client.ApiClient,
        admin_kubeconfig: Path,
        fleet: Fleet,
        home: Path,
        namespace: str = NAMESPACE,
    ) -> None:
        self.api = api
        self.admin_kubeconfig = admin_kubeconfig
        self.namespace = namespace
        self.home = _private_home(home)
        self.suppliers = {node.name: supplier.name for supplier, node in fleet.nodes()}
        self.pods = agent_pods(api, self.suppliers, namespace)

    @classmethod
    def install(
        cls,
        api: client.ApiClient,
        admin_kubeconfig: Path,
        fleet: Fleet,
        home: Path,
        *,
        prune: bool = True,
    ) -> Identities:
        """Install (or upgrade) both charts for ``fleet``, then read its agents' pods."""
        install_operator_chart(admin_kubeconfig)
        install_supplier_charts(admin_kubeconfig, fleet, prune=prune)
        return cls(api, admin_kubeconfig, fleet, home)

    def pod_uid(self, node: str) -> str:
        """The agent pod's uid: a token is valid only while that very pod exists."""
        return str(self.pods[node].metadata.uid)

    def kubeconfig(self, node: str) -> Path:
        """A kubeconfig for ``node``'s agent, with a fresh token bound to its pod."""
        return agent_kubeconfig(
            self.api,
            self.admin_kubeconfig,
            self.suppliers[node],
            self.pods[node],
            self.home,
            self.namespace,
        )

    def operator_kubeconfig(self) -> Path:
        return operator_kubeconfig(self.api, self.admin_kubeconfig, self.home, self.namespace)

    def share(self, source: Path) -> Path:
        """A copy of ``source`` the agents' user can read (a fleet file, say)."""
        target = self.home / source.name
        target.write_bytes(source.read_bytes())
        target.chmod(0o644)
        return target


def _private_home(home: Path) -> Path:
    """``home``, made: root's, enterable but not listable by the agents' user (0711)."""
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o711)
    return home


def agents_home(key: str) -> Path:
    """Where a mesh's agent files go: outside any root-only home directory (the agents'
    user could not reach into ~root), one folder per ``key``."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"gpumesh-agents-{digest}"
