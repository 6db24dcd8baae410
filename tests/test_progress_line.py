"""Turns for progress-only status writes: a token bucket with a first-come line."""

from __future__ import annotations

import threading
import time

from gpumesh.operator.progress import ProgressLine


class Clock:
    """Stands still until set, or runs with real time once ``live``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.live = False

    def __call__(self) -> float:
        return time.monotonic() if self.live else self.now


def test_writes_go_at_once_until_the_burst_is_spent() -> None:
    line: ProgressLine[str] = ProgressLine(rate=2, burst=3, clock=Clock())
    assert [line.may_write(k) for k in "abcd"] == [True, True, True, False]
    assert line.waiting() == 1


def test_the_line_is_served_first_come_at_the_rate() -> None:
    clock = Clock()
    line: ProgressLine[str] = ProgressLine(rate=2, burst=1, clock=clock)
    assert line.may_write("a")
    for key in "bcd":
        assert not line.may_write(key)
    assert line.serve() == ([], 0.5)  # no token yet: the next turn in half a second

    clock.now = 0.5
    assert line.serve() == (["b"], 0.5)
    clock.now = 1.5  # two tokens' worth of time, but the bucket holds one
    assert line.serve() == (["c"], 0.5)
    clock.now = 2.0
    assert line.serve() == (["d"], None)


def test_a_served_key_writes_once_and_then_queues_again() -> None:
    clock = Clock()
    line: ProgressLine[str] = ProgressLine(rate=1, burst=1, clock=clock)
    assert line.may_write("a") and not line.may_write("b")
    clock.now = 1.0
    assert line.serve() == (["b"], None)
    assert line.may_write("b")  # its turn
    assert not line.may_write("b")  # and only one


def test_a_key_keeps_its_place_when_it_asks_again() -> None:
    clock = Clock()
    line: ProgressLine[str] = ProgressLine(rate=1, burst=1, clock=clock)
    line.may_write("a")
    for key in "bcb":
        line.may_write(key)
    clock.now = 1.0
    assert line.serve()[0] == ["b"]


def test_a_key_that_leaves_gives_its_turn_to_the_next() -> None:
    clock = Clock()
    line: ProgressLine[str] = ProgressLine(rate=1, burst=1, clock=clock)
    line.may_write("a")
    line.may_write("b")
    line.may_write("c")
    line.leave("b")  # it became Ready: written at once, not as progress
    clock.now = 1.0
    assert line.serve() == (["c"], None)


def test_newcomers_queue_behind_those_waiting_even_when_a_token_is_free() -> None:
    clock = Clock()
    line: ProgressLine[str] = ProgressLine(rate=1, burst=1, clock=clock)
    line.may_write("a")
    line.may_write("b")
    clock.now = 1.0
    assert not line.may_write("c")  # b came first
    assert line.serve()[0] == ["b"]


def test_no_limit_when_the_rate_is_zero() -> None:
    line: ProgressLine[str] = ProgressLine(rate=0, burst=1, clock=Clock())
    assert all(line.may_write(k) for k in "abcdef")
    assert line.waiting() == 0


def test_the_thread_wakes_each_waiting_key_once() -> None:
    clock = Clock()
    line: ProgressLine[int] = ProgressLine(rate=1000, burst=1, clock=clock)
    woken: list[int] = []
    done = threading.Event()

    def wake(key: int) -> None:
        woken.append(key)
        if len(woken) == 5:
            done.set()

    line.may_write(0)
    for key in range(1, 6):
        assert not line.may_write(key)
    clock.live = True
    line.start(wake)
    try:
        assert done.wait(10)
    finally:
        line.stop()
    assert woken == [1, 2, 3, 4, 5]
