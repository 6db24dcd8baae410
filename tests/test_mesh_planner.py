"""The mesh planner: stable addresses with cooldown, spread and sticky relays, incremental
deltas that name only what changed, and determinism from sorted inputs."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpumesh.api.mesh import Catalogue, CatalogueError
from gpumesh.operator.mesh import Ledger, MeshConfig, MeshConfigError, MeshNode, MeshPlanner, plan
from gpumesh.operator.mesh.alloc import IndexPool, PoolExhaustedError

CONFIG = MeshConfig(
    overlay_cidr="198.19.0.0/24", pod_cidr="198.19.128.0/17", pod_prefix=24, cooldown_s=100
)


def key(name: str) -> str:
    return base64.b64encode(hashlib.sha256(name.encode()).digest()).decode()


def public(name: str, alive: bool = True) -> MeshNode:
    return MeshNode(name, key(name), f"198.51.100.{1 + int(name[1:]) % 250}:51820", alive)


def natd(name: str, alive: bool = True) -> MeshNode:
    return MeshNode(name, key(name), None, alive)


def check_invariants(p: MeshPlanner) -> None:
    entries = p.entries
    overlays = [e.overlay_ip for e in entries.values()]
    pods = [e.pod_cidr for e in entries.values()]
    assert len(set(overlays)) == len(overlays)
    assert len(set(pods)) == len(pods)
    for ip in overlays:
        assert ipaddress.ip_address(ip) in CONFIG.overlay
    load: dict[str, int] = {}
    for e in entries.values():
        if e.endpoint is None and e.relay is not None:
            relay = entries[e.relay]
            assert relay.endpoint is not None, f"{e.name} relayed by NAT'd {e.relay}"
            load[e.relay] = load.get(e.relay, 0) + 1
        if e.endpoint is not None:
            assert e.relay is None
    assert {k: v for k, v in p.relay_load().items() if v} == load
    regions = {p.nodes[e.name].region for e in entries.values() if e.endpoint is not None}
    for e in entries.values():
        region = p.nodes[e.name].region
        if e.relay is not None and region is not None and region in regions:
            assert p.nodes[e.relay].region == region, f"{e.name} relayed from abroad"
    if any(e.endpoint is not None for e in entries.values()):
        assert all(e.relay is not None for e in entries.values() if e.endpoint is None)


def test_full_plan_is_deterministic_whatever_the_input_order() -> None:
    nodes = [public(f"p{i}") for i in range(20)] + [natd(f"n{i}") for i in range(10)]
    first = plan(nodes, CONFIG).catalogue()
    for seed in range(5):
        shuffled = nodes[:]
        random.Random(seed).shuffle(shuffled)
        assert plan(shuffled, CONFIG).catalogue() == first
    assert [e.name for e in first.entries] == sorted(n.name for n in nodes)


def test_relays_are_spread_and_each_natd_node_gets_one() -> None:
    p = plan([public(f"p{i}") for i in range(4)] + [natd(f"n{i}") for i in range(8)], CONFIG)
    check_invariants(p)
    assert sorted(p.relay_load().values()) == [2, 2, 2, 2]
    assert p.entries["n0"].relay == "p0" and p.entries["n1"].relay == "p1"


def test_adding_a_node_changes_only_that_node() -> None:
    p = plan([public(f"p{i}") for i in range(10)] + [natd(f"n{i}") for i in range(5)], CONFIG)
    before = dict(p.entries)
    delta = p.upsert(public("p10"), now=1)
    assert [e.name for e in delta.changed] == ["p10"]
    assert not delta.removed
    assert [a.name for a in delta.assignments] == ["p10"]
    assert {n: e for n, e in p.entries.items() if n != "p10"} == before
    delta = p.upsert(natd("n5"), now=2)
    assert [e.name for e in delta.changed] == ["n5"]
    assert p.entries["n5"].relay == "p10"  # least loaded (0), lowest name ("p10" < "p5")


def test_unchanged_upsert_is_an_empty_delta_and_keeps_the_generation() -> None:
    p = plan([public("p0"), natd("n0")], CONFIG)
    generation = p.generation
    assert not p.upsert(public("p0"), now=5)
    assert not p.sync([public("p0"), natd("n0")], now=6)
    assert p.generation == generation


def test_removed_node_frees_its_addresses_only_after_the_cooldown() -> None:
    p = plan([public(f"p{i}") for i in range(3)], CONFIG, now=0)
    gone = p.entries["p1"]
    delta = p.remove("p1", now=10)
    assert delta.removed == ("p1",) and not delta.changed
    p.upsert(public("p7"), now=50)  # within the cooldown: p1's addresses stay unused
    assert p.entries["p7"].overlay_ip != gone.overlay_ip
    assert p.entries["p7"].pod_cidr != gone.pod_cidr
    p.upsert(public("p8"), now=111)  # cooled down: the lowest free address again
    assert p.entries["p8"].overlay_ip == gone.overlay_ip
    assert p.entries["p8"].pod_cidr == gone.pod_cidr


def test_a_relay_leaving_moves_only_its_natd_nodes() -> None:
    p = plan([public(f"p{i}") for i in range(3)] + [natd(f"n{i}") for i in range(6)], CONFIG)
    mine = sorted(n for n, e in p.entries.items() if e.relay == "p1")
    others = {n: e.relay for n, e in p.entries.items() if e.relay not in (None, "p1")}
    delta = p.remove("p1", now=1)
    assert delta.removed == ("p1",)
    assert sorted(e.name for e in delta.changed) == mine
    assert {n: p.entries[n].relay for n in others} == others
    check_invariants(p)


def test_a_lapsed_heartbeat_leaves_the_mesh_but_keeps_addresses_and_natd_nodes_stay_moved() -> None:
    p = plan([public("p0"), public("p1"), natd("n0")], CONFIG)
    assert p.entries["n0"].relay == "p0"
    address = p.entries["p0"].overlay_ip
    delta = p.upsert(public("p0", alive=False), now=1)
    assert delta.removed == ("p0",)
    assert [e.name for e in delta.changed] == ["n0"] and p.entries["n0"].relay == "p1"
    delta = p.upsert(public("p0"), now=2)
    assert [e.name for e in delta.changed] == ["p0"]
    assert p.entries["p0"].overlay_ip == address
    assert p.entries["n0"].relay == "p1"  # sticky: no move back


def test_natd_nodes_wait_for_a_relay_and_get_one_when_it_comes() -> None:
    p = plan([natd("n0"), natd("n1")], CONFIG)
    assert {e.relay for e in p.entries.values()} == {None}
    delta = p.upsert(public("p0"), now=1)
    assert sorted(e.name for e in delta.changed) == ["n0", "n1", "p0"]
    assert p.entries["n0"].relay == p.entries["n1"].relay == "p0"


def in_region(node: MeshNode, region: str) -> MeshNode:
    return replace(node, region=region)


def test_a_natd_node_is_relayed_from_its_own_region_before_a_less_loaded_one() -> None:
    p = plan(
        [in_region(public("p0"), "eu"), in_region(public("p1"), "us")]
        + [in_region(natd(f"n{i}"), "eu") for i in range(3)],
        CONFIG,
    )
    assert {p.entries[f"n{i}"].relay for i in range(3)} == {"p0"}
    assert p.relay_load() == {"p0": 3, "p1": 0}
    p.upsert(in_region(natd("n9"), "asia"), now=1)  # no relay in asia: the least loaded
    assert p.entries["n9"].relay == "p1"
    check_invariants(p)


def test_a_natd_node_relayed_from_abroad_moves_home_when_its_region_gains_a_relay() -> None:
    p = plan([in_region(public("p0"), "us"), in_region(natd("n0"), "eu")], CONFIG)
    p.upsert(in_region(natd("n1"), "us"), now=1)
    assert p.entries["n0"].relay == p.entries["n1"].relay == "p0"
    delta = p.upsert(in_region(public("p5"), "eu"), now=2)
    assert sorted(e.name for e in delta.changed) == ["n0", "p5"]
    assert p.entries["n0"].relay == "p5"
    assert p.entries["n1"].relay == "p0", "a node at home stays"
    delta = p.upsert(in_region(public("p6"), "eu"), now=3)
    assert [e.name for e in delta.changed] == ["p6"], "no churn for nodes already home"
    assert p.entries["n0"].relay == "p5"
    check_invariants(p)


def test_a_restarted_planner_keeps_a_remembered_relay_abroad_only_while_home_has_none() -> None:
    nodes = [in_region(public("p0"), "us"), in_region(natd("n0"), "eu")]
    first = plan(nodes, CONFIG)
    assert first.entries["n0"].relay == "p0"
    again = MeshPlanner(CONFIG, first.ledger())
    again.sync(nodes, now=1)
    assert again.entries["n0"].relay == "p0"
    home = MeshPlanner(CONFIG, first.ledger())
    home.sync([*nodes, in_region(public("p1"), "eu")], now=1)
    assert home.entries["n0"].relay == "p1"


def test_a_node_without_a_key_holds_addresses_but_is_not_in_the_catalogue() -> None:
    p = plan([MeshNode("p0", None, "198.51.100.1:51820")], CONFIG)
    assert not p.entries
    assignment = p.assignment("p0")
    assert assignment is not None and assignment.overlay_ip == "198.19.0.1"
    delta = p.upsert(public("p0"), now=1)
    assert [e.overlay_ip for e in delta.changed] == ["198.19.0.1"]


def test_exhausted_pool_reports_the_node_and_places_the_rest() -> None:
    small = MeshConfig(overlay_cidr="198.19.0.0/30", pod_cidr="198.19.128.0/24", pod_prefix=26)
    p = MeshPlanner(small)
    delta = p.sync([public("p0"), public("p1"), public("p2")], now=0)
    assert sorted(p.entries) == ["p0", "p1"]
    assert delta.errors and delta.errors[0][0] == "p2"
    assert "198.19.0.0/30" in delta.errors[0][1]


def test_ledger_round_trip_reproduces_the_mesh_and_keeps_cooldowns() -> None:
    nodes = [public(f"p{i}") for i in range(5)] + [natd(f"n{i}") for i in range(5)]
    p = plan(nodes, CONFIG, now=0)
    p.remove("p2", now=10)
    nodes = [n for n in nodes if n.name != "p2"]
    ledger = Ledger.from_json(p.ledger().to_json())
    again = MeshPlanner(CONFIG, ledger)
    again.sync(nodes, now=20)
    assert again.catalogue().entries == p.catalogue().entries
    assert again.generation > p.generation - 1
    again.upsert(public("p9"), now=30)  # p2's address is still cooling
    assert again.entries["p9"].overlay_ip not in {e.overlay_ip for e in p.entries.values()}
    assert again.entries["p9"].overlay_ip != "198.19.0.3"


def test_ledger_restore_refuses_duplicates_and_foreign_ranges() -> None:
    ledger = Ledger(
        allocations={
            "a": ("198.19.0.1", "198.19.128.0/24", None),
            "b": ("198.19.0.1", "198.19.129.0/24", None),  # same overlay as a
            "c": ("10.0.0.1", "198.19.130.0/24", None),  # not in the overlay range
        }
    )
    p = MeshPlanner(CONFIG, ledger)
    assert len(p.restore_errors) == 2
    p.sync([public("a1"), public("b2"), public("c3")], now=0)
    overlays = {e.overlay_ip for e in p.entries.values()}
    assert len(overlays) == 3


REGIONS = ("eu", "us", None)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("apnd"), st.integers(0, 11), st.sampled_from(REGIONS)),
        max_size=60,
    )
)
def test_incremental_equals_full_replan_from_the_ledger(
    events: list[tuple[str, int, str | None]],
) -> None:
    """Property: after any event sequence (nodes coming, going, lapsing, changing region),
    a full replan from the recorded ledger gives the same catalogue; invariants hold
    throughout, a NAT'd node relayed from abroad only while its region has no relay."""
    p = MeshPlanner(CONFIG)
    nodes: dict[str, MeshNode] = {}
    for t, (op, i, region) in enumerate(events):
        name = f"x{i}"
        if op == "d":
            nodes.pop(name, None)
            p.remove(name, now=t)
        else:
            make = {"a": public, "p": public, "n": natd}.get(op, public)
            node = replace(make(name), region=region)
            if op == "a" and name in nodes:
                node = replace(node, alive=False)
            nodes[name] = node
            p.upsert(node, now=t)
        check_invariants(p)
    replanned = MeshPlanner(CONFIG, p.ledger())
    replanned.sync(nodes.values(), now=len(events))
    assert replanned.catalogue().entries == p.catalogue().entries


def test_index_pool_takes_lowest_free_and_raises_when_empty() -> None:
    pool = IndexPool(3, cooldown_s=5)
    assert [pool.take(0), pool.take(0), pool.take(0)] == [0, 1, 2]
    with pytest.raises(PoolExhaustedError):
        pool.take(0)
    pool.release(1, now=1)
    pool.release(0, now=2)
    with pytest.raises(PoolExhaustedError):
        pool.take(3)
    assert pool.take(6) == 1
    assert pool.take(7) == 0


def test_config_errors_name_the_field() -> None:
    with pytest.raises(MeshConfigError, match=r"mesh\.pod_cidr: .*overlaps"):
        MeshConfig(overlay_cidr="198.19.0.0/16", pod_cidr="198.19.128.0/17")
    with pytest.raises(MeshConfigError, match=r"mesh\.pod_prefix"):
        MeshConfig(overlay_cidr="198.19.0.0/24", pod_cidr="198.19.128.0/17", pod_prefix=16)
    with pytest.raises(MeshConfigError, match=r"mesh\.overlay_cidr: 'nope'"):
        MeshConfig(overlay_cidr="nope")
    with pytest.raises(MeshConfigError, match="IPv4"):
        MeshConfig(overlay_cidr="fd00::/64")


def test_catalogue_round_trips_and_rejects_injection() -> None:
    p = plan([public("p0"), natd("n0")], CONFIG)
    catalogue = p.catalogue()
    assert Catalogue.decode(catalogue.encode()) == catalogue
    assert len(catalogue.encode()) < 200 * 2 + 100
    good = catalogue.entries[0].row()
    bad_rows: list[list[object]] = [
        [*good[:2], "198.51.100.1:51820\nreplace_peers=true", *good[3:]],
        [good[0], "not-a-key", *good[2:]],
        [*good[:3], "198.19.0.1\n", *good[4:]],
        ["Bad Name", *good[1:]],
    ]
    for row in bad_rows:
        doc = json.loads(catalogue.encode())
        doc["nodes"][0] = row
        with pytest.raises(CatalogueError):
            Catalogue.decode(json.dumps(doc))
