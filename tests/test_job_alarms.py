"""The Job alarm clock: wakes Jobs at the times asked for, and coalesces queue passes."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

from gpumesh.operator.handlers.job import Alarms
from gpumesh.operator.world import ClusterKey


def test_alarms_fire_in_time_order_and_queue_passes_coalesce() -> None:
    fired: list[ClusterKey | None] = []
    done = threading.Event()

    def fire(key: ClusterKey | None) -> None:
        fired.append(key)
        if len(fired) == 3:
            done.set()

    alarms = Alarms(fire)
    alarms.start()
    try:
        now = datetime.now(UTC)
        late, early = ClusterKey("ns", "late", "Job"), ClusterKey("ns", "early", "Job")
        alarms.at(late, now + timedelta(seconds=0.6))
        alarms.at(early, now + timedelta(seconds=0.3))
        alarms.at(early, now + timedelta(seconds=0.3))  # the same alarm twice: once
        for _ in range(5):
            alarms.queue_pass()  # a burst of kicks: one pass
        assert done.wait(5)
        time.sleep(0.3)
        assert fired == [None, early, late]
    finally:
        alarms.stop()


def test_a_failing_alarm_does_not_stop_the_clock() -> None:
    fired: list[ClusterKey | None] = []
    done = threading.Event()

    def fire(key: ClusterKey | None) -> None:
        fired.append(key)
        if len(fired) == 1:
            raise RuntimeError("boom")
        done.set()

    alarms = Alarms(fire)
    alarms.start()
    try:
        alarms.queue_pass()
        alarms.at(ClusterKey("ns", "j", "Job"), datetime.now(UTC) + timedelta(seconds=0.4))
        assert done.wait(5)
    finally:
        alarms.stop()
