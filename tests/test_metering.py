"""Metering arithmetic: GPU-seconds and exact Decimal cost from placements and timestamps,
counted once across reconciles, restarts and stale reads; and the Prometheus counters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry

from gpumesh.api.gpucluster import GPUClusterStatus, Metering, WorkerPlacement
from gpumesh.api.job import JobStatus
from gpumesh.operator.jobs.metering import Flush, holdings, meter, rounded_cost
from gpumesh.operator.jobs.metrics import UsageCounters

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def placement(node: str, gpus: int, price: str, supplier: str = "acme") -> WorkerPlacement:
    return WorkerPlacement(
        group="workers",
        node=node,
        supplier=supplier,
        region="eu-west",
        gpu_model="NVIDIA A100-SXM4-80GB",
        workers=gpus,
        gpus=gpus,
        price_per_gpu_hour=Decimal(price),
        ready=gpus,
    )


A = placement("node-a", 2, "1.29", "nordic")
B = placement("node-b", 1, "2.49", "atlas")


def metered(status: JobStatus, since: datetime, price_seconds: str = "0") -> JobStatus:
    return status.model_copy(
        update={
            "metering": Metering(metered_until=since, price_seconds=Decimal(price_seconds)),
        }
    )


def test_holdings_add_up_groups_on_one_node() -> None:
    other_group = A.model_copy(update={"group": "extra", "gpus": 1, "workers": 1})
    held = holdings([A, B, other_group])
    assert [(h.node, h.gpus) for h in held] == [("node-a", 3), ("node-b", 1)]


def test_only_ready_workers_are_paid_for() -> None:
    """Placed is not paid: two 4-GPU workers on one node, none ready, then one, then both."""
    placed = A.model_copy(update={"workers": 2, "gpus": 8, "ready": 0})
    assert holdings([placed]) == ()
    one = holdings([placed.model_copy(update={"ready": 1})])
    assert [(h.node, h.gpus) for h in one] == [("node-a", 4)]
    previous = metered(JobStatus(placements=[placed]), at(0))
    current = previous.model_copy(update={"placements": [placed.model_copy(update={"ready": 2})]})
    after, flush = meter(previous, current, at(600), flush_after=60)
    assert after.gpu_seconds == 0 and flush is None  # the 600 s before they were ready
    later, flush = meter(after, after, at(1200), flush_after=60)
    assert later.gpu_seconds == 8 * 600
    assert flush is not None and flush.holdings[0].gpus == 8


def test_metering_starts_when_gpus_are_first_held() -> None:
    previous = JobStatus()
    current = previous.model_copy(update={"placements": [A]})
    started, flush = meter(previous, current, at(0), flush_after=60)
    assert started.metering == Metering(metered_until=at(0))
    assert flush is None and started.gpu_seconds == 0


def test_an_hour_on_two_nodes_costs_exactly_the_sum_of_their_prices() -> None:
    previous = metered(JobStatus(placements=[A, B]), at(0))
    status, flush = meter(previous, previous, at(3600), flush_after=60)
    assert status.gpu_seconds == 3 * 3600
    assert status.cost == Decimal("5.0700")  # 2 x 1.29 + 1 x 2.49
    assert status.metering is not None
    assert status.metering.metered_until == at(3600)
    assert status.metering.price_seconds == Decimal("18252.00")
    assert flush == Flush(at(0), at(3600), holdings([A, B]))


def test_nothing_is_written_until_the_flush_interval_unless_the_status_changes() -> None:
    previous = metered(JobStatus(placements=[A]), at(0))
    same, flush = meter(previous, previous, at(59.9), flush_after=60)
    assert same == previous and flush is None
    moved = previous.model_copy(update={"phase": "Running"})
    written, flush = meter(previous, moved, at(30.5), flush_after=60)
    assert written.phase == "Running" and written.gpu_seconds == 60
    assert written.metering is not None and written.metering.metered_until == at(30)
    assert flush is not None and flush.seconds == 30


def test_a_change_within_the_first_second_leaves_the_mark_exactly_as_written() -> None:
    previous = metered(JobStatus(placements=[A]), at(0))
    moved = previous.model_copy(update={"phase": "Running"})
    written, flush = meter(previous, moved, at(0.4), flush_after=60)
    assert written.metering == previous.metering and flush is None
    assert written.to_api()["metering"] == previous.to_api()["metering"]  # no "0" -> "0.00"


def test_whole_seconds_are_counted_and_the_fraction_waits() -> None:
    previous = metered(JobStatus(placements=[A]), at(0))
    first, _ = meter(previous, previous, at(60.7), flush_after=60)
    assert first.metering is not None and first.metering.metered_until == at(60)
    second, _ = meter(first, first, at(120.3), flush_after=60)
    assert second.gpu_seconds == 2 * 120  # 0.7 + 0.3 carried over, nothing lost


def test_rounding_never_accumulates() -> None:
    # 7 s of 1 GPU at $1.29/h is $0.0025083..., rounded to $0.0025 each time
    previous = metered(JobStatus(placements=[placement("n", 1, "1.29")]), at(0))
    status = previous
    for step in range(1, 1001):
        status, _ = meter(status, status.model_copy(update={"message": str(step)}), at(7 * step), 0)
    assert status.metering is not None
    assert status.metering.price_seconds == Decimal("1.29") * 7000
    assert status.cost == rounded_cost(Decimal("9030.00")) == Decimal("2.5083")


def test_a_repeated_reconcile_from_the_same_status_counts_the_same_total() -> None:
    previous = metered(JobStatus(placements=[A]), at(0))
    once, _ = meter(previous, previous, at(90), flush_after=60)
    again, _ = meter(previous, previous, at(90), flush_after=60)
    assert once == again  # recomputed from the written base, never added twice


def test_releasing_gpus_meters_the_last_stretch_then_stops() -> None:
    previous = metered(JobStatus(placements=[A], gpu_seconds=100), at(0), "64.50")
    released = previous.model_copy(update={"placements": [], "phase": "Succeeded"})
    done, flush = meter(previous, released, at(45), flush_after=60)
    assert done.gpu_seconds == 100 + 2 * 45
    assert flush is not None and flush.seconds == 45
    later, flush = meter(done, done.model_copy(update={"message": "x"}), at(4000), 60)
    assert later.gpu_seconds == done.gpu_seconds and flush is None
    assert later.metering is not None and later.metering.metered_until == at(4000)


def test_gpucluster_status_is_metered_the_same_way() -> None:
    previous = GPUClusterStatus(
        placements=[B], metering=Metering(metered_until=at(0)), gpu_seconds=None
    )
    status, _ = meter(previous, previous, at(120), flush_after=60)
    assert status.gpu_seconds == 120 and status.cost == Decimal("0.0830")
    assert GPUClusterStatus.model_validate(status.to_api()) == status


def test_metering_round_trips_through_the_api_form() -> None:
    previous = metered(JobStatus(placements=[A]), at(0))
    status, _ = meter(previous, previous, at(61), flush_after=60)
    wire = status.to_api()
    assert wire["metering"] == {"meteredUntil": "2026-01-01T12:01:01Z", "priceSeconds": "157.38"}
    assert wire["cost"] == "0.0437"
    assert JobStatus.model_validate(wire) == status


def test_counters_count_per_supplier_node_once() -> None:
    registry = CollectorRegistry()
    counters = UsageCounters(registry)
    flush = Flush(at(0), at(3600), holdings([A, B]))
    counters.record("team-a", "Job", "train", flush)
    counters.record("team-a", "Job", "train", flush)  # the same flush again: a stale read
    overlap = Flush(at(1800), at(5400), holdings([A, B]))
    counters.record("team-a", "Job", "train", overlap)  # only 3600..5400 is new
    labels = {"namespace": "team-a", "kind": "Job", "name": "train"}
    a = labels | {"node": "node-a", "supplier": "nordic"}
    b = labels | {"node": "node-b", "supplier": "atlas"}
    assert registry.get_sample_value("gpumesh_gpu_seconds_total", a) == 2 * 5400
    assert registry.get_sample_value("gpumesh_gpu_seconds_total", b) == 5400
    assert registry.get_sample_value("gpumesh_cost_usd_total", a) == pytest.approx(1.29 * 2 * 1.5)
    assert registry.get_sample_value("gpumesh_cost_usd_total", b) == pytest.approx(2.49 * 1.5)
    counters.record("team-a", "Job", "train", None)
    counters.forget("team-a", "Job", "train")
    counters.record("team-a", "Job", "train", Flush(at(5400), at(5401), holdings([B])))
    assert registry.get_sample_value("gpumesh_gpu_seconds_total", b) == 5401
