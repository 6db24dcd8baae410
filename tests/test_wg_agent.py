"""The mesh loop and one sync, against an in-memory device, routes and API server.

The fake device applies PeerChanges the way wireguard-go does (per peer, allowed IPs
replaced only on request) and counts writes, so "nothing to do" is checked as "nothing
written", and drift (a peer or route removed behind the agent's back) is repaired.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from gpumesh.api.mesh import Catalogue
from gpumesh.api.patch import apply_merge_patch
from gpumesh.node_agent.kube import JSON, MERGE_PATCH, KubeError
from gpumesh.node_agent.wg.agent import MeshAgent, MeshAgentConfig, RttSource
from gpumesh.node_agent.wg.diff import ObservedDevice, ObservedPeer, PeerChanges
from gpumesh.node_agent.wg.keys import KeyStore, PrivateKey
from gpumesh.node_agent.wg.links import RouteChanges
from gpumesh.node_agent.wg.metrics import MeshCollector, registry_with
from gpumesh.node_agent.wg.rtt import RttPolicy
from gpumesh.node_agent.wg.sync import CachingResolver, MeshSyncer
from gpumesh.operator.mesh import Ledger, MeshConfig, MeshNode, catalogue_configmap, plan

CONFIG = MeshConfig(overlay_cidr="198.19.0.0/24", pod_cidr="198.19.128.0/17", pod_prefix=24)


class FakeDevice:
    kind = "fake"

    def __init__(self, interface: str = "wgfake") -> None:
        self.interface = interface
        self.public_key: str | None = None
        self.listen_port: int | None = None
        self.peers: dict[str, ObservedPeer] = {}
        self.writes = 0

    def ensure(self) -> None:
        pass

    def observe(self) -> ObservedDevice:
        return ObservedDevice(self.public_key, self.listen_port, dict(self.peers))

    def apply(self, changes: PeerChanges, private_key: PrivateKey | None) -> None:
        if not changes:
            return
        self.writes += 1
        if changes.set_private_key:
            assert private_key is not None
            self.public_key = private_key.public_key
        if changes.listen_port is not None:
            self.listen_port = changes.listen_port
        for key in changes.removals:
            self.peers.pop(key, None)
        for u in changes.updates:
            peer = self.peers.get(u.public_key) or ObservedPeer(u.public_key)
            if u.endpoint is not None:
                peer = replace(peer, endpoint=u.endpoint)
            if u.keepalive_s is not None:
                peer = replace(peer, keepalive_s=u.keepalive_s)
            if u.allowed_ips is not None:
                peer = replace(peer, allowed_ips=tuple(sorted(u.allowed_ips)))
            self.peers[u.public_key] = peer


class FakeLinks:
    def __init__(self) -> None:
        self.address: str | None = None
        self.mtu = 0
        self.routes: set[str] = set()
        self.forwarding = False

    def configure(self, address: str, mtu: int) -> list[str]:
        changes = []
        if self.address != address:
            changes.append(f"address +{address}")
        if self.mtu != mtu:
            changes.append(f"mtu {mtu}")
        self.address, self.mtu = address, mtu
        return changes

    def sync_routes(self, cidrs: Iterable[str]) -> RouteChanges:
        wanted = set(cidrs)
        added, removed = sorted(wanted - self.routes), sorted(self.routes - wanted)
        self.routes = wanted
        return RouteChanges(tuple(added), tuple(removed))

    def enable_forwarding(self) -> list[str]:
        changed = not self.forwarding
        self.forwarding = True
        return ["ip_forward=1"] if changed else []


class FakeApi:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.down = False

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = JSON
    ) -> dict[str, Any]:
        if self.down:
            raise KubeError(method, path, None, "connection refused")
        self.calls.append((method, path))
        if method == "PATCH" and path.endswith("/status"):
            assert content_type == MERGE_PATCH
            obj: dict[str, Any] = self.objects[path.removesuffix("/status")]
            obj["status"] = apply_merge_patch(obj.get("status"), body["status"])
            return obj
        if method in ("POST", "PUT"):
            stored: dict[str, Any] = dict(body)
            name = stored["metadata"]["name"]
            self.objects[path if method == "PUT" else f"{path}/{name}"] = stored
            return stored
        raise AssertionError(f"unexpected {method} {path}")

    def get(self, path: str) -> dict[str, Any] | None:
        if self.down:
            raise KubeError("GET", path, None, "connection refused")
        self.calls.append(("GET", path))
        return self.objects.get(path)

    def watch(self, path: str, *, field_selector: str, timeout_s: int = 300) -> Iterator[Any]:
        return iter(())

    def writes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] != "GET"]


def key(name: str) -> str:
    return base64.b64encode(hashlib.sha256(name.encode()).digest()).decode()


def catalogue_with(me: str, my_key: str, *, me_public: bool = True) -> Catalogue:
    nodes = [
        MeshNode(me, my_key, "198.51.100.10:51820" if me_public else None),
        MeshNode("p1", key("p1"), "198.51.100.11:51820"),
        MeshNode("p2", key("p2"), "198.51.100.12:51820"),
        MeshNode("n1", key("n1"), None),
        MeshNode("n2", key("n2"), None),
    ]
    return plan(nodes, CONFIG).catalogue()


@pytest.fixture
def parts(tmp_path: Path) -> tuple[MeshSyncer, FakeDevice, FakeLinks]:
    device, links = FakeDevice(), FakeLinks()
    syncer = MeshSyncer(
        "me", device, KeyStore(tmp_path / "keys"), links, resolver=CachingResolver()
    )
    syncer.start()
    return syncer, device, links


def test_start_installs_key_and_port_but_keeps_existing_peers(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks],
) -> None:
    syncer, device, _ = parts
    assert device.public_key == syncer.public_key and device.listen_port == 51820
    device.peers[key("x")] = ObservedPeer(key("x"))
    syncer.start()  # an agent restart
    assert key("x") in device.peers


def test_sync_applies_then_an_unchanged_catalogue_writes_nothing(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks],
) -> None:
    syncer, device, links = parts
    cat = catalogue_with("me", syncer.public_key)
    result = syncer.sync(cat)
    assert result.changed and result.desired is not None
    assert {p.public_key for p in result.desired.peers} == set(device.peers)
    assert links.routes == set(result.desired.routes) and links.address == result.desired.address
    assert links.forwarding  # "me" relays for a NAT'd node
    writes = device.writes
    again = syncer.sync(replace(cat, generation=cat.generation + 1))
    assert not again.changed and device.writes == writes
    assert "+0 ~0 -0 peers, +0 -0 routes" in again.summary()


def test_sync_repairs_drift(parts: tuple[MeshSyncer, FakeDevice, FakeLinks]) -> None:
    syncer, device, links = parts
    cat = catalogue_with("me", syncer.public_key)
    syncer.sync(cat)
    victim = key("p1")
    device.peers.pop(victim)
    links.routes.discard(sorted(links.routes)[0])
    stray = key("stray")
    device.peers[stray] = ObservedPeer(stray, allowed_ips=("198.19.0.200/32",))
    result = syncer.sync(cat)
    assert result.changes.created == 1 and result.changes.removals == (stray,)
    assert len(result.routes.added) == 1
    assert victim in device.peers and stray not in device.peers


def test_a_node_missing_from_the_catalogue_keeps_its_peers(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks],
) -> None:
    syncer, device, _ = parts
    syncer.sync(catalogue_with("me", syncer.public_key))
    peers = dict(device.peers)
    result = syncer.sync(catalogue_with("someone-else", key("else")))
    assert result.desired is None and device.peers == peers


def test_rotation_installs_a_new_key(parts: tuple[MeshSyncer, FakeDevice, FakeLinks]) -> None:
    syncer, device, _ = parts
    old = syncer.public_key
    new = syncer.rotate_key()
    assert new != old and device.public_key == new
    assert KeyStore(syncer.keys.dir).load_or_create().public_key == new


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


GPUNODE = "/apis/gpumesh.io/v1alpha1/gpunodes/me"


WALL = 1_700_000_100.0


def make_agent(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks], rtt: RttSource | None = None, **config: Any
) -> tuple[MeshAgent, FakeApi, Clock, MeshCollector]:
    syncer, _, _ = parts
    api, clock = FakeApi(), Clock()
    api.objects[GPUNODE] = {"metadata": {"name": "me"}, "spec": {}}
    collector = MeshCollector("me", clock=lambda: WALL)
    agent = MeshAgent(
        MeshAgentConfig(node="me", endpoints=("198.51.100.10:51820",), **config),
        api,
        syncer,
        collector,
        rtt=rtt,
        clock=clock,
        wall=lambda: WALL,
    )
    return agent, api, clock, collector


def configmap(cat: Catalogue) -> dict[str, Any]:
    return catalogue_configmap(cat, Ledger(), namespace="gpumesh-system")


def test_agent_publishes_its_key_once_and_repairs_it_later(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks],
) -> None:
    agent, api, clock, _ = make_agent(parts, status_check_s=60)
    agent.step()
    mesh = api.objects[GPUNODE]["status"]["mesh"]
    assert mesh == {"publicKey": parts[0].public_key, "endpoints": ["198.51.100.10:51820"]}
    clock.t += 1
    agent.step()
    assert len(api.writes()) == 1
    mesh["publicKey"] = key("tampered")
    clock.t += 61
    agent.step()
    assert api.objects[GPUNODE]["status"]["mesh"]["publicKey"] == parts[0].public_key


def test_agent_applies_each_new_catalogue_and_logs_it(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks], caplog: pytest.LogCaptureFixture
) -> None:
    agent, _, clock, collector = make_agent(parts)
    syncer, device, _ = parts
    cat = catalogue_with("me", syncer.public_key)
    with caplog.at_level(logging.INFO):
        agent.offer(configmap(cat))
        agent.step()
        writes = device.writes
        agent.offer(configmap(replace(cat, generation=cat.generation + 5)))
        clock.t += 0.1
        agent.step()
    assert device.writes == writes
    assert f"applied generation {cat.generation + 5}: +0 ~0 -0 peers" in caplog.text
    assert syncer.keys.dir.as_posix() not in caplog.text
    assert parts[0].key.reveal_base64() not in caplog.text
    metrics = generate_latest(registry_with(collector)).decode()
    assert 'gpumesh_mesh_member_path{member="n2",mode="relayed",node="me",via="p1"} 1.0' in metrics
    assert f'gpumesh_mesh_catalogue_generation{{node="me"}} {cat.generation + 5}.0' in metrics


def test_agent_ignores_a_malformed_catalogue(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks], caplog: pytest.LogCaptureFixture
) -> None:
    agent, _, _, _ = make_agent(parts)
    with caplog.at_level(logging.ERROR):
        agent.offer({"data": {"catalogue.json": '{"version": 1, "nodes": "x"}'}})
        agent.step()
    assert "malformed mesh catalogue" in caplog.text
    assert not parts[1].peers


def test_agent_renews_its_lease_when_asked_and_survives_an_outage(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks],
) -> None:
    agent, api, clock, _ = make_agent(parts, lease_duration_s=2, lease_renew_s=0.5)
    agent.step()
    lease = "/apis/coordination.k8s.io/v1/namespaces/gpumesh-system/leases"
    assert ("POST", lease) in api.calls
    clock.t += 0.6
    agent.step()
    assert ("PUT", f"{lease}/gpumesh-agent-me") in api.calls
    api.down = True
    clock.t += 0.6
    delay = agent.step()  # no exception: retried with backoff
    assert delay > 0
    api.down = False
    clock.t += 5
    agent.step()
    assert api.calls[-1][0] in ("POST", "PUT", "GET")


def test_agent_rotates_and_republishes(parts: tuple[MeshSyncer, FakeDevice, FakeLinks]) -> None:
    agent, api, clock, _ = make_agent(parts)
    agent.step()
    old = api.objects[GPUNODE]["status"]["mesh"]["publicKey"]
    agent.request_rotation()
    clock.t += 0.1
    agent.step()
    new = api.objects[GPUNODE]["status"]["mesh"]["publicKey"]
    assert new != old and new == parts[1].public_key


def test_metrics_show_handshake_age_bytes_and_relays(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks],
) -> None:
    syncer, device, _ = parts
    collector = MeshCollector("me", clock=lambda: 1_700_000_100.0)
    cat = catalogue_with("me", syncer.public_key)
    collector.record_sync(syncer.sync(cat))
    p2 = key("p2")
    device.peers[p2] = replace(
        device.peers[p2], last_handshake=1_700_000_090.0, rx_bytes=5, tx_bytes=7
    )
    collector.record_observed(syncer.observe())
    text = generate_latest(registry_with(collector)).decode()
    assert 'gpumesh_mesh_peer_handshake_age_seconds{node="me",peer="p2"} 10.0' in text
    assert 'gpumesh_mesh_peer_receive_bytes_total{node="me",peer="p2"} 5.0' in text
    assert 'gpumesh_mesh_peer_transmit_bytes_total{node="me",peer="p2"} 7.0' in text
    assert 'gpumesh_mesh_peer_is_relay{node="me",peer="p1"} 1.0' in text  # carries n2
    assert 'gpumesh_mesh_peer_is_relay{node="me",peer="p2"} 0.0' in text
    assert 'gpumesh_mesh_member_path{member="p2",mode="direct",node="me",via="p2"} 1.0' in text


class FakeRtt:
    """RTT rounds on demand (the echo's socket is tested in test_wg_rtt.py)."""

    def __init__(self) -> None:
        self.rounds = 0
        self.values: dict[str, float] = {}
        self.address: str | None = None
        self.targets: dict[str, str] = {}

    def set_targets(self, address: str | None, targets: Mapping[str, str]) -> None:
        self.address, self.targets = address, dict(targets)

    def current(self) -> dict[str, float]:
        return dict(self.values)

    def run(self, stop: threading.Event) -> None:
        pass

    def round(self, values: dict[str, float]) -> None:
        self.values = values
        self.rounds += 1


def mesh_status(api: FakeApi) -> dict[str, Any]:
    status: dict[str, Any] = api.objects[GPUNODE]["status"]["mesh"]
    return status


def test_agent_probes_its_members_and_publishes_rtts_only_when_they_move(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks],
) -> None:
    rtt = FakeRtt()
    agent, api, clock, collector = make_agent(parts, rtt, status_check_s=3600, rtt_publish_min_s=60)
    syncer = parts[0]
    cat = catalogue_with("me", syncer.public_key)
    agent.offer(configmap(cat))
    agent.step()
    overlay = {e.name: e.overlay_ip for e in cat.entries}
    assert rtt.address == overlay["me"]
    assert rtt.targets == {n: overlay[n] for n in ("p1", "p2", "n1", "n2")}
    assert "rttMs" not in mesh_status(api)
    writes = len(api.writes())

    def step(dt: float, values: dict[str, float] | None = None) -> None:
        if values is not None:
            rtt.round(values)
        clock.t += dt
        agent.step()

    step(1, {"p1": 10.0, "p2": 20.0, "n2": 31.234})
    assert mesh_status(api)["rttMs"] == {"p1": 10.0, "p2": 20.0, "n2": 31.23}
    assert len(api.writes()) == writes + 1
    step(10, {"p1": 10.6, "p2": 21.0, "n2": 30.0})  # noise: nothing written
    step(10, {"p1": 25.0, "p2": 21.0, "n2": 30.0})  # moved, but the last write is recent
    step(10)
    assert mesh_status(api)["rttMs"]["p1"] == 10.0 and len(api.writes()) == writes + 1
    step(31, {"p1": 25.0, "p2": 21.0, "n2": 30.0})  # a round after the spacing: written
    assert mesh_status(api)["rttMs"] == {"p1": 25.0, "p2": 21.0, "n2": 30.0}
    step(61, {"p1": 25.0, "n2": 30.0})  # p2 stopped answering: its entry goes
    assert mesh_status(api)["rttMs"] == {"p1": 25.0, "n2": 30.0}
    assert len(api.writes()) == writes + 3
    assert mesh_status(api)["publicKey"] == syncer.public_key  # the rest untouched
    metrics = generate_latest(registry_with(collector)).decode()
    assert 'gpumesh_mesh_member_rtt_seconds{member="p1",node="me"} 0.025' in metrics


def test_rtts_are_bounded_to_the_nearest(parts: tuple[MeshSyncer, FakeDevice, FakeLinks]) -> None:
    rtt = FakeRtt()
    agent, api, clock, _ = make_agent(parts, rtt, rtt_policy=RttPolicy(max_peers=2))
    agent.step()
    rtt.round({"p1": 3.0, "p2": 1.0, "n1": 2.0, "n2": 4.0})
    clock.t += 1
    agent.step()
    assert mesh_status(api)["rttMs"] == {"p2": 1.0, "n1": 2.0}
    assert mesh_status(api)["rttFloorMs"] == 3.0  # p1 and n2 are at least this far
    rtt.round({"p1": 3.5, "p2": 1.0, "n1": 2.0})
    clock.t += 61
    agent.step()
    assert mesh_status(api)["rttFloorMs"] == 3.0  # moved under the thresholds: not written
    rtt.round({"p2": 1.0, "n1": 2.0})
    clock.t += 61
    agent.step()
    assert "rttFloorMs" not in mesh_status(api)  # every member measured is listed again


def test_a_relay_publishes_the_nat_mappings_it_sees_and_drops_stale_ones(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks],
) -> None:
    agent, api, clock, _ = make_agent(parts, status_check_s=3600, observe_s=10)
    syncer, device, _ = parts
    cat = catalogue_with("me", syncer.public_key)
    agent.offer(configmap(cat))
    agent.step()
    relayed = next(e for e in cat.entries if e.relay == "me")
    assert "peerEndpoints" not in mesh_status(api)
    # n1 dials in from behind its NAT: the device learns its mapping from the handshake.
    device.peers[relayed.public_key] = replace(
        device.peers[relayed.public_key], endpoint="203.0.113.7:40001", last_handshake=WALL - 5
    )
    other = next(e for e in cat.entries if e.name == "p1")
    device.peers[other.public_key] = replace(
        device.peers[other.public_key], endpoint="198.51.100.99:1", last_handshake=WALL - 5
    )
    clock.t += 11  # the next device read
    agent.step()
    assert mesh_status(api)["peerEndpoints"] == [
        {"node": relayed.name, "endpoint": "203.0.113.7:40001"}
    ]  # only nodes we relay for: the public p1 publishes its own endpoint
    device.peers[relayed.public_key] = replace(
        device.peers[relayed.public_key], last_handshake=WALL - 600
    )
    clock.t += 11
    agent.step()
    assert mesh_status(api)["peerEndpoints"] == []


def test_the_endpoint_seen_after_a_handshake_becomes_a_candidate(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks],
) -> None:
    agent, api, clock, _ = make_agent(parts, status_check_s=5)
    agent.step()
    assert mesh_status(api)["endpoints"] == ["198.51.100.10:51820"]
    mesh_status(api)["observedEndpoint"] = "203.0.113.9:5555"  # by the operator
    clock.t += 6
    agent.step()
    assert mesh_status(api)["endpoints"] == ["198.51.100.10:51820", "203.0.113.9:5555"]
    mesh_status(api)["observedEndpoint"] = "not an endpoint"
    clock.t += 6
    agent.step()
    assert mesh_status(api)["endpoints"] == ["198.51.100.10:51820"]


def test_a_new_peer_whose_first_handshake_goes_unanswered_is_created_again(
    parts: tuple[MeshSyncer, FakeDevice, FakeLinks], caplog: pytest.LogCaptureFixture
) -> None:
    """A NAT'd node's relay dropped its first initiation (it did not know the node yet):
    the agent re-creates the peer after 1 s instead of waiting for WireGuard's 5 s retry."""
    agent, _, clock, _ = make_agent(parts, resync_s=600, observe_s=600, status_check_s=600)
    syncer, device, _ = parts
    agent.offer(configmap(catalogue_with("me", syncer.public_key, me_public=False)))
    agent.step()
    (relay,) = device.peers
    assert device.peers[relay].keepalive_s == 25
    device.peers[relay] = replace(device.peers[relay], tx_bytes=148)  # initiation sent
    writes = device.writes
    clock.t += 0.5
    assert agent.step() == pytest.approx(0.5), "wakes when the peer is due"
    assert device.writes == writes
    clock.t += 0.5
    with caplog.at_level(logging.INFO):
        agent.step()
    assert device.writes == writes + 1
    assert device.peers[relay].tx_bytes == 0, "a new peer object: a fresh initiation"
    assert device.peers[relay].keepalive_s == 25
    assert device.peers[relay].endpoint == "198.51.100.11:51820"
    assert "first handshake with 1 peer(s)" in caplog.text
    # It answers this time: nothing more is done.
    device.peers[relay] = replace(device.peers[relay], tx_bytes=148, last_handshake=WALL)
    clock.t += 1
    agent.step()
    assert device.writes == writes + 1
    assert "handshakes" not in agent._due
