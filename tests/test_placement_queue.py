"""Admission: queue order, backfill, the starvation barrier, GPUQuota and preemption."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from gpumesh.api.gpucluster import GPUClusterSpec
from gpumesh.api.gpuquota import GPUQuota
from gpumesh.api.job import JobSpec
from gpumesh.operator.placement import (
    AdmissionResult,
    NodeOffer,
    QuotaLimit,
    Request,
    Running,
    admit,
    place_cluster,
    quota_limits,
)
from gpumesh.operator.placement.synthetic import make_offer

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def spec(gpus_per_worker: int = 8, replicas: int = 1, **fields: Any) -> GPUClusterSpec:
    workers = {"gpusPerWorker": gpus_per_worker, "replicas": replicas} | fields.pop("workers", {})
    return GPUClusterSpec.model_validate({"workers": workers} | fields)


def request(name: str, age_s: float = 60, namespace: str = "team-a", **spec_fields: Any) -> Request:
    return Request.for_cluster(namespace, name, spec(**spec_fields), NOW - timedelta(seconds=age_s))


def mesh(*offers: NodeOffer) -> list[NodeOffer]:
    head = make_offer("head", gpus_total=0, gpu_model="", head_capable=True)
    return [*offers, head]


def running(
    name: str,
    inventory: list[NodeOffer],
    priority: int = 0,
    namespace: str = "team-b",
    **spec_fields: Any,
) -> Running:
    cluster = spec(priority=priority, **spec_fields)
    decision = place_cluster(cluster, inventory)
    assert decision.ok, decision.explanation
    return Running(
        "GPUCluster",
        namespace,
        name,
        cluster,
        NOW - timedelta(hours=1),
        decision.assignments,
        decision.head_node,
        priority,
    )


def outcomes(result: AdmissionResult) -> dict[str, tuple[str, str]]:
    return {v.request.name: (v.outcome, v.reason) for v in result.verdicts}


def test_higher_priority_goes_first_then_older() -> None:
    inventory = mesh(make_offer("a"))
    result = admit(
        [
            request("old-low", age_s=600),
            request("young-high", age_s=1, priority=10),
            request("young-low", age_s=1),
        ],
        inventory,
        now=NOW,
    )
    assert [v.request.name for v in result.verdicts] == ["young-high", "old-low", "young-low"]
    assert outcomes(result)["young-high"] == ("Admitted", "Admitted")
    assert [(v.request.name, v.position) for v in result.verdicts if v.outcome == "Queued"] == [
        ("old-low", 0),
        ("young-low", 1),
    ]


def test_small_requests_backfill_behind_a_big_one() -> None:
    inventory = mesh(make_offer("a", gpus_free=4))
    result = admit(
        [request("big", age_s=120, replicas=1), request("small", age_s=60, gpus_per_worker=2)],
        inventory,
        now=NOW,
    )
    assert outcomes(result) == {"big": ("Queued", "NoCapacity"), "small": ("Admitted", "Admitted")}


def test_a_starving_request_holds_back_later_ones_that_would_take_its_gpus() -> None:
    inventory = mesh(
        make_offer("h100", gpus_free=4),
        make_offer("us-h100", gpus_free=4, region="us-east"),
        make_offer("rtx", gpu_model="NVIDIA GeForce RTX 4090", gpus_free=4),
    )
    big = request(
        "big", age_s=3600, placement={"regions": ["eu-west"]}, workers={"gpu": {"models": ["H100"]}}
    )
    h100 = {"gpu": {"models": ["H100"]}}
    result = admit(
        [
            big,
            request("fits-elsewhere", age_s=50, gpus_per_worker=4, workers=h100),
            request("only-its-gpus", age_s=40, gpus_per_worker=2, workers=h100),
            request(
                "other-model", age_s=30, gpus_per_worker=4, workers={"gpu": {"models": ["4090"]}}
            ),
        ],
        inventory,
        now=NOW,
    )
    got = outcomes(result)
    assert got["big"] == ("Queued", "NoCapacity")
    assert result.verdicts[0].explanation.endswith(
        "later requests for the same GPUs now wait for this one"
    )
    # Later requests keep off the node big could use: the first fits elsewhere, the
    # second would fit only there and waits.
    assert got["fits-elsewhere"] == ("Admitted", "Admitted")
    assert got["only-its-gpus"] == ("Queued", "BehindStarvingRequest")
    assert got["other-model"] == ("Admitted", "Admitted")
    behind = result.outcome_of("GPUCluster/team-a/only-its-gpus")
    assert behind is not None
    assert behind.explanation == (
        "waiting behind GPUCluster team-a/big, which has waited 60 min for the GPUs this would take"
    )


def test_unsatisfiable_requests_never_become_barriers() -> None:
    inventory = mesh(make_offer("a"))
    result = admit(
        [request("impossible", age_s=7200, replicas=2), request("fits", gpus_per_worker=4)],
        inventory,
        now=NOW,
    )
    assert outcomes(result) == {
        "impossible": ("Queued", "Unsatisfiable"),
        "fits": ("Admitted", "Admitted"),
    }


def test_gpu_quota_queues_what_would_pass_it() -> None:
    inventory = mesh(make_offer("a"), make_offer("b"), make_offer("c"))
    quotas = {"team-a": QuotaLimit(gpus=12)}
    result = admit(
        [request("first", age_s=3), request("second", age_s=2), request("other", namespace="x")],
        inventory,
        now=NOW,
        quotas=quotas,
    )
    assert outcomes(result) == {
        "first": ("Admitted", "Admitted"),
        "second": ("Queued", "QuotaExceeded"),
        "other": ("Admitted", "Admitted"),
    }
    second = result.outcome_of("GPUCluster/team-a/second")
    assert second is not None
    assert second.explanation == (
        "GPUQuota of namespace team-a: 8 of 12 GPUs in use and this needs 8"
    )
    assert result.usage["team-a"].gpus == 8


def test_price_quota_counts_the_placement_cost() -> None:
    inventory = mesh(make_offer("a", price_per_gpu_hour=Decimal("2.50")))
    quotas = {"team-a": QuotaLimit(price_per_hour=Decimal("19.99"))}
    result = admit([request("dear")], inventory, now=NOW, quotas=quotas)
    [verdict] = result.verdicts
    assert (verdict.outcome, verdict.reason) == ("Queued", "QuotaExceeded")
    assert verdict.explanation == (
        "GPUQuota of namespace team-a: $0.00/h of $19.99/h in use and the cheapest "
        "placement adds $20.00/h"
    )


def test_running_workloads_hold_capacity_and_quota() -> None:
    inventory = mesh(make_offer("a"), make_offer("b"))
    holder = running("holder", inventory, namespace="team-a")
    result = admit(
        [request("next"), request("third")],
        inventory,
        now=NOW,
        running=[holder],
        quotas={"team-a": QuotaLimit(gpus=16)},
    )
    assert outcomes(result) == {
        "next": ("Admitted", "Admitted"),
        "third": ("Queued", "QuotaExceeded"),
    }
    admitted = result.verdicts[0].decision
    assert admitted is not None
    assert {a.node for a in admitted.assignments}.isdisjoint({a.node for a in holder.assignments})


def test_preemption_takes_only_lower_priority_and_names_both_sides() -> None:
    inventory = mesh(make_offer("a"))
    low = running("low", inventory, priority=1)
    result = admit([request("urgent", priority=5)], inventory, now=NOW, running=[low])
    [verdict] = result.verdicts
    assert (verdict.outcome, verdict.reason) == ("Preempting", "Preempting")
    [preemption] = verdict.preemptions
    assert preemption.victim is low
    assert preemption.victim_message == (
        "preempted by GPUCluster team-a/urgent (priority 5 > 1) to free 8 GPUs on a"
    )
    assert preemption.preemptor_message.startswith(
        "preempting 1 lower-priority workload (GPUCluster team-b/low) to fit: placed 1 worker"
    )
    equal = admit([request("peer", priority=1)], inventory, now=NOW, running=[low])
    assert outcomes(equal) == {"peer": ("Queued", "NoCapacity")}
    never = admit(
        [request("polite", priority=5, preemptionPolicy="Never")], inventory, now=NOW, running=[low]
    )
    assert outcomes(never) == {"polite": ("Queued", "NoCapacity")}


def test_preemption_picks_the_fewest_victims() -> None:
    inventory = mesh(make_offer("a", gpus_free=8), make_offer("b", gpus_free=8))
    small_1 = running("small-1", [make_offer("a"), *mesh()], gpus_per_worker=4)
    small_2 = running("small-2", [make_offer("a"), *mesh()], gpus_per_worker=4)
    big = running("big", [make_offer("b"), *mesh()])
    result = admit(
        [request("urgent", priority=10)], inventory, now=NOW, running=[small_1, small_2, big]
    )
    [verdict] = result.verdicts
    assert [p.victim.name for p in verdict.preemptions] == ["big"]


def test_preemption_frees_only_for_the_preemptor() -> None:
    inventory = mesh(make_offer("a"))
    low = running("low", inventory, priority=0, gpus_per_worker=8)
    result = admit(
        [request("urgent", priority=5, gpus_per_worker=4), request("sneaky", gpus_per_worker=4)],
        inventory,
        now=NOW,
        running=[low],
    )
    assert outcomes(result) == {
        "urgent": ("Preempting", "Preempting"),
        "sneaky": ("Queued", "NoCapacity"),
    }


def test_a_running_cluster_in_the_backlog_rescales_in_place() -> None:
    inventory = mesh(make_offer("a"), make_offer("b", price_per_gpu_hour=Decimal("1.00")))
    current = running("train", inventory, namespace="team-a", gpus_per_worker=2, replicas=2)
    grow = request("train", gpus_per_worker=2, replicas=3)
    result = admit([grow], inventory, now=NOW, running=[current], quotas={"team-a": QuotaLimit(8)})
    [verdict] = result.verdicts
    assert verdict.outcome == "Admitted", verdict.explanation
    assert verdict.decision is not None
    kept = {a.node: a.workers for a in verdict.decision.assignments}
    assert all(kept[a.node] >= a.workers for a in current.assignments)
    shrink = request("train", gpus_per_worker=2, replicas=1)
    squeezed = admit(
        [shrink], inventory, now=NOW, running=[current], quotas={"team-a": QuotaLimit(0)}
    )
    assert outcomes(squeezed) == {"train": ("Admitted", "Admitted")}


def test_suspended_requests_are_held() -> None:
    result = admit([request("held", suspend=True)], mesh(make_offer("a")), now=NOW)
    assert outcomes(result) == {"held": ("Suspended", "Suspended")}


def test_jobs_on_existing_clusters_are_not_requests() -> None:
    on_cluster = JobSpec.model_validate({"entrypoint": "python x.py", "clusterRef": {"name": "c"}})
    assert Request.for_job("ns", "j", on_cluster, NOW) is None
    templated = JobSpec.model_validate(
        {
            "entrypoint": "python x.py",
            "clusterTemplate": {"workers": {"replicas": 2}},
            "priority": 7,
            "preemptionPolicy": "Never",
        }
    )
    job = Request.for_job("ns", "j", templated, NOW)
    assert job is not None
    assert (job.key, job.priority, job.preemption_policy, job.gpus) == ("Job/ns/j", 7, "Never", 2)


def test_quota_limits_take_the_tightest_of_each_namespace() -> None:
    quotas = [
        GPUQuota.model_validate(
            {"metadata": {"name": "a", "namespace": "ns"}, "spec": {"hard": {"gpus": 16}}}
        ),
        GPUQuota.model_validate(
            {
                "metadata": {"name": "b", "namespace": "ns"},
                "spec": {"hard": {"gpus": 8, "pricePerHour": "30"}},
            }
        ),
    ]
    assert quota_limits(quotas) == {"ns": QuotaLimit(gpus=8, price_per_hour=Decimal(30))}


def test_the_pass_is_deterministic() -> None:
    inventory = mesh(*(make_offer(f"n{i}", gpus_free=i % 8 + 1) for i in range(12)))
    backlog = [
        request(f"r{i}", age_s=i % 5, gpus_per_worker=i % 3 + 1, replicas=2) for i in range(20)
    ]
    first = admit(backlog, inventory, now=NOW)
    again = admit(list(reversed(backlog)), list(reversed(inventory)), now=NOW)
    assert first == again
