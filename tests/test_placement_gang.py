"""place_cluster: gang placement, hard constraints, scoring, incremental changes, heads."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from gpumesh.api.gpucluster import GPUClusterSpec
from gpumesh.operator.placement import (
    Assignment,
    Decision,
    InventoryIndex,
    NodeOffer,
    Weights,
    place_cluster,
)
from gpumesh.operator.placement.synthetic import make_offer


def spec(**fields: Any) -> GPUClusterSpec:
    """A GPUClusterSpec from camelCase fields; ``workers`` defaults to 1 x 1 GPU."""
    fields.setdefault("workers", {})
    return GPUClusterSpec.model_validate(fields)


def head(name: str = "head-0", **fields: Any) -> NodeOffer:
    """A head-capable CPU-only node."""
    fields.setdefault("gpus_total", 0)
    fields.setdefault("gpu_model", "")
    fields.setdefault("head_capable", True)
    return make_offer(name, **fields)


def gpus_by_node(decision: Decision) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in decision.assignments:
        out[a.node] = out.get(a.node, 0) + a.gpus
    return out


def test_places_a_gang_on_the_cheapest_matching_nodes() -> None:
    inventory = [
        make_offer("h100-a", price_per_gpu_hour=Decimal("2.50")),
        make_offer("h100-b", price_per_gpu_hour=Decimal("1.90")),
        make_offer("a100-a", gpu_model="NVIDIA A100-SXM4-80GB", price_per_gpu_hour=Decimal("1")),
        head(),
    ]
    decision = place_cluster(
        spec(workers={"gpu": {"models": ["H100"]}, "gpusPerWorker": 2, "replicas": 4}),
        inventory,
    )
    assert decision.ok, decision.explanation
    assert gpus_by_node(decision) == {"h100-b": 8}
    assert decision.price_per_hour == Decimal("15.20")
    assert decision.head_node == "head-0"
    assert decision.assignments[0] == Assignment(
        "workers", "h100-b", 4, 2, "acme", "eu-west", "NVIDIA H100 80GB HBM3", Decimal("1.90")
    )


def test_explains_a_price_limit_with_the_cheapest_fit() -> None:
    inventory = [
        make_offer("h100-a", price_per_gpu_hour=Decimal("2.95")),
        make_offer("h100-b", price_per_gpu_hour=Decimal("3.20")),
        head(),
    ]
    decision = place_cluster(
        spec(
            workers={"gpu": {"models": ["H100"]}, "gpusPerWorker": 2, "replicas": 4},
            placement={"maxPricePerGpuHour": "2.00"},
        ),
        inventory,
    )
    assert not decision.ok
    assert decision.assignments == ()
    assert decision.reason == "Unsatisfiable"
    assert decision.explanation == (
        "asked 4 workers x 2 GPUs of H100 at <= $2.00/GPU-h; 16 H100 GPUs are free but all "
        "cost more; cheapest fit at $2.95/GPU-h"
    )


def test_explanation_counts_each_excluded_constraint() -> None:
    inventory = [
        make_offer("far", region="us-east"),
        make_offer("sick", health="Unhealthy"),
        make_offer("shady", verified=False, gpus_free=4),
        make_offer("busy", gpus_free=1),
        head(),
    ]
    decision = place_cluster(
        spec(
            workers={"gpu": {"models": ["H100"]}, "gpusPerWorker": 2, "replicas": 2},
            placement={"regions": ["eu-west"], "verifiedOnly": True},
        ),
        inventory,
    )
    text = decision.explanation
    assert not decision.ok
    assert "21 H100 GPUs are free on 4 nodes" in text
    assert "region 8" in text and "unhealthy 8" in text and "unverified 4" in text
    assert "1 on nodes with fewer than 2 free" in text
    assert "dropping the region limit or verifiedOnly alone would fit" in text
    assert decision.reason == "NoCapacity"


def test_unknown_model_lists_what_the_mesh_has() -> None:
    decision = place_cluster(spec(workers={"gpu": {"models": ["B200"]}}), [make_offer("a")])
    assert decision.reason == "Unsatisfiable"
    assert "no GPU in the mesh matches; it has 8 NVIDIA H100 80GB HBM3" in decision.explanation


def test_gang_is_all_or_nothing_across_groups() -> None:
    inventory = [make_offer("h100", gpus_free=8), head()]
    decision = place_cluster(
        spec(
            workers={"gpu": {"models": ["H100"]}, "gpusPerWorker": 4, "replicas": 2},
            additionalWorkerGroups=[
                {"name": "prep", "gpu": {"models": ["RTX 4090"]}, "replicas": 1}
            ],
        ),
        inventory,
    )
    assert not decision.ok
    assert decision.assignments == ()
    assert decision.explanation.startswith("group prep: asked 1 worker x 1 GPU of RTX 4090")


def test_groups_share_nodes_without_overbooking() -> None:
    inventory = [make_offer("h100-0", gpus_free=6), make_offer("h100-1", gpus_free=6), head()]
    decision = place_cluster(
        spec(
            workers={"gpu": {"models": ["H100"]}, "gpusPerWorker": 4, "replicas": 2},
            additionalWorkerGroups=[{"name": "small", "gpusPerWorker": 2, "replicas": 2}],
        ),
        inventory,
    )
    assert decision.ok, decision.explanation
    assert gpus_by_node(decision) == {"h100-0": 6, "h100-1": 6}


def test_reserved_gpus_are_not_double_booked() -> None:
    inventory = [make_offer("a"), make_offer("b", price_per_gpu_hour=Decimal("3")), head()]
    request = spec(workers={"gpusPerWorker": 8, "replicas": 1})
    assert gpus_by_node(place_cluster(request, inventory)) == {"a": 8}
    assert gpus_by_node(place_cluster(request, inventory, reserved={"a": 1})) == {"b": 8}
    blocked = place_cluster(request, inventory, reserved={"a": 1, "b": 4})
    assert not blocked.ok and blocked.reason == "NoCapacity"


def test_workers_need_cpu_and_memory_too() -> None:
    inventory = [
        make_offer("no-cpu", cpu_free_millicores=2000),
        make_offer("fine", price_per_gpu_hour=Decimal("5")),
        head(),
    ]
    decision = place_cluster(spec(workers={"cpuPerWorker": "4"}), inventory)
    assert gpus_by_node(decision) == {"fine": 1}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("health", "NeedsReset"),
        ("health", "Unhealthy"),
        ("health", "Lost"),
        ("cordoned", True),
        ("tainted", True),
    ],
)
def test_closed_nodes_get_no_new_workers(field: str, value: object) -> None:
    inventory = [make_offer("closed", **{field: value}), head()]
    decision = place_cluster(spec(), inventory)
    assert not decision.ok


def test_degraded_nodes_rank_lower_but_still_serve() -> None:
    degraded = make_offer("degraded", health="Degraded", price_per_gpu_hour=Decimal("1.00"))
    healthy = make_offer("healthy", price_per_gpu_hour=Decimal("1.50"))
    assert gpus_by_node(place_cluster(spec(), [degraded, healthy, head()])) == {"healthy": 1}
    assert gpus_by_node(place_cluster(spec(), [degraded, head()])) == {"degraded": 1}


def test_fragmentation_prefers_the_node_the_request_fills() -> None:
    inventory = [make_offer("roomy", gpus_free=8), make_offer("snug", gpus_free=2), head()]
    decision = place_cluster(spec(workers={"gpusPerWorker": 2}), inventory)
    assert gpus_by_node(decision) == {"snug": 2}


def test_pack_keeps_workers_together_and_spread_splits_suppliers() -> None:
    inventory = [
        make_offer(f"{supplier}-{i}", supplier=supplier, gpus_free=2)
        for supplier in ("s1", "s2", "s3", "s4")
        for i in range(2)
    ] + [head()]
    workers = {"gpusPerWorker": 2, "replicas": 4}
    packed = place_cluster(spec(workers=workers, placement={"strategy": "Pack"}), inventory)
    spread = place_cluster(spec(workers=workers, placement={"strategy": "Spread"}), inventory)
    assert len({a.supplier for a in packed.assignments}) == 2
    assert len({a.supplier for a in spread.assignments}) == 4


def test_locality_prefers_the_region_of_the_other_workers() -> None:
    inventory = [
        make_offer("eu-0", region="eu-west", gpus_free=1),
        make_offer("eu-1", region="eu-west", gpus_free=1, price_per_gpu_hour=Decimal("2.05")),
        make_offer("us-0", region="us-east", gpus_free=1, price_per_gpu_hour=Decimal("2.04")),
        head(),
    ]
    decision = place_cluster(spec(workers={"replicas": 2}), inventory)
    assert set(gpus_by_node(decision)) == {"eu-0", "eu-1"}


def test_max_latency_is_a_hard_limit_when_the_mesh_measured_it() -> None:
    inventory = [
        make_offer("a", gpus_free=1, rtt_ms={"b": 80.0, "c": 20.0}),
        make_offer("b", gpus_free=1, price_per_gpu_hour=Decimal("1.00"), rtt_ms={"c": 90.0}),
        make_offer("c", gpus_free=1, price_per_gpu_hour=Decimal("3.00")),
        head(),
    ]
    workers = {"replicas": 2}
    free = place_cluster(spec(workers=workers), inventory)
    near = place_cluster(spec(workers=workers, placement={"maxLatencyMs": 50}), inventory)
    assert set(gpus_by_node(free)) == {"a", "b"}
    assert set(gpus_by_node(near)) == {"a", "c"}
    impossible = place_cluster(
        spec(workers={"replicas": 3}, placement={"maxLatencyMs": 50}), inventory
    )
    assert not impossible.ok
    assert "within 50 ms of each other" in impossible.explanation


def test_a_pair_both_nodes_measured_differently_counts_at_the_larger_figure() -> None:
    """Found by the placement property test: b measured a at 5 ms and a measured b at
    120 ms; asked from b's side the pair looked near."""
    inventory = [
        make_offer("a", gpus_free=1, rtt_ms={"b": 120.0}),
        make_offer("b", gpus_free=1, rtt_ms={"a": 5.0}),
        head(),
    ]
    assert inventory[0].rtt_to(inventory[1]) == inventory[1].rtt_to(inventory[0]) == 120.0
    decision = place_cluster(
        spec(workers={"replicas": 2}, placement={"maxLatencyMs": 50}), inventory
    )
    assert not decision.ok


def test_a_pair_neither_node_lists_is_at_least_as_far_as_the_smaller_floor() -> None:
    """In a mesh larger than rttMs's bound, a far pair may be listed by neither node."""
    inventory = [
        make_offer("a", gpus_free=1, rtt_ms={"c": 5.0}, rtt_floor_ms=60.0),
        make_offer("b", gpus_free=1, price_per_gpu_hour=Decimal("1.00"), rtt_ms={"c": 6.0}),
        make_offer("c", gpus_free=1, price_per_gpu_hour=Decimal("3.00"), rtt_ms={"a": 5.0}),
        head(),
    ]
    workers = {"replicas": 2}
    within = place_cluster(spec(workers=workers, placement={"maxLatencyMs": 50}), inventory)
    assert set(gpus_by_node(within)) == {"b", "c"}, "a-b is at least 60 ms: not both"
    loose = place_cluster(spec(workers=workers, placement={"maxLatencyMs": 70}), inventory)
    assert set(gpus_by_node(loose)) == {"a", "b"}, "60 ms may be within 70: cheapest wins"


def test_head_goes_to_a_head_capable_node_never_another() -> None:
    """Renters' drivers run on the head: only hosts the mesh operator trusts (its
    head-capable label). A CPU-only head has no GPUs to prove, so verified is not asked."""
    inventory = [
        make_offer("gpu", region="us-east"),
        head("trusted", region="eu-west", verified=False),
        head("untrusted", region="us-east", head_capable=False),
    ]
    assert place_cluster(spec(), inventory).head_node == "trusted"
    alone = place_cluster(spec(), [make_offer("gpu"), head("untrusted", head_capable=False)])
    assert not alone.ok
    assert alone.reason == "NoHeadNode"
    assert "for the Ray head; the mesh has none" in alone.explanation


def test_head_prefers_the_workers_region_and_respects_its_node_selector() -> None:
    inventory = [
        make_offer("gpu", region="us-east"),
        head("eu-head", region="eu-west"),
        head("us-head", region="us-east"),
        head("us-big", region="us-east", labels=frozenset({("size", "big")})),
    ]
    assert place_cluster(spec(), inventory).head_node == "us-big"
    chosen = place_cluster(spec(head={"nodeSelector": {"size": "big"}}), inventory).head_node
    assert chosen == "us-big"
    small = [o for o in inventory if o.name != "us-big"]
    assert place_cluster(spec(), small).head_node == "us-head"


def test_head_needs_free_cpu_and_memory() -> None:
    inventory = [make_offer("gpu"), head("tiny", cpu_free_millicores=1000), head("roomy")]
    assert place_cluster(spec(head={"cpu": "2"}), inventory).head_node == "roomy"


def test_current_head_stays_while_trusted() -> None:
    inventory = [make_offer("gpu"), head("old", cordoned=True), head("new")]
    assert place_cluster(spec(), inventory, current_head="old").head_node == "old"
    lost = [make_offer("gpu"), head("old", health="Lost"), head("new")]
    assert place_cluster(spec(), lost, current_head="old").head_node == "new"


def test_suspended_cluster_holds_nothing() -> None:
    decision = place_cluster(spec(suspend=True), [make_offer("a"), head()])
    assert decision.ok and decision.assignments == () and decision.head_node is None
    assert decision.reason == "Suspended"


# --- incremental placement -------------------------------------------------------------


def assignment(
    node: str, workers: int, gpus_per_worker: int = 1, group: str = "workers"
) -> Assignment:
    return Assignment(
        group,
        node,
        workers,
        gpus_per_worker,
        "acme",
        "eu-west",
        "NVIDIA H100 80GB HBM3",
        Decimal("2.00"),
    )


def test_scale_up_keeps_current_workers_where_they_are() -> None:
    inventory = [
        make_offer("expensive", price_per_gpu_hour=Decimal("4.00")),
        make_offer("cheap-0", price_per_gpu_hour=Decimal("1.00")),
        make_offer("cheap-1", price_per_gpu_hour=Decimal("1.00")),
        head(),
    ]
    current = [assignment("expensive", 2)]
    decision = place_cluster(spec(workers={"replicas": 6}), inventory, current=current)
    assert decision.ok, decision.explanation
    workers = {a.node: a.workers for a in decision.assignments}
    assert workers["expensive"] >= 2
    assert sum(workers.values()) == 6
    assert "kept 2, added 4, removed 0" in decision.explanation


def test_scale_down_removes_the_least_attractive_workers_first() -> None:
    inventory = [
        make_offer("pricey", price_per_gpu_hour=Decimal("3.00")),
        make_offer("cheap", price_per_gpu_hour=Decimal("1.00")),
        make_offer("closed", price_per_gpu_hour=Decimal("0.50"), cordoned=True),
        head(),
    ]
    current = [assignment("pricey", 2), assignment("cheap", 2), assignment("closed", 2)]
    down = place_cluster(spec(workers={"replicas": 3}), inventory, current=current)
    assert {a.node: a.workers for a in down.assignments} == {"cheap": 2, "pricey": 1}
    assert "kept 3, added 0, removed 3" in down.explanation


def test_workers_move_off_nodes_that_are_no_longer_acceptable() -> None:
    inventory = [make_offer("lost", health="Lost"), make_offer("fine"), head()]
    current = [assignment("lost", 2), assignment("gone", 1)]
    decision = place_cluster(spec(workers={"replicas": 3}), inventory, current=current)
    assert {a.node: a.workers for a in decision.assignments} == {"fine": 3}
    assert "moved 2 workers off lost (Lost)" in decision.explanation
    assert "moved 1 worker off gone (gone)" in decision.explanation


def test_failover_grace_keeps_workers_on_unhealthy_but_not_lost_nodes() -> None:
    inventory = [
        make_offer("sick", health="NeedsReset"),
        make_offer("lost", health="Lost"),
        make_offer("fine"),
        head(),
    ]
    current = [assignment("sick", 2), assignment("lost", 2)]
    decision = place_cluster(
        spec(workers={"replicas": 4}), inventory, current=current, keep_unhealthy=True
    )
    assert {a.node: a.workers for a in decision.assignments} == {"sick": 2, "fine": 2}
    grown = place_cluster(
        spec(workers={"replicas": 10}), inventory, current=current, keep_unhealthy=True
    )
    assert {a.node: a.workers for a in grown.assignments} == {"sick": 2, "fine": 8}
    no_new_on_sick = place_cluster(
        spec(workers={"replicas": 11}), inventory, current=current, keep_unhealthy=True
    )
    assert not no_new_on_sick.ok
    moved = place_cluster(spec(workers={"replicas": 4}), inventory, current=current)
    assert {a.node: a.workers for a in moved.assignments} == {"fine": 4}


def test_kept_workers_use_their_gpus_again() -> None:
    """gpus_free includes what the cluster holds; keeping it must not free it for others."""
    inventory = [make_offer("a", gpus_free=4), head()]
    decision = place_cluster(spec(workers={"replicas": 5}), inventory, current=[assignment("a", 4)])
    assert not decision.ok
    kept = place_cluster(spec(workers={"replicas": 4}), inventory, current=[assignment("a", 4)])
    assert gpus_by_node(kept) == {"a": 4}


def test_changed_worker_size_replaces_the_group() -> None:
    inventory = [make_offer("a"), head()]
    decision = place_cluster(
        spec(workers={"gpusPerWorker": 2, "replicas": 2}), inventory, current=[assignment("a", 4)]
    )
    assert [(a.node, a.workers, a.gpus_per_worker) for a in decision.assignments] == [("a", 2, 2)]


# --- determinism and the index ---------------------------------------------------------


def test_same_inputs_same_decision_whatever_the_order() -> None:
    inventory = [
        make_offer(f"n{i}", supplier=f"s{i % 3}", gpus_free=i % 4 + 1) for i in range(30)
    ] + [head()]
    request = spec(workers={"replicas": 12}, placement={"strategy": "Spread"})
    first = place_cluster(request, inventory)
    assert place_cluster(request, list(reversed(inventory))) == first
    assert place_cluster(request, InventoryIndex(inventory)) == first


def test_weights_change_the_ranking() -> None:
    inventory = [
        make_offer("cheap-unknown", price_per_gpu_hour=Decimal("1.00"), reputation=0.0),
        make_offer("dear-trusted", price_per_gpu_hour=Decimal("1.20"), reputation=1.0),
        head(),
    ]
    by_price = place_cluster(spec(), inventory, weights=Weights(reputation=0.1))
    by_trust = place_cluster(spec(), inventory, weights=Weights(reputation=1.0))
    assert gpus_by_node(by_price) == {"cheap-unknown": 1}
    assert gpus_by_node(by_trust) == {"dear-trusted": 1}


def test_index_rejects_duplicate_nodes() -> None:
    with pytest.raises(ValueError, match="two offers for the same node"):
        InventoryIndex([make_offer("a"), make_offer("a")])


def test_the_smaller_floor_bounds_a_pair_so_one_sides_stale_floor_cannot_push_it_away() -> None:
    """b's floor (90 ms) was written before b measured a; a's (30 ms) covers b."""
    a = make_offer("a", rtt_floor_ms=30.0)
    b = make_offer("b", rtt_floor_ms=90.0)
    assert a.rtt_floor_to(b) == b.rtt_floor_to(a) == 30.0
    assert a.rtt_floor_to(make_offer("c")) == 30.0
    assert make_offer("c").rtt_floor_to(make_offer("d")) is None
