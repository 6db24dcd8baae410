"""Properties of placement and admission over random meshes and requests (hypothesis).

Whatever the mesh and the request: no GPU is promised twice, a gang is placed whole or
not at all, hard constraints hold, quotas hold, preemption takes only lower priority,
incremental placement keeps acceptable workers, and the same inputs give the same result.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from gpumesh.api.base import parse_compute_capability
from gpumesh.api.gpucluster import GPUClusterSpec
from gpumesh.api.gpunode import ACCEPTING_HEALTH
from gpumesh.operator.placement import (
    Decision,
    NodeOffer,
    QuotaLimit,
    Request,
    Running,
    admit,
    place_cluster,
)
from gpumesh.operator.placement.matching import group_constraints, model_matches
from gpumesh.operator.placement.quantity import cpu_millicores, memory_bytes

GIB = 2**30
NOW = datetime(2026, 1, 1, tzinfo=UTC)
HARDWARE = (
    ("NVIDIA H100 80GB HBM3", 81559, (9, 0)),
    ("NVIDIA A100-SXM4-80GB", 81920, (8, 0)),
    ("NVIDIA A100-SXM4-40GB", 40960, (8, 0)),
    ("NVIDIA GeForce RTX 4090", 24564, (8, 9)),
)
SELECTORS: tuple[list[str], ...] = ([], [], ["H100"], ["A100"], ["RTX 4090"], ["H100", "A100 80GB"])
PRICES = ("0.50", "1.00", "1.50", "2.00", "3.00")
HEALTH = ("Healthy",) * 8 + ("Degraded", "NeedsReset", "Unhealthy", "Lost")

PROPERTY = settings(max_examples=150, deadline=None)


@st.composite
def meshes(draw: st.DrawFn) -> list[NodeOffer]:
    count = draw(st.integers(1, 12))
    names = [f"n{i}" for i in range(count)]
    offers = []
    if draw(st.integers(0, 5)):  # usually a trusted CPU-only node for heads
        offers.append(
            NodeOffer(
                name="head",
                supplier="s1",
                region="eu",
                gpu_model="",
                gpu_memory_mib=0,
                compute_capability=(0, 0),
                gpus_total=0,
                gpus_free=0,
                price_per_gpu_hour=Decimal(0),
                verified=True,
                reputation=0.9,
                health="Healthy",
                head_capable=True,
                cpu_free_millicores=draw(st.sampled_from((1000, 16000))),
                memory_free_bytes=64 * GIB,
            )
        )
    for name in names:
        total = draw(st.sampled_from((0, 1, 2, 4, 8, 8)))
        product, memory, capability = draw(st.sampled_from(HARDWARE)) if total else ("", 0, (0, 0))
        rtt = {
            peer: float(draw(st.sampled_from((5, 40, 120))))
            for peer in names
            if peer != name and draw(st.booleans()) and draw(st.booleans())
        }
        offers.append(
            NodeOffer(
                name=name,
                supplier=draw(st.sampled_from(("s1", "s2", "s3"))),
                region=draw(st.sampled_from(("eu", "us"))),
                gpu_model=product,
                gpu_memory_mib=memory,
                compute_capability=capability,
                gpus_total=total,
                gpus_free=draw(st.one_of(st.just(total), st.integers(0, total))),
                price_per_gpu_hour=Decimal(draw(st.sampled_from(PRICES))),
                verified=draw(st.integers(0, 3)) > 0,
                reputation=draw(st.sampled_from((0.0, 0.5, 0.9))),
                health=draw(st.sampled_from(HEALTH)),
                cordoned=draw(st.integers(0, 9)) == 0,
                tainted=draw(st.integers(0, 9)) == 0,
                head_capable=draw(st.booleans()),
                cpu_free_millicores=draw(st.sampled_from((0, 6000, 64000, 64000, 64000))),
                memory_free_bytes=draw(st.sampled_from((0, 40 * GIB, 512 * GIB, 512 * GIB))),
                rtt_ms=rtt,
            )
        )
    return offers


@st.composite
def groups(draw: st.DrawFn, name: str | None = None) -> dict[str, Any]:
    group: dict[str, Any] = {
        "gpu": {"models": draw(st.sampled_from(SELECTORS))},
        "gpusPerWorker": draw(st.sampled_from((1, 1, 2, 4))),
        "replicas": draw(st.integers(0, 4)),
    }
    if draw(st.booleans()):
        group["cpuPerWorker"] = "2"
        group["memoryPerWorker"] = "8Gi"
    if draw(st.integers(0, 6)) == 0:
        group["gpu"]["minMemoryMib"] = 40000
    if draw(st.integers(0, 6)) == 0:
        group["gpu"]["minComputeCapability"] = "8.9"
    if name is not None:
        group["name"] = name
    return group


@st.composite
def cluster_specs(draw: st.DrawFn) -> GPUClusterSpec:
    placement: dict[str, Any] = {"strategy": draw(st.sampled_from(("Pack", "Spread")))}
    if draw(st.integers(0, 2)) == 0:
        placement["maxPricePerGpuHour"] = draw(st.sampled_from(PRICES))
    if draw(st.integers(0, 5)) == 0:
        placement["regions"] = ["eu"]
    if draw(st.integers(0, 5)) == 0:
        placement["suppliers"] = ["s1", "s2"]
    if draw(st.integers(0, 5)) == 0:
        placement["verifiedOnly"] = True
    if draw(st.integers(0, 5)) == 0:
        placement["minReputation"] = 0.5
    if draw(st.integers(0, 5)) == 0:
        placement["maxLatencyMs"] = 50
    extra = [draw(groups(name="extra"))] if draw(st.integers(0, 3)) == 0 else []
    return GPUClusterSpec.model_validate(
        {
            "workers": draw(groups()),
            "additionalWorkerGroups": extra,
            "placement": placement,
            "head": {"cpu": draw(st.sampled_from(("1", "2")))},
            "priority": draw(st.integers(0, 3)),
            "preemptionPolicy": draw(st.sampled_from(("LowerPriority", "Never"))),
        }
    )


@st.composite
def simple_specs(draw: st.DrawFn) -> GPUClusterSpec:
    """A cluster most meshes can hold: one group, no limits beyond the GPU model."""
    return GPUClusterSpec.model_validate(
        {
            "workers": {
                "gpu": {"models": draw(st.sampled_from(([], [], ["H100"], ["RTX 4090"])))},
                "gpusPerWorker": draw(st.sampled_from((1, 1, 2))),
                "replicas": draw(st.integers(1, 4)),
            },
            "placement": {"strategy": draw(st.sampled_from(("Pack", "Spread")))},
        }
    )


def reservations(mesh: Sequence[NodeOffer]) -> st.SearchStrategy[dict[str, int]]:
    return st.dictionaries(st.sampled_from([o.name for o in mesh]), st.integers(0, 3), max_size=3)


# --- checks ----------------------------------------------------------------------------


def assert_hard_constraints(
    spec: GPUClusterSpec,
    mesh: Sequence[NodeOffer],
    decision: Decision,
) -> None:
    """Every assignment and the head satisfy every hard constraint."""
    by_name = {o.name: o for o in mesh}
    groups_by_name = dict(spec.worker_groups())
    policy = spec.placement
    for a in decision.assignments:
        offer = by_name[a.node]
        group = groups_by_name[a.group]
        selector = group.gpu
        assert a.gpus_per_worker == group.gpus_per_worker
        assert not selector.models or any(
            model_matches(m, offer.gpu_model) for m in selector.models
        )
        assert selector.min_memory_mib is None or offer.gpu_memory_mib >= selector.min_memory_mib
        assert selector.min_compute_capability is None or offer.compute_capability >= (
            parse_compute_capability(selector.min_compute_capability)
        )
        assert not policy.regions or offer.region in policy.regions
        assert not policy.suppliers or offer.supplier in policy.suppliers
        assert policy.max_price_per_gpu_hour is None or (
            offer.price_per_gpu_hour <= policy.max_price_per_gpu_hour
        )
        assert not policy.verified_only or offer.verified
        assert policy.min_reputation is None or offer.reputation >= policy.min_reputation
        assert offer.health in ACCEPTING_HEALTH
        assert not offer.cordoned and not offer.tainted
    if policy.max_latency_ms is not None:
        nodes = [by_name[n] for n in {a.node for a in decision.assignments}]
        for x in nodes:
            for y in nodes:
                rtt = x.rtt_to(y) if x is not y else None
                assert rtt is None or rtt <= policy.max_latency_ms
    if decision.head_node is not None:
        head = by_name[decision.head_node]
        assert head.head_capable and head.accepts_work


def assert_within_capacity(
    mesh: Sequence[NodeOffer],
    held: Mapping[str, tuple[int, int, int]],
    reserved: Mapping[str, int] = {},
) -> None:
    """What is held per node fits what the node has free, less its reservations."""
    by_name = {o.name: o for o in mesh}
    for node, (gpus, cpu, memory) in held.items():
        offer = by_name[node]
        assert gpus == 0 or gpus <= offer.gpus_free - reserved.get(node, 0), node
        assert cpu <= offer.cpu_free_millicores, node
        assert memory <= offer.memory_free_bytes, node


def holdings(spec: GPUClusterSpec, decision: Decision) -> dict[str, tuple[int, int, int]]:
    """Per node, the GPUs, CPU and memory a decision holds, computed from its spec."""
    per_worker = {n: group_constraints(spec, n, g) for n, g in spec.worker_groups()}
    held: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for a in decision.assignments:
        cons = per_worker[a.group]
        held[a.node][0] += a.gpus
        held[a.node][1] += a.workers * cons.cpu_per_worker
        held[a.node][2] += a.workers * cons.memory_per_worker
    if decision.head_node is not None:
        held[decision.head_node][1] += cpu_millicores(spec.head.cpu)
        held[decision.head_node][2] += memory_bytes(spec.head.memory)
    return {node: (g, c, m) for node, (g, c, m) in held.items()}


def assert_gang(spec: GPUClusterSpec, decision: Decision) -> None:
    if not decision.ok:
        assert decision.assignments == () and decision.head_node is None
        assert decision.explanation
        return
    for name, group in spec.worker_groups():
        assert sum(a.workers for a in decision.assignments if a.group == name) == group.replicas
    assert decision.head_node is not None
    assert decision.price_per_hour == sum(
        (a.gpus * a.price_per_gpu_hour for a in decision.assignments), Decimal(0)
    )


# --- placement properties --------------------------------------------------------------


@PROPERTY
@given(st.data())
def test_a_decision_is_whole_within_capacity_and_within_every_limit(data: st.DataObject) -> None:
    mesh = data.draw(meshes())
    spec = data.draw(cluster_specs())
    reserved = data.draw(reservations(mesh))
    decision = place_cluster(spec, mesh, reserved=reserved)
    event(f"placed: {decision.reason}")
    assert_gang(spec, decision)
    assert_hard_constraints(spec, mesh, decision)
    assert_within_capacity(mesh, holdings(spec, decision), reserved)
    assert decision.usage == tuple(sorted((u for u in decision.usage), key=lambda u: u.node))
    assert {u.node: (u.gpus, u.cpu_millicores, u.memory_bytes) for u in decision.usage} == (
        holdings(spec, decision)
    )


@PROPERTY
@given(st.data())
def test_the_same_inputs_give_the_same_decision(data: st.DataObject) -> None:
    mesh = data.draw(meshes())
    spec = data.draw(cluster_specs())
    shuffled = list(mesh)
    random.Random(data.draw(st.integers(0, 1000))).shuffle(shuffled)
    assert place_cluster(spec, mesh) == place_cluster(spec, shuffled)


@PROPERTY
@given(st.data())
def test_rescaling_keeps_the_workers_that_may_stay(data: st.DataObject) -> None:
    mesh = data.draw(meshes())
    spec = data.draw(st.one_of(simple_specs(), cluster_specs()))
    first = place_cluster(spec, mesh)
    if not first.ok:
        return
    replicas = data.draw(st.integers(0, 8))
    workers = spec.workers.model_copy(
        update={"replicas": replicas, "min_replicas": 0, "max_replicas": None}
    )
    rescaled = spec.model_copy(update={"workers": workers})
    second = place_cluster(rescaled, mesh, current=first.assignments)
    event(f"rescaled {spec.workers.replicas} -> {replicas}: {second.reason}")
    before = {(a.group, a.node): a.workers for a in first.assignments}
    after = {(a.group, a.node): a.workers for a in second.assignments}
    assert_gang(rescaled, second)
    assert_within_capacity(mesh, holdings(rescaled, second))
    if replicas <= spec.workers.replicas:
        assert second.ok, second.explanation
        assert all(after[key] <= before[key] for key in after)
    if second.ok:
        for key, workers_before in before.items():
            if key[0] != "workers" or replicas >= spec.workers.replicas:
                assert after.get(key, 0) >= workers_before, key


# --- admission properties ---------------------------------------------------------------


@st.composite
def backlogs(draw: st.DrawFn, prefix: str, priorities: Sequence[int]) -> list[Request]:
    requests = []
    for i in range(draw(st.integers(1, 5))):
        spec = draw(st.one_of(simple_specs(), cluster_specs()))
        spec = spec.model_copy(update={"priority": draw(st.sampled_from(priorities))})
        requests.append(
            Request.for_cluster(
                draw(st.sampled_from(("ns-a", "ns-b"))),
                f"{prefix}{i}",
                spec,
                NOW - timedelta(seconds=draw(st.sampled_from((0, 60, 3600)))),
            )
        )
    return requests


def quota_limits() -> st.SearchStrategy[dict[str, QuotaLimit]]:
    limit = st.builds(
        QuotaLimit,
        st.one_of(st.none(), st.integers(0, 12)),
        st.one_of(st.none(), st.sampled_from((Decimal(5), Decimal(20)))),
    )
    return st.dictionaries(st.sampled_from(("ns-a", "ns-b")), limit, max_size=2)


def admitted_as_running(
    requests: Sequence[Request], result_verdicts: Sequence[Any]
) -> list[Running]:
    running = []
    for verdict in result_verdicts:
        if verdict.outcome in ("Admitted", "Preempting") and verdict.decision.assignments:
            r = verdict.request
            running.append(
                Running(
                    r.kind,
                    r.namespace,
                    r.name,
                    r.spec,
                    r.created,
                    verdict.decision.assignments,
                    verdict.decision.head_node,
                    r.priority,
                )
            )
    return running


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_admission_never_overbooks_holds_quotas_and_preempts_only_lower_priority(
    data: st.DataObject,
) -> None:
    check_admission(data, old=(0, 1), new=(0, 1, 2, 3))


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_urgent_work_preempts_only_lower_priority_and_never_overbooks(
    data: st.DataObject,
) -> None:
    check_admission(data, old=(0, 1), new=(5,))


def check_admission(data: st.DataObject, old: Sequence[int], new: Sequence[int]) -> None:
    """Admit a first backlog, run it, admit a second: every property holds after both."""
    mesh = data.draw(meshes())
    quotas = data.draw(quota_limits())
    reserved = data.draw(reservations(mesh))
    earlier = data.draw(backlogs("old", priorities=old))
    first = admit(earlier, mesh, now=NOW, quotas=quotas, reserved=reserved)
    running = admitted_as_running(earlier, first.verdicts)
    backlog = data.draw(backlogs("new", priorities=new))
    result = admit(backlog, mesh, now=NOW, running=running, quotas=quotas, reserved=reserved)

    for verdict in result.verdicts:
        event(f"verdict: {verdict.reason}")
    victims = {p.victim.key for p in result.preemptions}
    assert len(victims) == len(result.preemptions)
    by_key = {v.request.key: v for v in result.verdicts}
    for verdict in result.verdicts:
        assert verdict.explanation
        for preemption in verdict.preemptions:
            assert verdict.request.preemption_policy == "LowerPriority"
            assert preemption.victim.priority < verdict.request.priority
    held: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    usage: dict[str, list[Any]] = defaultdict(lambda: [0, Decimal(0)])
    for workload in running:
        if workload.key in victims:
            continue
        for u in workload.usage():
            for i, value in enumerate((u.gpus, u.cpu_millicores, u.memory_bytes)):
                held[u.node][i] += value
        usage[workload.namespace][0] += workload.gpus
        usage[workload.namespace][1] += workload.price_per_hour
    for verdict in result.verdicts:
        if verdict.outcome not in ("Admitted", "Preempting"):
            continue
        decision = verdict.decision
        assert decision is not None and decision.ok
        assert_gang(verdict.request.spec, decision)
        assert_hard_constraints(verdict.request.spec, mesh, decision)
        for u in decision.usage:
            for i, value in enumerate((u.gpus, u.cpu_millicores, u.memory_bytes)):
                held[u.node][i] += value
        usage[verdict.request.namespace][0] += decision.gpus
        usage[verdict.request.namespace][1] += decision.price_per_hour
    assert_within_capacity(mesh, {n: (g, c, m) for n, (g, c, m) in held.items()}, reserved)
    for namespace, (gpus, price) in usage.items():
        limit = quotas.get(namespace)
        if limit is not None and limit.gpus is not None:
            assert gpus <= limit.gpus
        if limit is not None and limit.price_per_hour is not None:
            assert price <= limit.price_per_hour
    assert set(by_key) == {r.key for r in backlog}
    shuffled = list(backlog)
    random.Random(3).shuffle(shuffled)
    again = admit(
        shuffled, mesh[::-1], now=NOW, running=running[::-1], quotas=quotas, reserved=reserved
    )
    assert again == result
