"""The WireGuard mesh on real hosts: six network namespaces, wireguard-go, the real agents.

Each host runs ``python -m gpumesh.node_agent.wg run`` against the real control plane
(reached through :class:`~netns.ApiForwarder`): it publishes its public key into its
GPUNode status, renews its heartbeat Lease and watches the catalogue ConfigMap. The real
operator (``python -m gpumesh operator run``) plans the mesh: its namespace is the lab's,
and it takes only the lab's GPUNodes (``GPUMESH_MESH_NODE_SELECTOR``).

Hosts h0-h3 have public endpoints; h4 and h5 accept nothing new from the underlay
(nftables) and are reached through relays. The tests run in order on one lab, but each
first waits for the connectivity it builds on, so any one of them also runs alone.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from kubernetes.client import ApiClient
from netns import GPUNODES_PATH, Host, Lab, missing_prerequisites

from gpumesh.api.mesh import CATALOGUE_KEY, CATALOGUE_NAME
from gpumesh.api.nodes import LABEL_MESH_RELAY
from gpumesh.node_agent.kube import KubeError, RestKubeApi
from gpumesh.operator.mesh import MeshConfig
from testbed import install
from testbed import mesh as devmesh
from testbed.fleet import Supplier, node_manifest
from testbed.ports import free_port
from testbed.testing import KubeTarget, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = MeshConfig(
    overlay_cidr="198.19.0.0/24",
    pod_cidr="198.19.128.0/17",
    pod_prefix=24,
    cooldown_s=600,
)
LEASE_S = 2
INITIAL_HOSTS = 6
NATD = (4, 5)
JOIN_DEADLINE_S = 5.0
METRICS_PORT = 9464  # on 127.0.0.1 inside each host's namespace
RTT_INTERVAL_S = 0.5
RTT_MAX_PEERS = INITIAL_HOSTS - 2
"""Fewer than the other members: each agent leaves one out and publishes a floor."""


def region_of(index: int) -> str:
    """Two regions, each with public hosts and one of the NAT'd ones (4 in a, 5 in b)."""
    return "lab-a" if index % 2 == 0 else "lab-b"


@dataclass
class Mesh:
    lab: Lab
    api: RestKubeApi
    operator: subprocess.Popen[bytes]
    operator_log: Path
    namespace: str
    kubeconfig: Path
    api_port: int
    kube_api: ApiClient
    identities: Path
    """Where the hosts' agents' kubeconfigs go (each holds its own pod's token)."""

    @property
    def supplier(self) -> str:
        """The lab's supplier: one per lab, so its release's cluster-wide names are its own."""
        return f"lab-{self.lab.tag}"

    def admit(self, host: Host, index: int, *, public: bool) -> Path:
        """The host's Node, as the mesh operator admits it (public hosts may relay), and a
        kubeconfig holding a token bound to the agent pod the supplier chart puts there."""
        supplier = Supplier.model_validate(
            {
                "name": self.supplier,
                "region": region_of(index),
                "pricePerGpuHour": "1.00",
                "nodes": [{"name": host.name, "cpu": "4", "memory": "8Gi"}],
            }
        )
        node = node_manifest(supplier, supplier.nodes[0])
        node["metadata"]["labels"]["gpumesh.io/mesh-e2e"] = self.lab.tag
        if public:
            node["metadata"]["labels"][LABEL_MESH_RELAY] = "true"
        self.api.request("POST", "/api/v1/nodes", node)
        self.api.request(
            "PATCH",
            f"/api/v1/nodes/{host.name}/status",
            {"status": node["status"]},
            content_type="application/merge-patch+json",
        )
        pods = install.agent_pods(self.kube_api, {host.name: self.supplier}, self.namespace)
        return install.agent_kubeconfig(
            self.kube_api,
            self.kubeconfig,
            self.supplier,
            pods[host.name],
            self.identities,
            self.namespace,
        )

    def republish(self) -> int:
        """The operator's catalogue again, unchanged but under a new generation.

        The operator writes only changes; this plays a republication (as after a restore
        from backup) so the agents must compare and find nothing to do.
        """
        path = f"/api/v1/namespaces/{self.namespace}/configmaps/{CATALOGUE_NAME}"
        configmap = self.api.request("GET", path)
        doc = json.loads(configmap["data"][CATALOGUE_KEY])
        doc["generation"] += 1
        configmap["data"][CATALOGUE_KEY] = json.dumps(doc, separators=(",", ":"))
        self.api.request("PUT", path, configmap)
        return int(doc["generation"])

    @property
    def alive(self) -> list[Host]:
        return [h for h in self.lab.hosts if h.alive]

    def relay_of(self, natd: Host) -> Host:
        """The host the operator chose to relay for ``natd``."""
        name = self.status_mesh(natd)["relay"]
        return next(h for h in self.lab.hosts if h.name == name)

    def host(self, index: int) -> Host:
        return next(h for h in self.lab.hosts if h.index == index)

    def add(self, index: int, *, public: bool) -> Host:
        """A new host: namespace, wireguard-go, its Node as the mesh operator admits it
        (public hosts may relay), GPUNode, agent (in that order)."""
        host = self.lab.add_host(index, public=public)
        self.lab.start_wireguard(host)
        self.lab.forward_api(host, self.api_port)
        own = self.admit(host, index, public=public)
        spec: dict[str, Any] = {
            "supplier": self.supplier,
            "region": region_of(index),
            "pricePerGpuHour": "1.00",
        }
        if public:
            spec["publicEndpoint"] = host.endpoint
        self.api.request(
            "POST",
            GPUNODES_PATH,
            {
                "apiVersion": "gpumesh.io/v1alpha1",
                "kind": "GPUNode",
                "metadata": {"name": host.name, "labels": {"gpumesh.io/mesh-e2e": self.lab.tag}},
                "spec": spec,
            },
        )
        args = [
            f"--node={host.name}",
            f"--interface={host.interface}",
            "--backend=uapi",
            f"--key-dir={host.key_dir}",
            f"--listen-port={host.listen_port}",
            "--mtu=1420",
            f"--kubeconfig={own}",
            f"--namespace={self.namespace}",
            "--resync=1",
            f"--lease-duration={LEASE_S}",
            "--lease-renew=0.5",
            f"--metrics-port={METRICS_PORT}",
            "--metrics-address=127.0.0.1",
            f"--rtt-interval={RTT_INTERVAL_S}",
            "--rtt-publish-min=1",
            f"--rtt-max-peers={RTT_MAX_PEERS}",
            "--status-check=2",
        ]
        if public:
            args.append(f"--endpoint={host.endpoint}")
        self.lab.start_agent(host, args)
        return host

    def assigned(self, host: Host) -> bool:
        """Once the operator has given the host its addresses, put the pod address up."""
        if host.pod_address is not None:
            return True
        mesh = (self.api.request("GET", f"{GPUNODES_PATH}/{host.name}").get("status") or {}).get(
            "mesh"
        ) or {}
        if not (mesh.get("overlayIp") and mesh.get("podCidr") and mesh.get("publicKey")):
            return False
        host.overlay_ip = mesh["overlayIp"]
        self.lab.add_pod_address(host, mesh["podCidr"])
        return True

    def wg_dump(self, host: Host) -> dict[str, dict[str, str]]:
        """``wg show <iface> dump`` (Debian's wg, not our parser): peer key -> fields."""
        out = subprocess.run(
            ["wg", "show", host.interface, "dump"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        peers: dict[str, dict[str, str]] = {}
        for line in out[1:]:
            key, _psk, endpoint, ips, handshake, rx, tx, keepalive = line.split("\t")
            peers[key] = {
                "endpoint": endpoint,
                "allowed_ips": ips,
                "handshake": handshake,
                "rx": rx,
                "tx": tx,
                "keepalive": keepalive,
            }
        return peers

    def status_mesh(self, host: Host) -> dict[str, Any]:
        """``status.mesh`` of the host's GPUNode as the API server holds it."""
        body = self.api.request("GET", f"{GPUNODES_PATH}/{host.name}")
        mesh: dict[str, Any] = (body.get("status") or {}).get("mesh") or {}
        return mesh

    def public_key(self, host: Host) -> str:
        return (host.key_dir / "public.key").read_text().strip()

    def metrics(self, host: Host) -> str:
        script = (
            "import urllib.request;print(urllib.request.urlopen("
            f"'http://127.0.0.1:{METRICS_PORT}/metrics', timeout=5).read().decode())"
        )
        return subprocess.run(
            ["ip", "netns", "exec", host.ns, sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout

    def generation_applied(self, host: Host, generation: int) -> bool:
        return f"applied generation {generation}:" in host.agent_log.read_text(errors="replace")


def _api_port(kubeconfig: Path) -> int:
    doc = yaml.safe_load(kubeconfig.read_text())
    server = urlparse(doc["clusters"][0]["cluster"]["server"])
    if server.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip(f"the lab forwards only a loopback API server, not {server.hostname}")
    return int(server.port or 443)


def _ensure_crd(api: RestKubeApi) -> None:
    crd = yaml.safe_load((ROOT / "crds" / "gpumesh.io_gpunodes.yaml").read_text())
    api.request(
        "PATCH",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gpunodes.gpumesh.io"
        "?fieldManager=gpumesh-e2e&force=true",
        crd,
        content_type="application/apply-patch+yaml",
    )

    def served() -> bool:
        try:
            api.request("GET", GPUNODES_PATH)
        except KubeError:
            return False
        return True

    wait_for("the GPUNode CRD to be served", served, timeout=60)


def _operator_env(kubeconfig: Path, namespace: str, tag: str) -> dict[str, str]:
    return {
        "KUBECONFIG": str(kubeconfig),
        "GPUMESH_NAMESPACE": namespace,
        "GPUMESH_MESH_OVERLAY_CIDR": CONFIG.overlay_cidr,
        "GPUMESH_MESH_POD_CIDR": CONFIG.pod_cidr,
        "GPUMESH_MESH_POD_PREFIX": str(CONFIG.pod_prefix),
        "GPUMESH_MESH_COOLDOWN_SECONDS": str(CONFIG.cooldown_s),
        "GPUMESH_MESH_NODE_SELECTOR": f"gpumesh.io/mesh-e2e={tag}",
    }


@pytest.fixture(scope="module")
def mesh(kube: KubeTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    why = missing_prerequisites()
    if why:
        pytest.fail(f"mesh lab: {why}", pytrace=False)
    api = RestKubeApi(kube.api)
    _ensure_crd(api)
    lab = Lab()
    namespace = f"mesh-e2e-{lab.tag}"
    logs = tmp_path_factory.mktemp("mesh-operator")
    operator: subprocess.Popen[bytes] | None = None
    try:
        lab.open()  # checks the address ranges first; fails clearly when one is in use
        api.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        )
        argv = [*devmesh.operator_argv(free_port()), "--metrics-port=0"]
        operator, _ = devmesh.spawn(
            "operator", argv, logs, env=_operator_env(kube.kubeconfig, namespace, lab.tag)
        )
        m = Mesh(
            lab,
            api,
            operator,
            logs / "operator.log",
            namespace,
            kube.kubeconfig,
            _api_port(kube.kubeconfig),
            kube.api,
            tmp_path_factory.mktemp("identities"),
        )
        # The agent policies, and the lab supplier's identity, RBAC and DaemonSet.
        install.install_operator_chart(kube.kubeconfig)
        install.install_supplier_chart(
            kube.kubeconfig, m.supplier, "lab-a", "1.00", namespace, mesh=True
        )
        for i in range(INITIAL_HOSTS):
            m.add(i, public=i not in NATD)
        for host in lab.hosts:
            wait_for(f"{host.name} to get its addresses", partial(m.assigned, host), timeout=30)
        yield m
    finally:
        if operator is not None:
            devmesh.stop([devmesh.MeshProcess("operator", operator.pid, "")])
            operator.wait(10)
            text = (logs / "operator.log").read_text(errors="replace")
            if "Traceback" in text:
                print(f"operator log:\n{text[-20000:]}")
        for host in lab.hosts:
            for path in (f"{GPUNODES_PATH}/{host.name}", f"/api/v1/nodes/{host.name}"):
                with contextlib.suppress(KubeError):
                    api.request("DELETE", path)
        with contextlib.suppress(install.InstallError):
            install.helm(
                kube.kubeconfig,
                "uninstall",
                install.supplier_release(f"lab-{lab.tag}"),
                "-n",
                namespace,
            )
        with contextlib.suppress(KubeError):
            api.request("DELETE", f"/api/v1/namespaces/{namespace}")
        lab.close()
        leftovers = lab.leftovers()
        assert not leftovers, f"the lab left {leftovers} behind"


def learned_endpoint(mesh: Mesh, relay: Host, natd: Host) -> bool:
    """The relay's WireGuard device holds the NAT'd host's real (underlay) endpoint."""
    return bool(mesh.wg_dump(relay)[mesh.public_key(natd)]["endpoint"].startswith(natd.underlay_ip))


def publishes_peer_endpoint(mesh: Mesh, relay: Host, natd: Host) -> bool:
    """The relay's GPUNode lists the NAT'd host's endpoint from its handshake (the lab's
    firewall translates no address, so it is the host's underlay address and port)."""
    seen = {"node": natd.name, "endpoint": natd.endpoint}
    return seen in (mesh.status_mesh(relay).get("peerEndpoints") or [])


def relayed_from_home(mesh: Mesh, natd: Host) -> bool:
    """The operator chose a relay of the NAT'd host's own region (it may first have had
    one abroad, if its region's relays reported in after it)."""
    return region_of(mesh.relay_of(natd).index) == region_of(natd.index)


def lists_observed_endpoint(mesh: Mesh, natd: Host) -> bool:
    status = mesh.status_mesh(natd)
    return status.get("observedEndpoint") == natd.endpoint and natd.endpoint in (
        status.get("endpoints") or []
    )


def test_every_overlay_and_pod_address_answers_from_every_host(mesh: Mesh) -> None:
    took = mesh.lab.wait_connected(mesh.alive, timeout=30)
    print(f"full mesh of {len(mesh.alive)} hosts connected {took:.2f}s after the first probe")
    for index in NATD:
        natd = mesh.host(index)
        peers = mesh.wg_dump(natd)
        assert len(peers) == 1, f"{natd.name} should talk to its relay only: {peers}"
        (relay_peer,) = peers.values()
        assert relay_peer["keepalive"] == "25"
        relay = next(h for h in mesh.alive if h.public and h.underlay_ip in relay_peer["endpoint"])
        # The relay learns the NAT'd host's endpoint from its handshake only (the NAT'd
        # side initiates; under load that can take until its next keepalive).
        wait_for(
            f"{relay.name} to learn {natd.name}'s endpoint from a handshake",
            partial(learned_endpoint, mesh, relay, natd),
            timeout=30,
        )
        # ...and nobody else can open a path to it: the firewall drops new inbound.
        assert not mesh.lab.ping(mesh.host(3), natd.underlay_ip)
    relays = {mesh.wg_dump(mesh.host(i)).popitem()[1]["endpoint"] for i in NATD}
    assert len(relays) == 2, "the two NAT'd hosts should be spread over two relays"
    for index in NATD:
        natd = mesh.host(index)
        wait_for(
            f"{natd.name} to be relayed from its own region",
            partial(relayed_from_home, mesh, natd),
            timeout=10,
        )
    natd = mesh.host(NATD[0])
    text = mesh.metrics(natd)
    assert 'mode="relayed"' in text and "gpumesh_mesh_peer_handshake_age_seconds{" in text
    assert f'gpumesh_mesh_peer_is_relay{{node="{natd.name}"' in text


def test_agents_publish_rtts_and_the_nat_mappings_their_handshakes_show(mesh: Mesh) -> None:
    mesh.lab.wait_connected(mesh.alive, timeout=30)
    names = {h.name for h in mesh.alive}

    others = len(names) - 1
    assert others > RTT_MAX_PEERS, "the lab is meant to exceed the bound"

    def rtts_complete() -> bool:
        """Each agent lists its nearest RTT_MAX_PEERS members and a floor for the rest."""
        for host in mesh.alive:
            status = mesh.status_mesh(host)
            listed = set(status.get("rttMs") or {})
            if len(listed) != RTT_MAX_PEERS or not listed <= names - {host.name}:
                return False
            if status.get("rttFloorMs") is None:
                return False
        return True

    started = time.monotonic()
    wait_for("every agent to publish its nearest RTTs and a floor", rtts_complete, timeout=30)
    print(f"RTTs over the mesh published by all {time.monotonic() - started:.2f}s later")
    for host in mesh.alive:
        status = mesh.status_mesh(host)
        rtts, floor = status["rttMs"], status["rttFloorMs"]
        print(f"{host.name} rttMs: {rtts}, rttFloorMs: {floor}")
        for peer, ms in rtts.items():
            assert 0 <= ms < 1000, f"{host.name} -> {peer}: {ms} ms"
        # The floor is the nearest member left out: no listed one is farther (10 us steps).
        assert max(rtts.values()) <= floor + 0.01
    natd = mesh.host(NATD[0])
    assert f'gpumesh_mesh_member_rtt_seconds{{member="{mesh.host(0).name}"' in mesh.metrics(natd)
    for index in NATD:
        natd = mesh.host(index)
        relay = next(h for h in mesh.alive if h.name == mesh.status_mesh(natd)["relay"])
        wait_for(
            f"{relay.name} to publish {natd.name}'s handshake endpoint",
            partial(publishes_peer_endpoint, mesh, relay, natd),
            timeout=30,
        )
        # The operator copies it to the NAT'd node; its agent lists it as a candidate.
        wait_for(
            f"{natd.name} to list the endpoint its relay saw",
            partial(lists_observed_endpoint, mesh, natd),
            timeout=30,
        )
    for host in mesh.alive:
        if host.public:
            assert mesh.status_mesh(host)["endpoints"] == [host.endpoint]


def test_key_rotation_reconnects_with_the_new_key(mesh: Mesh) -> None:
    mesh.lab.wait_connected(mesh.alive, timeout=30)
    host = mesh.host(3)
    old = mesh.public_key(host)
    started = time.monotonic()
    mesh.lab.signal_agent(host, signal.SIGUSR1)
    wait_for("the new key on disk", lambda: mesh.public_key(host) != old, timeout=10)
    mesh.lab.wait_connected(mesh.alive, timeout=20)
    print(f"reconnected {time.monotonic() - started:.2f}s after rotating {host.name}'s key")
    for other in mesh.alive:
        assert old not in mesh.wg_dump(other), f"{other.name} still has the old key"


def test_reapplying_an_unchanged_plan_causes_no_new_handshake(mesh: Mesh) -> None:
    mesh.lab.wait_connected(mesh.alive, timeout=30)
    before = {h.name: mesh.wg_dump(h) for h in mesh.alive}
    generation = mesh.republish()
    for host in mesh.alive:
        mesh.lab.signal_agent(host, signal.SIGHUP)  # and a forced full sync on top
    for host in mesh.alive:
        wait_for(
            f"{host.name} to apply generation {generation}",
            partial(mesh.generation_applied, host, generation),
            timeout=10,
        )
    time.sleep(1.5)  # a resync or two more
    for host in mesh.alive:
        after = mesh.wg_dump(host)
        assert after.keys() == before[host.name].keys()
        for key, peer in after.items():
            assert peer["handshake"] == before[host.name][key]["handshake"], (
                f"{host.name}: new handshake with {key} after re-applying the same plan"
            )
        assert (
            "+0 ~0 -0 peers, +0 -0 routes"
            in host.agent_log.read_text()
            .split(f"applied generation {generation}:")[-1]
            .splitlines()[0]
        )


def test_drift_is_repaired(mesh: Mesh) -> None:
    mesh.lab.wait_connected(mesh.alive, timeout=30)
    a, b = mesh.host(1), mesh.host(2)
    b_key = mesh.public_key(b)
    assert b.pod_cidr is not None
    b_pods = b.pod_cidr
    subprocess.run(["wg", "set", a.interface, "peer", b_key, "remove"], check=True)
    subprocess.run(["ip", "netns", "exec", a.ns, "ip", "route", "del", b_pods], check=True)
    assert b_key not in mesh.wg_dump(a)
    wait_for(f"{a.name} to re-add {b.name}", lambda: b_key in mesh.wg_dump(a), timeout=10)
    mesh.lab.wait_connected([a, b], timeout=10)


def test_a_killed_relay_is_dropped_and_the_rest_stay_connected(mesh: Mesh) -> None:
    mesh.lab.wait_connected(mesh.alive, timeout=30)
    natd = mesh.host(NATD[0])
    relay_endpoint = next(iter(mesh.wg_dump(natd).values()))["endpoint"]
    relay = next(h for h in mesh.alive if h.public and h.endpoint == relay_endpoint)
    relay_key = mesh.public_key(relay)
    mesh.lab.kill(relay)
    # Nodes that neither are the relay nor depend on it keep talking throughout.
    unaffected = [h for h in mesh.alive if h is not natd]
    assert not mesh.lab.unreachable_pairs(unaffected)
    # The Lease lapses, the operator moves the NAT'd host to another relay, the agents
    # drop the dead peer: full connectivity again among the survivors.
    took = mesh.lab.wait_connected(mesh.alive, timeout=LEASE_S + 20)
    print(f"survivors fully connected {took:.2f}s after the relay died")
    for host in mesh.alive:
        assert relay_key not in mesh.wg_dump(host), f"{host.name} still has the dead relay"
    new_relay = next(iter(mesh.wg_dump(natd).values()))["endpoint"]
    assert new_relay != relay_endpoint
    moved_to = mesh.relay_of(natd)
    assert moved_to.endpoint == new_relay
    assert region_of(moved_to.index) == region_of(natd.index), "still relayed from home"


def test_a_new_host_is_reachable_from_all_within_5_s(mesh: Mesh) -> None:
    mesh.lab.wait_connected(mesh.alive, timeout=30)
    index = max(h.index for h in mesh.lab.hosts) + 1
    started = time.monotonic()
    host = mesh.add(index, public=True)
    wait_for(f"{host.name} to get its addresses", lambda: mesh.assigned(host), timeout=10)
    took = mesh.lab.wait_connected(mesh.alive, timeout=JOIN_DEADLINE_S + 10, involving=host)
    total = time.monotonic() - started
    print(f"new host reachable from all {total:.2f}s after its agent started")
    assert total <= JOIN_DEADLINE_S, f"took {total:.2f}s (connectivity {took:.2f}s)"
    mesh.lab.wait_connected(mesh.alive, timeout=10)  # and everyone else still is
