"""derive_peers: direct peers, relays, allowed IPs in exactly one peer, keepalive for NAT."""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from dataclasses import replace

from gpumesh.api.mesh import Catalogue, CatalogueEntry
from gpumesh.node_agent.wg.peers import derive_peers
from gpumesh.operator.mesh import MeshConfig, MeshNode, plan

CONFIG = MeshConfig(overlay_cidr="198.19.0.0/24", pod_cidr="198.19.128.0/17", pod_prefix=24)


def key(name: str) -> str:
    return base64.b64encode(hashlib.sha256(name.encode()).digest()).decode()


def catalogue(public: int, natd: int) -> Catalogue:
    nodes = [MeshNode(f"p{i}", key(f"p{i}"), f"198.51.100.{10 + i}:51820") for i in range(public)]
    nodes += [MeshNode(f"n{i}", key(f"n{i}"), None) for i in range(natd)]
    return plan(nodes, CONFIG).catalogue()


def test_public_node_has_every_public_peer_direct_and_natd_ones_behind_their_relay() -> None:
    cat = catalogue(3, 3)
    by = cat.by_name()
    mesh = derive_peers(cat, "p0")
    assert mesh is not None
    assert [p.name for p in mesh.peers] == ["n0", "p1", "p2"]  # n1, n2 ride on p1, p2
    peers = {p.name: p for p in mesh.peers}
    assert by["n0"].relay == "p0" and by["n1"].relay == "p1" and by["n2"].relay == "p2"
    n0 = peers["n0"]
    assert n0.endpoint is None and n0.keepalive_s == 25
    assert n0.allowed_ips == tuple(sorted(by["n0"].allowed_ips))
    p1 = peers["p1"]
    assert p1.endpoint == "198.51.100.11:51820" and p1.keepalive_s == 0
    assert set(p1.allowed_ips) == {*by["p1"].allowed_ips, *by["n1"].allowed_ips}
    assert p1.via_for == ("n1",)
    assert mesh.relays_for == ("n0",)
    assert mesh.address == f"{by['p0'].overlay_ip}/24"
    assert set(mesh.routes) == {e.pod_cidr for e in cat.entries if e.name != "p0"}


def test_natd_node_sends_everything_through_its_relay_with_keepalive() -> None:
    cat = catalogue(3, 3)
    mesh = derive_peers(cat, "n1")
    assert mesh is not None
    (relay,) = mesh.peers
    assert relay.name == "p1" and relay.endpoint == "198.51.100.11:51820"
    assert relay.keepalive_s == 25
    others = [e for e in cat.entries if e.name != "n1"]
    assert set(relay.allowed_ips) == {ip for e in others for ip in e.allowed_ips}
    assert not mesh.relays_for and not mesh.unreachable
    assert mesh.path_of()["n2"] == "p1"


def test_every_address_is_in_exactly_one_peer_on_every_node() -> None:
    cat = catalogue(5, 7)
    for entry in cat.entries:
        mesh = derive_peers(cat, entry.name)
        assert mesh is not None
        counts = Counter(ip for p in mesh.peers for ip in p.allowed_ips)
        assert all(n == 1 for n in counts.values()), entry.name
        wanted = {ip for e in cat.entries if e.name != entry.name for ip in e.allowed_ips}
        assert set(counts) == wanted, entry.name
        assert not set(entry.allowed_ips) & set(counts)


def test_natd_without_a_relay_is_unreachable_and_a_non_member_gets_none() -> None:
    cat = catalogue(0, 2)
    mesh = derive_peers(cat, "n0")
    assert mesh is not None and not mesh.peers and mesh.unreachable == ("n1",)
    assert derive_peers(cat, "stranger") is None


def test_cloned_key_is_held_once_and_reported() -> None:
    cat = catalogue(3, 0)
    clone = CatalogueEntry(
        "p9", key("p1"), "198.51.100.99:51820", "198.19.0.99", "198.19.200.0/24", None
    )
    cat = Catalogue(cat.generation, cat.overlay_cidr, (*cat.entries, clone))
    mesh = derive_peers(cat, "p0")
    assert mesh is not None
    assert [p.name for p in mesh.peers] == ["p1", "p2"] and mesh.unreachable == ("p9",)


def test_derivation_is_deterministic_and_custom_keepalive_applies() -> None:
    cat = catalogue(4, 4)
    assert derive_peers(cat, "p2") == derive_peers(cat, "p2")
    mesh = derive_peers(cat, "n3", keepalive_s=10)
    assert mesh is not None and mesh.peers[0].keepalive_s == 10


def test_natd_peer_whose_relay_is_gone_is_unreachable_from_everyone() -> None:
    cat = catalogue(2, 3)
    rows = [replace(e, relay="gone") if e.name == "n2" else e for e in cat.entries]
    cat = Catalogue(cat.generation, cat.overlay_cidr, tuple(rows))
    for me in ("p0", "n0"):
        mesh = derive_peers(cat, me)
        assert mesh is not None and mesh.unreachable == ("n2",), me
        assert not any("n2" in p.via_for for p in mesh.peers)
        n2 = cat.by_name()["n2"]
        assert n2.pod_cidr not in mesh.routes
