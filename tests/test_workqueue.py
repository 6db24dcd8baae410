"""The work queue: bursts collapse, one key never runs twice at once, failures retry."""

from __future__ import annotations

import threading
import time
from collections import Counter

from gpumesh.operator.workqueue import WorkQueue


def wait_idle(queue: WorkQueue[str], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not queue.idle():
        assert time.monotonic() < deadline, "queue never went idle"
        time.sleep(0.01)


def test_a_burst_of_adds_for_one_key_is_processed_once() -> None:
    seen: Counter[str] = Counter()
    gate = threading.Event()

    def process(key: str) -> None:
        gate.wait(5)
        seen.update([key])

    queue: WorkQueue[str] = WorkQueue(process, workers=2)
    for _ in range(50):
        queue.add("a")
    queue.add("b")
    queue.start()
    gate.set()
    try:
        wait_idle(queue)
        assert seen == Counter({"a": 1, "b": 1})
    finally:
        queue.stop()


def test_a_key_added_while_it_runs_runs_again_afterwards_never_concurrently() -> None:
    running = 0
    most = 0
    runs = 0
    started = threading.Event()
    release = threading.Event()
    lock = threading.Lock()

    def process(_: str) -> None:
        nonlocal running, most, runs
        with lock:
            running += 1
            most = max(most, running)
            runs += 1
        started.set()
        release.wait(5)
        with lock:
            running -= 1

    queue: WorkQueue[str] = WorkQueue(process, workers=4)
    queue.start()
    try:
        queue.add("a")
        assert started.wait(5)
        for _ in range(10):
            queue.add("a")  # arrives during the run: one more run after it
        release.set()
        wait_idle(queue)
        assert (runs, most) == (2, 1)
    finally:
        queue.stop()


def test_delayed_keys_wait_and_an_earlier_request_wins() -> None:
    times: dict[str, float] = {}

    def process(key: str) -> None:
        times.setdefault(key, time.monotonic())

    queue: WorkQueue[str] = WorkQueue(process)
    queue.start()
    try:
        start = time.monotonic()
        queue.add("late", after=0.3)
        queue.add("soon", after=1.0)
        queue.add("soon", after=0.1)  # the earlier time replaces the later one
        wait_idle(queue)
        assert 0.09 <= times["soon"] - start < 0.5
        assert times["late"] - start >= 0.29
        assert times["soon"] < times["late"]
    finally:
        queue.stop()


def test_a_failing_key_is_retried_with_backoff_until_it_succeeds() -> None:
    attempts: list[float] = []

    def process(_: str) -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise RuntimeError("API said no")

    queue: WorkQueue[str] = WorkQueue(process, backoff=0.05, max_backoff=1.0)
    queue.start()
    try:
        queue.add("a")
        wait_idle(queue)
        assert len(attempts) == 3
        first_gap, second_gap = attempts[1] - attempts[0], attempts[2] - attempts[1]
        assert first_gap >= 0.045 and second_gap >= 0.095  # 0.05 s, then doubled
    finally:
        queue.stop()


def test_none_is_a_key_like_any_other() -> None:
    seen: list[str | None] = []
    queue: WorkQueue[str | None] = WorkQueue(seen.append, workers=1)
    queue.start()
    try:
        queue.add(None)
        queue.add("after")
        deadline = time.monotonic() + 5
        while len(seen) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert seen == [None, "after"]
    finally:
        queue.stop()
