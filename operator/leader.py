"""Leader election on a coordination.k8s.io Lease: one replica of the operator acts.

Replicas are candidates; the one holding the Lease reconciles, the others wait. The rules
are client-go's (leaderelection):

- A candidate takes the Lease only once it has seen the same record unrenewed for a whole
  ``leaseDurationSeconds`` on its own monotonic clock: no replica trusts another's clock.
- Every write is an update preconditioned on the resourceVersion it read, so two candidates
  never both win.
- A leader that has not renewed within its renew deadline (shorter than the duration) stops
  at once: a new leader can only take the Lease a full duration after the last renewal it
  saw, by which time the old one has already stopped acting.
- A leader that stops cleanly releases the Lease (empty holder), so a candidate takes over
  at its next try instead of waiting out the duration.

:func:`next_step` is the pure decision; :class:`Elector` does the API calls through a
:class:`LeaseStore`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from gpumesh.api.lease import lease_body
from gpumesh.clock import Clock, SystemClock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Terms:
    """How long a Lease holds, how long a leader keeps trying to renew, how often to try."""

    duration_s: int = 10
    renew_deadline_s: float = 7.0
    retry_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_s < self.renew_deadline_s < self.duration_s:
            raise ValueError(
                "leader election needs 0 < retry < renew deadline < lease duration, got "
                f"{self.retry_s} / {self.renew_deadline_s} / {self.duration_s}"
            )


@dataclass(frozen=True)
class Seen:
    """A Lease record as a candidate last saw it change, and when (its monotonic clock)."""

    record: tuple[Any, ...]
    at: float


@dataclass(frozen=True)
class Step:
    """What a candidate does now: ``create`` or ``take`` (it becomes leader), ``renew``
    (it is the leader), or ``wait`` while ``holder`` leads, at most ``for_s`` more."""

    action: Literal["create", "take", "renew", "wait"]
    holder: str | None = None
    for_s: float = 0.0


def record_of(lease: Mapping[str, Any]) -> tuple[Any, ...]:
    """What changes when a holder renews or a new one takes over."""
    spec = lease.get("spec") or {}
    return (
        spec.get("holderIdentity"),
        spec.get("renewTime"),
        spec.get("leaseTransitions"),
        spec.get("leaseDurationSeconds"),
    )


def observe(lease: Mapping[str, Any] | None, seen: Seen | None, now: float) -> Seen | None:
    """The record as seen at ``now``: unchanged records keep the time they were first seen."""
    if lease is None:
        return None
    record = record_of(lease)
    if seen is not None and seen.record == record:
        return seen
    return Seen(record, now)


def next_step(
    lease: Mapping[str, Any] | None, me: str, seen: Seen | None, now: float, terms: Terms
) -> Step:
    """The candidate ``me``'s move, given the Lease as read and as seen (see :func:`observe`)."""
    if lease is None:
        return Step("create")
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or None
    if holder == me:
        return Step("renew", me)
    if holder is None:
        return Step("take")
    duration = spec.get("leaseDurationSeconds")
    if not isinstance(duration, int) or isinstance(duration, bool) or duration <= 0:
        duration = terms.duration_s
    unrenewed = now - seen.at if seen is not None else 0.0
    if unrenewed >= duration:
        return Step("take", holder)
    return Step("wait", holder, duration - unrenewed)


def leader_lease(
    name: str,
    namespace: str,
    me: str,
    terms: Terms,
    now: datetime,
    current: Mapping[str, Any] | None,
    *,
    release: bool = False,
) -> dict[str, Any]:
    """The Lease ``me`` writes to create, take, renew or (``release``) give up leadership."""
    body = lease_body(
        name, namespace, holder=me, duration_s=terms.duration_s, now=now, current=current
    )
    spec_now = (current or {}).get("spec") or {}
    transitions = spec_now.get("leaseTransitions")
    transitions = transitions if isinstance(transitions, int) else 0
    if spec_now.get("holderIdentity") not in (me, None, ""):
        transitions += 1
    body["spec"]["leaseTransitions"] = transitions
    if release:
        # client-go's release: no holder, and a duration of one second for old readers.
        body["spec"]["holderIdentity"] = ""
        body["spec"]["leaseDurationSeconds"] = 1
    return body


class LeaseConflictError(Exception):
    """Someone else wrote the Lease since it was read."""


class LeaseStore(Protocol):
    """The Lease, read and written whole: ``None`` when absent; writes raise
    :class:`LeaseConflictError` when the resourceVersion (or, for create, the name) is taken."""

    def read(self) -> dict[str, Any] | None: ...

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]: ...

    def replace(self, body: Mapping[str, Any]) -> dict[str, Any]: ...


class Elector:
    """One candidate: :meth:`acquire` blocks until it leads; :meth:`hold` renews until the
    renew deadline passes without success, then calls ``lost`` (which must stop acting)."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        name: str,
        namespace: str,
        me: str,
        terms: Terms,
        clock: Clock | None = None,
    ) -> None:
        self.store, self.name, self.namespace, self.me = store, name, namespace, me
        self.terms = terms
        self.clock = clock or SystemClock()
        self._seen: Seen | None = None
        self._lease: dict[str, Any] | None = None
        self.leader: str | None = None
        """Who leads, as last seen (this candidate's name once it does)."""

    def try_once(self) -> Step:
        """Read the Lease and make one move; the returned step says what happened."""
        lease = self.store.read()
        now = self.clock.monotonic()
        self._seen = observe(lease, self._seen, now)
        step = next_step(lease, self.me, self._seen, now, self.terms)
        if step.action == "wait":
            self.leader = step.holder
            return step
        body = leader_lease(self.name, self.namespace, self.me, self.terms, self.clock.now(), lease)
        try:
            self._lease = (
                self.store.create(body) if step.action == "create" else self.store.replace(body)
            )
        except LeaseConflictError:
            self._seen = None  # read again; whoever wrote is seen afresh
            return Step("wait", None, self.terms.retry_s)
        self.leader = self.me
        return step

    def acquire(self, stop: threading.Event, waiting: Callable[[Step], None] | None = None) -> bool:
        """Try every ``retry_s`` until this candidate leads (True) or ``stop`` is set."""
        while not stop.is_set():
            try:
                step = self.try_once()
            except Exception as err:  # an API error: keep trying, as a candidate should
                log.warning("leader election: Lease %s not read or written: %s", self.name, err)
                step = Step("wait")
            if step.action != "wait":
                return True
            if waiting is not None:
                waiting(step)
            stop.wait(self.terms.retry_s)
        return False

    def hold(self, stop: threading.Event, lost: Callable[[str], None]) -> None:
        """Renew every ``retry_s``; once no renewal has succeeded for ``renew_deadline_s``,
        or another holder is found, call ``lost`` and return. Releases on ``stop``."""
        last_renewed = self.clock.monotonic()
        while not stop.wait(self.terms.retry_s):
            try:
                step = self.try_once()
            except Exception as err:
                log.warning("leader election: Lease %s not renewed: %s", self.name, err)
                step = Step("wait")
            if step.action in ("renew", "take", "create"):
                last_renewed = self.clock.monotonic()
                continue
            if step.holder not in (None, self.me):
                lost(f"the Lease is held by {step.holder}")
                return
            if self.clock.monotonic() - last_renewed > self.terms.renew_deadline_s:
                lost(f"not renewed for {self.terms.renew_deadline_s:g} s")
                return
        self.release()

    def release(self) -> None:
        """Give up leadership now, if this candidate holds the Lease as last written."""
        if self._lease is None:
            return
        body = leader_lease(
            self.name,
            self.namespace,
            self.me,
            self.terms,
            self.clock.now(),
            self._lease,
            release=True,
        )
        try:
            self.store.replace(body)
        except Exception as err:
            log.warning("leader election: Lease %s not released: %s", self.name, err)
        self._lease = None
