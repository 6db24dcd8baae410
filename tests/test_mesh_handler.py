"""The operator's mesh handler, pure part: MeshState from API events to writes."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gpumesh.api.mesh import Catalogue, catalogue_from_configmap
from gpumesh.operator.handlers import mesh as mesh_handler
from gpumesh.operator.handlers.mesh import parse_selector, selected
from gpumesh.operator.mesh import MeshConfig
from gpumesh.operator.mesh.publish import lease_node
from gpumesh.operator.mesh.state import MeshState

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
CONFIG = MeshConfig(overlay_cidr="198.19.0.0/24", pod_cidr="198.19.128.0/17", cooldown_s=600)
NS = "gpumesh-system"


def key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


def gpunode(
    name: str,
    i: int,
    endpoint: str | None = None,
    *,
    mesh: dict[str, Any] | None = None,
    relay: bool = True,
    region: str = "eu",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"supplier": "s", "region": region, "pricePerGpuHour": "1.00"}
    if endpoint:
        spec["publicEndpoint"] = endpoint
    if not relay:
        spec["meshRelay"] = False
    return {
        "metadata": {"name": name},
        "spec": spec,
        "status": {"health": "Healthy", "mesh": {"publicKey": key(i), **(mesh or {})}},
    }


def kube_node(
    name: str, *, supplier: str | None = "s", relay: bool = True, region: str | None = None
) -> dict[str, Any]:
    """A Node as the mesh operator admitted it (its labels say for whom, and if it relays)."""
    labels: dict[str, str] = {}
    if supplier is not None:
        labels["gpumesh.io/supplier"] = supplier
    if relay:
        labels["gpumesh.io/mesh-relay"] = "true"
    if region is not None:
        labels["gpumesh.io/region"] = region
    return {"metadata": {"name": name, "labels": labels}}


def admitted(gpunodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each GPUNode's Node, admitted for its supplier and allowed to relay."""
    return [kube_node(g["metadata"]["name"]) for g in gpunodes]


def lease(node: str, renewed: datetime = NOW, seconds: int = 40) -> dict[str, Any]:
    return {
        "metadata": {"name": f"gpumesh-agent-{node}", "namespace": NS},
        "spec": {"renewTime": renewed.isoformat(), "leaseDurationSeconds": seconds},
    }


def catalogue(state: MeshState, configmap: dict[str, Any] | None = None) -> Catalogue:
    cm = configmap or {"data": dict(state._data or {})}
    found = catalogue_from_configmap(cm)
    assert found is not None
    return found


def fleet() -> tuple[MeshState, list[dict[str, Any]]]:
    nodes = [
        gpunode("a", 1, "198.51.100.1:51820"),
        gpunode("b", 2, "198.51.100.2:51820"),
        gpunode("n", 3),  # NAT'd
    ]
    state = MeshState(CONFIG, NS)
    state.sync(nodes, [lease(n["metadata"]["name"]) for n in nodes], admitted(nodes), NOW)
    return state, nodes


def test_first_plan_writes_every_status_and_the_catalogue_once() -> None:
    state, _ = fleet()
    writes = state.take_writes()
    assert [name for name, _ in writes.statuses] == ["a", "b", "n"]
    patch = dict(writes.statuses)["n"]["status"]["mesh"]
    assert patch["overlayIp"].startswith("198.19.0.") and patch["relay"] in ("a", "b")
    assert writes.configmap is not None
    assert writes.configmap["metadata"]["namespace"] == NS
    assert [e.name for e in catalogue(state, writes.configmap).entries] == ["a", "b", "n"]
    # Nothing changed: nothing to write.
    assert not state.take_writes()


def test_status_written_only_when_it_differs_from_the_body() -> None:
    state, nodes = fleet()
    writes = state.take_writes()
    patches = dict(writes.statuses)
    # The watch delivers the bodies with our fields in them: no new writes.
    for node in nodes:
        node["status"]["mesh"].update(patches[node["metadata"]["name"]]["status"]["mesh"])
        state.gpunode(node, NOW)
    assert not state.take_writes()
    # Someone wiped a node's status (or it was recreated): written again, only that one.
    nodes[0]["status"]["mesh"] = {"publicKey": key(1)}
    state.gpunode(nodes[0], NOW)
    again = state.take_writes()
    assert [name for name, _ in again.statuses] == ["a"] and again.configmap is None


def test_heartbeat_renewals_change_nothing_and_lapsed_leases_drop_the_peer() -> None:
    state, _ = fleet()
    state.take_writes()
    for name in ("a", "b", "n"):
        state.lease(lease(name, NOW + timedelta(seconds=10)), NOW + timedelta(seconds=10))
    assert not state.take_writes()
    # a stops renewing: at its expiry it leaves the catalogue; n moves to b.
    for name in ("b", "n"):
        state.lease(lease(name, NOW + timedelta(seconds=45)), NOW + timedelta(seconds=45))
    later = NOW + timedelta(seconds=51)
    assert state.next_expiry() is not None
    state.expire(later)
    writes = state.take_writes()
    assert writes.configmap is not None
    members = catalogue(state, writes.configmap).by_name()
    assert set(members) == {"b", "n"} and members["n"].relay == "b"
    # a keeps its addresses while it is gone, and comes back with the same ones.
    before = state.planner.assignment("a")
    state.lease(lease("a", later), later)
    assert state.planner.assignment("a") == before
    assert "a" in catalogue(state, state.take_writes().configmap).by_name()


def test_deleted_gpunode_leaves_and_its_lease_is_ignored() -> None:
    state, _ = fleet()
    state.take_writes()
    state.gpunode_deleted("b", NOW)
    state.lease(lease("b"), NOW)
    writes = state.take_writes()
    assert "b" not in catalogue(state, writes.configmap).by_name()
    assert all(name != "b" for name, _ in writes.statuses)


def test_other_leases_are_not_agents() -> None:
    assert lease_node({"metadata": {"name": "gpumesh-operator"}}) is None
    assert lease_node({"metadata": {"name": "gpumesh-agent-"}}) is None
    assert lease_node(lease("x")) == "x"


def test_restart_from_the_published_configmap_writes_nothing() -> None:
    state, nodes = fleet()
    writes = state.take_writes()
    assert writes.configmap is not None
    for node in nodes:
        node["status"]["mesh"].update(
            dict(writes.statuses)[node["metadata"]["name"]]["status"]["mesh"]
        )
    restarted = MeshState(CONFIG, NS, published=json.loads(json.dumps(writes.configmap)))
    restarted.sync(nodes, [lease(n["metadata"]["name"]) for n in nodes], admitted(nodes), NOW)
    assert not restarted.take_writes()


def test_relay_observations_become_observed_endpoints() -> None:
    state, _ = fleet()
    writes = state.take_writes()
    relay = dict(writes.statuses)["n"]["status"]["mesh"]["relay"]
    other = "b" if relay == "a" else "a"
    seen = [{"node": "n", "endpoint": "203.0.113.9:40000"}]
    # Only the node's own relay is believed.
    state.gpunode(gpunode(other, 1 if other == "a" else 2, mesh={"peerEndpoints": seen}), NOW)
    assert not any(name == "n" for name, _ in state.take_writes().statuses)
    endpoint = f"198.51.100.{1 if relay == 'a' else 2}:51820"
    index = 1 if relay == "a" else 2
    state.gpunode(gpunode(relay, index, endpoint, mesh={"peerEndpoints": seen}), NOW)
    patches = dict(state.take_writes().statuses)
    assert patches["n"] == {"status": {"mesh": {"observedEndpoint": "203.0.113.9:40000"}}}


def test_mesh_relay_false_keeps_a_public_node_out_of_the_relay_pool() -> None:
    nodes = [gpunode("a", 1, "198.51.100.1:51820", relay=False), gpunode("n", 3)]
    state = MeshState(CONFIG, NS)
    state.sync(nodes, [lease("a"), lease("n")], admitted(nodes), NOW)
    members = catalogue(state, state.take_writes().configmap).by_name()
    assert members["n"].relay is None and members["a"].endpoint == "198.51.100.1:51820"


def test_nat_d_nodes_are_relayed_from_their_own_region_whatever_order_agents_report_in() -> None:
    """The GPUNode's spec.region reaches the planner through the operator's copy of the
    body: before it did not, and the lab's NAT'd hosts got whichever relay was least loaded."""
    state = MeshState(CONFIG, NS)
    # Each agent's first report (key and Lease) arrives NAT'd nodes first, then the relay
    # of the other region first: every NAT'd node sees a foreign relay before its own.
    order = [
        gpunode("nat-west", 3, region="west"),
        gpunode("relay-east", 2, "198.51.100.2:51820", region="east"),
        gpunode("nat-east", 4, region="east"),
        gpunode("relay-west", 1, "198.51.100.1:51820", region="west"),
    ]
    for body in order:
        state.node(kube_node(body["metadata"]["name"]), NOW)
        state.lease(lease(body["metadata"]["name"]), NOW)
        state.gpunode(body, NOW)
    relays = {n.name: n.relay for n in catalogue(state, state.take_writes().configmap).entries}
    assert relays["nat-west"] == "relay-west"
    assert relays["nat-east"] == "relay-east"


def test_failed_writes_are_retried() -> None:
    state, _ = fleet()
    writes = state.take_writes()
    state.failed(nodes=["n"], configmap=True)
    retry = state.take_writes()
    assert [name for name, _ in retry.statuses] == ["n"]
    assert retry.configmap == writes.configmap


def test_selector() -> None:
    sel = parse_selector("gpumesh.io/mesh-e2e=ab12, tier=x")
    assert selected({"gpumesh.io/mesh-e2e": "ab12", "tier": "x"}, sel)
    assert not selected({"tier": "x"}, sel)
    assert selected(None, parse_selector(""))
    with pytest.raises(ValueError, match="key=value"):
        parse_selector("novalue")


def test_a_lapsed_lease_is_confirmed_once_before_the_node_leaves() -> None:
    state, _ = fleet()
    state.take_writes()
    later = NOW + timedelta(seconds=41)
    reads: list[str] = []
    renewed: dict[str, dict[str, Any]] = {
        "a": lease("a", later)
    }  # a renewed, but its event has not arrived yet

    def confirm(node: str) -> dict[str, Any] | None:
        reads.append(node)
        found: dict[str, Any] = renewed.get(node) or lease(node)
        return found

    state.expire(later, confirm)
    assert sorted(reads) == ["a", "b", "n"]
    members = catalogue(state, state.take_writes().configmap).by_name()
    assert set(members) == {"a"}
    state.expire(later, confirm)  # nothing due again: no more reads
    assert len(reads) == 3


def settled() -> tuple[MeshState, list[dict[str, Any]], dict[str, Any]]:
    """A fleet whose writes all landed: GPUNode bodies carry them, the ConfigMap exists."""
    state, nodes = fleet()
    writes = state.take_writes()
    for node in nodes:
        patch = dict(writes.statuses)[node["metadata"]["name"]]["status"]["mesh"]
        node["status"]["mesh"].update(patch)
    assert writes.configmap is not None
    return state, nodes, json.loads(json.dumps(writes.configmap))


def leases_of(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [lease(n["metadata"]["name"]) for n in nodes]


def test_a_full_resync_with_nothing_missed_writes_nothing() -> None:
    state, nodes, configmap = settled()
    state.resync(nodes, leases_of(nodes), admitted(nodes), configmap, NOW)
    assert not state.take_writes()


def test_a_full_resync_repairs_missed_events() -> None:
    state, nodes, configmap = settled()
    # The watch missed: c joining, b leaving, and someone resetting n's status.
    nodes = [nodes[0], nodes[2], gpunode("c", 4, "198.51.100.4:51820")]
    nodes[1]["status"]["mesh"] = {"publicKey": key(3)}
    state.resync(nodes, leases_of(nodes), admitted(nodes), configmap, NOW)
    writes = state.take_writes()
    assert writes.configmap is not None
    assert set(catalogue(state, writes.configmap).by_name()) == {"a", "c", "n"}
    assert sorted(name for name, _ in writes.statuses) == ["c", "n"]


@pytest.mark.parametrize(("damage", "theirs"), [("deleted", 0), ("edited", 1), ("restored", 40)])
def test_a_full_resync_rewrites_a_damaged_catalogue_under_a_newer_generation(
    damage: str, theirs: int
) -> None:
    """Generations only grow, even past one someone else wrote: agents that saw the
    outside write must take ours as newer."""
    state, nodes, configmap = settled()
    ours = catalogue(state, configmap)
    found: dict[str, Any] | None = None
    if damage != "deleted":
        found = json.loads(json.dumps(configmap))
        found["data"]["catalogue.json"] = json.dumps(
            {"version": 1, "generation": theirs, "nodes": []}
        )
    state.resync(nodes, leases_of(nodes), admitted(nodes), found, NOW)
    writes = state.take_writes()
    assert not writes.statuses
    assert writes.configmap is not None
    again = catalogue(state, writes.configmap)
    assert again.entries == ours.entries
    assert again.generation == max(ours.generation, theirs) + 1
    state.resync(nodes, leases_of(nodes), admitted(nodes), writes.configmap, NOW)
    assert state.take_writes().configmap is None  # ours again: nothing more to write


class ListingKube:
    """The API as a full resync lists it; an event arrives while it lists."""

    def __init__(self, nodes: list[dict[str, Any]], configmap: dict[str, Any]) -> None:
        self.nodes, self.configmap = nodes, configmap
        self.during_list: Callable[[], None] = lambda: None

    def list_cluster_custom(self, group: str, version: str, plural: str) -> list[dict[str, Any]]:
        snapshot: list[dict[str, Any]] = json.loads(json.dumps(self.nodes))
        self.during_list()
        return snapshot

    def list_leases(self, namespace: str) -> list[dict[str, Any]]:
        return leases_of(self.nodes)

    def list_nodes(self) -> list[dict[str, Any]]:
        return admitted(self.nodes)

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.configmap

    def configmap_version(self, namespace: str, name: str) -> str | None:
        return str((self.configmap.get("metadata") or {}).get("resourceVersion") or "")


def test_events_during_the_lists_are_replayed_on_top(monkeypatch: pytest.MonkeyPatch) -> None:
    state, nodes, configmap = settled()
    monkeypatch.setattr(mesh_handler, "_state", state)
    monkeypatch.setattr(mesh_handler, "_now", lambda: NOW)
    kube = ListingKube(nodes, configmap)
    # b is deleted after the list was read: the list still has it, the event does not.
    kube.during_list = lambda: mesh_handler.feed(lambda s: s.gpunode_deleted("b", NOW))
    assert mesh_handler.full_resync(state, kube)
    assert mesh_handler._replay is None
    assert set(catalogue(state, state.take_writes().configmap).by_name()) == {"a", "n"}
    # Outside a resync, events are applied and not kept.
    mesh_handler.feed(lambda s: s.gpunode_deleted("a", NOW))
    assert mesh_handler._replay is None
    assert set(catalogue(state, state.take_writes().configmap).by_name()) == {"n"}


def members(state: MeshState) -> dict[str, Any]:
    configmap = state.take_writes().configmap
    return dict(catalogue(state, configmap).by_name()) if configmap else {}


def test_only_nodes_the_mesh_operator_admitted_for_their_supplier_join() -> None:
    """A phantom GPUNode (no Node), or one claiming a supplier its Node was not admitted
    for, stays out however good its key and Lease look."""
    bodies = [
        gpunode("a", 1, "198.51.100.1:51820"),
        gpunode("phantom", 5, "198.51.100.5:51820"),
        gpunode("impostor", 6, "198.51.100.6:51820"),
        gpunode("n", 3),
    ]
    state = MeshState(CONFIG, NS)
    nodes = [kube_node("a"), kube_node("impostor", supplier="rival"), kube_node("n")]
    state.sync(bodies, leases_of(bodies), nodes, NOW)
    found = members(state)
    assert set(found) == {"a", "n"} and found["n"].relay == "a"


def test_relays_only_where_the_mesh_operator_allows_relaying() -> None:
    bodies = [gpunode("a", 1, "198.51.100.1:51820"), gpunode("n", 3)]
    state = MeshState(CONFIG, NS)
    state.sync(bodies, leases_of(bodies), [kube_node("a", relay=False), kube_node("n")], NOW)
    assert members(state)["n"].relay is None  # a public node, but not allowed to relay
    state.node(kube_node("a"), NOW)  # the mesh operator allows it
    assert members(state)["n"].relay == "a"


def test_withdrawing_admission_or_deleting_the_node_takes_it_out() -> None:
    state, _ = fleet()
    assert set(members(state)) == {"a", "b", "n"}
    state.node(kube_node("b", supplier=None), NOW)
    assert set(members(state)) == {"a", "n"}
    state.node_deleted("a", NOW)
    assert set(members(state)) == {"n"}
    state.node(kube_node("a"), NOW)
    assert set(members(state)) == {"a", "n"}


class VersionedKube(ListingKube):
    """The catalogue ConfigMap's resourceVersion, which another writer may change."""

    def __init__(self, nodes: list[dict[str, Any]], configmap: dict[str, Any]) -> None:
        super().__init__(nodes, configmap)
        self.version: str | None = "7"
        self.configmap = {
            **configmap,
            "metadata": {**configmap["metadata"], "resourceVersion": "7"},
        }

    def configmap_version(self, namespace: str, name: str) -> str | None:
        return self.version


def test_a_catalogue_written_by_someone_else_is_noticed_and_the_resync_notes_the_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state, nodes, configmap = settled()
    k = VersionedKube(nodes, configmap)
    monkeypatch.setattr(mesh_handler, "_catalogue_version", None)
    assert mesh_handler.full_resync(state, k)
    assert not mesh_handler.written_elsewhere(k)  # the version the resync read
    k.version = "9"  # a restore from backup, a hand edit
    assert mesh_handler.written_elsewhere(k)
    k.configmap = {**k.configmap, "metadata": {**k.configmap["metadata"], "resourceVersion": "9"}}
    assert mesh_handler.full_resync(state, k)
    assert not mesh_handler.written_elsewhere(k)
    k.version = None  # deleted
    assert mesh_handler.written_elsewhere(k)
