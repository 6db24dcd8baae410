"""Leader election: one leader at a time, a takeover only after the Lease has lapsed on the
candidate's own clock, a leader that cannot renew stops, a clean stop hands over at once."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from gpumesh.clock import ManualClock
from gpumesh.operator.leader import (
    Elector,
    LeaseConflictError,
    Terms,
    leader_lease,
    next_step,
    observe,
)

TERMS = Terms(duration_s=8, renew_deadline_s=6.0, retry_s=1.0)


class FakeStore:
    """One Lease with the API server's optimistic concurrency: a write must carry the
    resourceVersion last stored, a create must find no Lease."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.down = False

    def read(self) -> dict[str, Any] | None:
        if self.down:
            raise ConnectionError("API server unreachable")
        return None if self.lease is None else {**self.lease}

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if self.lease is not None:
            raise LeaseConflictError("exists")
        return self._store(body)

    def replace(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if self.down:
            raise ConnectionError("API server unreachable")
        if self.lease is None or body["metadata"].get("resourceVersion") != str(self.version):
            raise LeaseConflictError("resourceVersion changed")
        return self._store(body)

    def _store(self, body: Mapping[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.lease = {
            **body,
            "metadata": {**body["metadata"], "resourceVersion": str(self.version)},
        }
        return {**self.lease}


def elector(store: FakeStore, clock: ManualClock, me: str) -> Elector:
    return Elector(store, name="gpumesh-operator", namespace="ns", me=me, terms=TERMS, clock=clock)


def lease(holder: str, renewed: str = "t1", duration: int = 8) -> dict[str, Any]:
    spec = {"holderIdentity": holder, "renewTime": renewed, "leaseDurationSeconds": duration}
    return {"spec": spec, "metadata": {"resourceVersion": "1"}}


def test_terms_must_leave_room_to_renew_before_the_lease_lapses() -> None:
    with pytest.raises(ValueError, match="retry < renew deadline < lease duration"):
        Terms(duration_s=5, renew_deadline_s=5.0, retry_s=1.0)


def test_no_lease_is_created_and_an_own_lease_is_renewed() -> None:
    assert next_step(None, "a", None, 0.0, TERMS).action == "create"
    assert next_step(lease("a"), "a", None, 0.0, TERMS).action == "renew"


def test_a_released_lease_is_taken_at_once() -> None:
    assert next_step(lease(""), "b", None, 0.0, TERMS).action == "take"


def test_another_holder_is_waited_out_for_a_whole_duration_on_the_candidates_clock() -> None:
    held = lease("a", renewed="2020-01-01T00:00:00.000000Z")  # an old clock says nothing
    seen = observe(held, None, 100.0)
    step = next_step(held, "b", seen, 100.0, TERMS)
    assert (step.action, step.holder, step.for_s) == ("wait", "a", 8.0)
    seen = observe(held, seen, 107.9)
    assert next_step(held, "b", seen, 107.9, TERMS).action == "wait"
    assert next_step(held, "b", observe(held, seen, 108.0), 108.0, TERMS).action == "take"


def test_a_renewal_restarts_the_wait() -> None:
    seen = observe(lease("a", "t1"), None, 100.0)
    renewed = lease("a", "t2")
    seen = observe(renewed, seen, 107.0)
    assert seen is not None and seen.at == 107.0
    assert next_step(renewed, "b", seen, 110.0, TERMS).action == "wait"


def test_taking_over_counts_a_transition_and_a_release_empties_the_holder() -> None:
    now = datetime(2026, 12, 7, tzinfo=UTC)
    taken = leader_lease(
        "l",
        "ns",
        "b",
        TERMS,
        now,
        {**lease("a"), "spec": {**lease("a")["spec"], "leaseTransitions": 3}},
    )
    assert taken["spec"]["holderIdentity"] == "b"
    assert taken["spec"]["leaseTransitions"] == 4
    assert taken["metadata"]["resourceVersion"] == "1"
    released = leader_lease("l", "ns", "b", TERMS, now, taken, release=True)
    assert released["spec"]["holderIdentity"] == ""
    assert released["spec"]["leaseTransitions"] == 4


def test_two_candidates_racing_for_a_free_lease_give_one_leader() -> None:
    store, clock = FakeStore(), ManualClock(1000.0, datetime(2026, 12, 7, tzinfo=UTC))
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    # Both read "no Lease"; a writes first, so b's create is refused.
    assert a.store.read() is None and b.store.read() is None
    assert a.try_once().action == "create"
    assert b.try_once().action == "wait"
    assert store.lease is not None and store.lease["spec"]["holderIdentity"] == "a"


def test_a_stale_write_is_refused_so_two_takers_cannot_both_win() -> None:
    store, clock = FakeStore(), ManualClock(1000.0, datetime(2026, 12, 7, tzinfo=UTC))
    a, b, c = (elector(store, clock, name) for name in "abc")
    assert a.try_once().action == "create"
    assert b.try_once().action == "wait" and c.try_once().action == "wait"
    clock.advance(9)  # a died: its Lease lapses for both b and c
    read_by_c = store.read()
    assert b.try_once().action == "take"
    # c decided on what it read before b's write: its update carries the old version.
    body = leader_lease("gpumesh-operator", "ns", "c", TERMS, clock.now(), read_by_c)
    with pytest.raises(LeaseConflictError):
        store.replace(body)
    assert c.try_once().action == "wait"
    assert store.lease is not None and store.lease["spec"]["holderIdentity"] == "b"


def test_a_standby_takes_over_one_duration_after_the_leaders_last_renewal() -> None:
    store, clock = FakeStore(), ManualClock(1000.0, datetime(2026, 12, 7, tzinfo=UTC))
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    a.try_once()
    waited = 0.0
    while b.try_once().action == "wait":
        clock.advance(TERMS.retry_s)
        waited += TERMS.retry_s
        assert waited <= TERMS.duration_s + TERMS.retry_s
    assert waited == pytest.approx(TERMS.duration_s)
    assert b.leader == "b"


class Stepping(threading.Event):
    """A stop event whose waits advance the fake clock instead of sleeping."""

    def __init__(self, clock: ManualClock, store: FakeStore, fail_after: int) -> None:
        super().__init__()
        self.clock, self.store, self.waits, self.fail_after = clock, store, 0, fail_after

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.advance(timeout or 0.0)
        self.waits += 1
        self.store.down = self.waits > self.fail_after
        return self.is_set() or self.waits > 100


def test_a_leader_that_cannot_renew_gives_up_before_its_lease_lapses() -> None:
    store, clock = FakeStore(), ManualClock(1000.0, datetime(2026, 12, 7, tzinfo=UTC))
    a = elector(store, clock, "a")
    assert a.try_once().action == "create"
    reasons: list[str] = []
    lost_at: list[float] = []
    stop = Stepping(clock, store, fail_after=3)
    last_renewal = clock.monotonic() + 3 * TERMS.retry_s

    def lost(reason: str) -> None:
        reasons.append(reason)
        lost_at.append(clock.monotonic())

    a.hold(stop, lost)
    assert reasons == ["not renewed for 6 s"]
    # It stops before a standby could take over (one duration after the last renewal).
    assert last_renewal + TERMS.renew_deadline_s < lost_at[0] < last_renewal + TERMS.duration_s


def test_a_leader_that_finds_another_holder_stops_at_once() -> None:
    store, clock = FakeStore(), ManualClock(1000.0, datetime(2026, 12, 7, tzinfo=UTC))
    a = elector(store, clock, "a")
    a.try_once()
    assert store.lease is not None
    store.lease["spec"] = {**store.lease["spec"], "holderIdentity": "b"}
    reasons: list[str] = []
    a.hold(Stepping(clock, store, fail_after=100), reasons.append)
    assert reasons == ["the Lease is held by b"]


def test_a_clean_stop_releases_the_lease_so_a_standby_takes_it_at_its_next_try() -> None:
    store, clock = FakeStore(), ManualClock(1000.0, datetime(2026, 12, 7, tzinfo=UTC))
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    a.try_once()
    assert b.try_once().action == "wait"
    stop = Stepping(clock, store, fail_after=100)
    stop.set()
    a.hold(stop, lambda reason: pytest.fail(reason))
    assert b.try_once().action == "take"
