"""build_inventory from raw API objects; model matching; Kubernetes quantities."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from gpumesh.api.gpucluster import GPUSelector
from gpumesh.api.proof import gpus_fingerprint
from gpumesh.operator.placement import OfferCache, build_inventory
from gpumesh.operator.placement.inventory import placement_view
from gpumesh.operator.placement.matching import model_matches, selector_accepts
from gpumesh.operator.placement.quantity import cpu_millicores, memory_bytes, parse_quantity
from gpumesh.operator.world import trim_node

GIB = 2**30


def gpunode(name: str, status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body = {"supplier": "acme", "region": "eu-west", "pricePerGpuHour": "2.10"} | spec
    return {
        "apiVersion": "gpumesh.io/v1alpha1",
        "kind": "GPUNode",
        "metadata": {"name": name, "resourceVersion": "7", "uid": "u-" + name},
        "spec": body,
        "status": {"health": "Healthy", "gpuModel": "NVIDIA H100 80GB HBM3"}
        if status is None
        else status,
    }


def node(
    name: str,
    gpus: int = 8,
    labels: dict[str, str] | None = None,
    spec: dict[str, Any] | None = None,
    conditions: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "allocatable": {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": str(gpus)}
    }
    if conditions is not None:
        status["conditions"] = conditions
    return {
        "metadata": {
            "name": name,
            "labels": {
                "gpumesh.io/supplier": "acme",  # admitted by the mesh operator
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                "nvidia.com/gpu.memory": "81559",
                "nvidia.com/gpu.compute.major": "9",
                "nvidia.com/gpu.compute.minor": "0",
            }
            | (labels or {}),
        },
        "spec": spec or {},
        "status": status,
    }


def pod(
    node_name: str | None,
    gpus: str | None = "1",
    phase: str = "Running",
    cpu: str = "4",
    memory: str = "16Gi",
    init: dict[str, str] | None = None,
) -> dict[str, Any]:
    limits = {"cpu": cpu, "memory": memory} | ({"nvidia.com/gpu": gpus} if gpus else {})
    spec: dict[str, Any] = {"containers": [{"name": "c", "resources": {"limits": limits}}]}
    if node_name:
        spec["nodeName"] = node_name
    if init:
        spec["initContainers"] = [{"name": "i", "resources": {"requests": init}}]
    return {"metadata": {"name": "p"}, "spec": spec, "status": {"phase": phase}}


def test_an_offer_joins_gpunode_node_and_pods() -> None:
    [offer] = build_inventory(
        [gpunode("n1", headCapable=True)],
        [node("n1", labels={"gpumesh.io/head-capable": "true"})],
        [pod("n1", "2"), pod("n1", "1", phase="Succeeded"), pod(None), pod("other")],
    )
    assert offer.name == "n1"
    assert (offer.supplier, offer.region) == ("acme", "eu-west")
    assert offer.gpu_model == "NVIDIA H100 80GB HBM3"
    assert (offer.gpu_memory_mib, offer.compute_capability) == (81559, (9, 0))
    assert (offer.gpus_total, offer.gpus_free) == (8, 6)
    assert offer.price_per_gpu_hour == Decimal("2.10")
    assert offer.cpu_free_millicores == 60_000
    assert offer.memory_free_bytes == 496 * GIB
    assert offer.health == "Healthy" and offer.head_capable and offer.accepts_work
    assert offer.reputation == 0.0 and not offer.verified


def test_init_containers_count_at_their_peak() -> None:
    [offer] = build_inventory(
        [gpunode("n1")], [node("n1")], [pod("n1", None, cpu="1", init={"cpu": "8"})]
    )
    assert offer.cpu_free_millicores == 56_000


def test_nodes_without_gpunode_or_with_unknown_health_are_not_offered() -> None:
    offers = build_inventory(
        [gpunode("unknown", status={"health": "Unknown"}), gpunode("no-node")],
        [node("unknown"), node("lonely")],
        [],
    )
    assert offers == []


def test_a_gpunode_that_does_not_parse_is_left_out() -> None:
    bad = gpunode("bad", pricePerGpuHour=2.1)  # a float, not a decimal string
    assert [
        o.name for o in build_inventory([bad, gpunode("ok")], [node("bad"), node("ok")], [])
    ] == ["ok"]


def test_not_ready_nodes_are_lost_and_cordons_and_taints_close_nodes() -> None:
    offers = build_inventory(
        [gpunode(n) for n in ("down", "cordoned", "tainted", "ours", "soft", "spec-cordon")]
        + [gpunode("mine", cordoned=True)],
        [
            node("down", conditions=[{"type": "Ready", "status": "Unknown"}]),
            node("cordoned", spec={"unschedulable": True}),
            node("tainted", spec={"taints": [{"key": "team", "effect": "NoSchedule"}]}),
            node(
                "ours",
                spec={
                    "taints": [
                        {"key": "gpumesh.io/supplier", "effect": "NoSchedule"},
                        {"key": "nvidia.com/gpu", "effect": "NoSchedule"},
                    ]
                },
            ),
            node("soft", spec={"taints": [{"key": "x", "effect": "PreferNoSchedule"}]}),
            node(
                "spec-cordon",
                spec={
                    "taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]
                },
            ),
            node("mine"),
        ],
        [],
    )
    by_name = {o.name: o for o in offers}
    assert by_name["down"].health == "Lost"
    assert by_name["cordoned"].cordoned and not by_name["cordoned"].accepts_work
    assert by_name["tainted"].tainted
    assert by_name["ours"].accepts_work
    assert by_name["soft"].accepts_work
    assert by_name["spec-cordon"].cordoned
    assert by_name["mine"].cordoned


def test_the_operators_trimmed_node_keeps_readiness_but_not_heartbeats() -> None:
    def down(heartbeat: str) -> dict[str, Any]:
        conditions = [
            {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": heartbeat},
            {"type": "Ready", "status": "False", "lastHeartbeatTime": heartbeat},
        ]
        return node("down", conditions=conditions)

    [offer] = build_inventory([gpunode("down")], [trim_node(down("10:00"))], [])
    assert offer.health == "Lost"
    assert trim_node(down("10:00")) == trim_node(down("10:05"))


H100 = {"uuid": "GPU-00000000-0000-0000-0000-000000000001", "model": "NVIDIA H100 80GB HBM3"}
PROVEN = gpus_fingerprint([(H100["uuid"], H100["model"], 81559)])


@pytest.mark.parametrize(
    ("verification", "memory", "label", "verified"),
    [
        ({"result": "Passed", "reason": "Verified", "gpus": PROVEN}, 81559, None, True),
        ({"result": "Passed", "reason": "Verified", "gpus": PROVEN}, 40960, None, False),
        ({"result": "Passed", "reason": "Verified"}, 81559, None, False),
        ({"result": "Failed", "reason": "WrongAnswer", "gpus": PROVEN}, 81559, "true", False),
        ({"result": "Pending", "reason": "Checking"}, 81559, "true", False),
        (None, 81559, "true", False),
    ],
)
def test_only_the_operators_passed_verdict_on_these_very_gpus_verifies(
    verification: dict[str, str] | None, memory: int, label: str | None, verified: bool
) -> None:
    """The old ``gpumesh.io/verified`` label counts for nothing, and a verdict about other
    GPUs (here: the same UUID reporting other memory) neither."""
    status: dict[str, Any] = {
        "health": "Healthy",
        "gpus": [{"index": 0, **H100, "memoryMib": memory}],
    }
    if verification is not None:
        status["verification"] = verification
    labels = {"gpumesh.io/verified": label} if label else {}
    [offer] = build_inventory([gpunode("n", status)], [node("n", labels=labels)], [])
    assert offer.verified is verified


def test_status_fills_in_when_labels_are_missing_and_rtt_is_read() -> None:
    status = {
        "health": "Degraded",
        "reputation": 0.8,
        "gpus": [
            {
                "index": 0,
                "uuid": "g0",
                "model": "NVIDIA A100-SXM4-40GB",
                "memoryMib": 40960,
                "computeCapability": "8.0",
            },
        ],
        "mesh": {"rttMs": {"peer": 12.5, "bad": "x"}},
    }
    bare = node("n")
    bare["metadata"]["labels"] = {"gpumesh.io/supplier": "acme"}
    [offer] = build_inventory([gpunode("n", status)], [bare], [])
    assert offer.gpu_model == "NVIDIA A100-SXM4-40GB"
    assert (offer.gpu_memory_mib, offer.compute_capability) == (40960, (8, 0))
    assert offer.health == "Degraded" and offer.reputation == 0.8
    assert dict(offer.rtt_ms) == {"peer": 12.5}


def test_cpu_only_nodes_are_offered_for_heads() -> None:
    bare = node("head", gpus=0)
    bare["metadata"]["labels"] = {"gpumesh.io/supplier": "acme", "gpumesh.io/head-capable": "true"}
    [offer] = build_inventory([gpunode("head", status={"health": "Healthy"})], [bare], [])
    assert offer.gpus_total == 0 and offer.gpu_model == "" and offer.head_capable


def test_inventory_is_sorted_by_name() -> None:
    names = ["c", "a", "b"]
    offers = build_inventory([gpunode(n) for n in names], [node(n) for n in names], [])
    assert [o.name for o in offers] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("entry", "product", "matches"),
    [
        ("H100", "NVIDIA H100 80GB HBM3", True),
        ("A100 80GB", "NVIDIA A100-SXM4-80GB", True),
        ("a100_80gb", "NVIDIA A100-SXM4-80GB", True),
        ("RTX 4090", "NVIDIA-GeForce-RTX-4090", True),
        ("A10", "NVIDIA A100-SXM4-80GB", False),
        ("L4", "NVIDIA L40S", False),
        ("A100 40GB", "NVIDIA A100-SXM4-80GB", False),
    ],
)
def test_model_entries_match_whole_words(entry: str, product: str, matches: bool) -> None:
    assert model_matches(entry, product) is matches


def test_selector_checks_memory_and_compute_capability() -> None:
    kind = ("NVIDIA A100-SXM4-40GB", 40960, (8, 0))
    assert selector_accepts(GPUSelector(models=["A100"]), kind)
    assert not selector_accepts(GPUSelector(min_memory_mib=48000), kind)
    assert not selector_accepts(GPUSelector(min_compute_capability="8.6"), kind)
    assert selector_accepts(GPUSelector(min_compute_capability="8.0"), kind)
    assert not selector_accepts(GPUSelector(), ("", 0, (0, 0)))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", Decimal("0.5")),
        ("2", Decimal(2)),
        ("16Gi", Decimal(16 * GIB)),
        ("1e3", Decimal(1000)),
        ("1.5k", Decimal(1500)),
        (".5", Decimal("0.5")),
    ],
)
def test_quantities(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


def test_quantities_round_up_and_reject_garbage() -> None:
    assert cpu_millicores("0.0001") == 1
    assert memory_bytes("1.5") == 2
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity("12Q")


def test_the_offer_cache_parses_again_only_nodes_whose_inputs_changed() -> None:
    gpunodes = [gpunode("a"), gpunode("b")]
    nodes = [node("a"), node("b")]
    cache = OfferCache()
    first = {o.name: o for o in cache.build(gpunodes, nodes, [])}
    nodes[1] = node("b", labels={"team": "x"})  # a new object, as kopf's index stores it
    second = {o.name: o for o in cache.build(gpunodes, nodes, [pod("a")])}
    assert second["a"] is not first["a"] and second["a"].gpus_free == 7  # pods moved
    assert ("team", "x") in second["b"].labels
    third = {o.name: o for o in cache.build(gpunodes, nodes, [pod("a")])}
    assert third["a"] is second["a"] and third["b"] is second["b"]
    assert list(third.values()) == build_inventory(gpunodes, nodes, [pod("a")])


def test_only_nodes_the_mesh_operator_admitted_for_the_gpunodes_supplier_are_offered() -> None:
    claimed = gpunode("n1", supplier="acme")
    assert [o.name for o in build_inventory([claimed], [node("n1")], [])] == ["n1"]
    assert not build_inventory([claimed], [node("n2")], [])  # no Node at all
    foreign = node("n1", labels={"gpumesh.io/supplier": "rival"})
    assert [o.name for o in build_inventory([claimed], [foreign], [])] == []
    unadmitted = node("n1")
    del unadmitted["metadata"]["labels"]["gpumesh.io/supplier"]
    assert build_inventory([claimed], [unadmitted], []) == []


def test_region_and_head_capability_are_the_mesh_operators_word() -> None:
    claims = gpunode("n1", region="eu-west", headCapable=True)
    [offer] = build_inventory([claims], [node("n1", labels={"gpumesh.io/region": "ap-south"})], [])
    assert offer.region == "ap-south"
    assert not offer.head_capable  # the supplier asked; the mesh operator did not grant it
    granted = node("n1", labels={"gpumesh.io/head-capable": "true"})
    [offer] = build_inventory([claims], [granted], [])
    assert offer.head_capable


def test_what_placement_does_not_read_leaves_the_view_and_the_offer_as_they_were() -> None:
    """The index rebuilds the inventory only when ``placement_view`` changes; every status
    field ``_offer`` reads must be in it, and the noisy ones must not."""
    base: dict[str, Any] = {
        "health": "Healthy",
        "reputation": 0.8,
        "gpus": [{"index": 0, **H100, "temperatureC": 40, "powerW": 80.0}],
        "verification": {"result": "Passed", "reason": "Verified", "gpus": "x"},
        "mesh": {"rttMs": {"peer": 12.5}, "rttFloorMs": 3.0, "overlayIp": "10.90.0.1"},
    }
    noisy = {
        **base,
        "heartbeatTime": "2026-12-07T10:00:00Z",
        "gpus": [{"index": 0, **H100, "temperatureC": 77, "powerW": 300.0}],
        "track": {"updatedTime": "2026-12-07T10:00:00Z", "up": True, "upSeconds": 5.0},
        "challenge": {"id": "0123456789abcdef"},
        "conditions": [{"type": "Verified", "status": "True"}],
    }
    assert placement_view(noisy) == placement_view(base)
    offers = [build_inventory([gpunode("n", s)], [node("n")], []) for s in (base, noisy)]
    assert offers[0] == offers[1]
    for changed in (
        {**base, "health": "Degraded"},
        {**base, "reputation": 0.7},
        {**base, "verification": {**base["verification"], "result": "Failed"}},
        {**base, "mesh": {**base["mesh"], "rttMs": {"peer": 40.0}}},
        {**base, "gpus": [{**base["gpus"][0], "memoryMib": 1024}]},
    ):
        assert placement_view(changed) != placement_view(base)
