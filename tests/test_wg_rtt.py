"""Mesh RTTs: the echo's wire format, samples to RTTs, what is published, and two echoes
measuring each other over loopback (127.0.0.0/8 only)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from gpumesh.node_agent.wg.echo import MeshEcho
from gpumesh.node_agent.wg.rtt import (
    PACKET_SIZE,
    REPLY,
    REQUEST,
    Echo,
    RttPolicy,
    RttTable,
    decode,
    probe_targets,
    round_trip_ms,
)


def test_echo_round_trips_and_rejects_everything_else() -> None:
    echo = Echo(REQUEST, 7, 1_000_000_000)
    assert decode(echo.encode()) == echo
    reply = echo.reply(250_000)
    assert decode(reply.encode()) == Echo(REPLY, 7, 1_000_000_000, 250_000)
    assert echo.reply(-5).turnaround_ns == 0
    data = echo.encode()
    assert len(data) == PACKET_SIZE
    for bad in (b"", data[:-1], data + b"x", b"XXXX" + data[4:], data[:4] + b"\x09" + data[5:]):
        assert decode(bad) is None
    assert decode(data[:5] + b"\x07" + data[6:]) is None  # neither request nor reply


def test_round_trip_takes_out_the_responders_turnaround() -> None:
    reply = Echo(REPLY, 1, sent_ns=1_000_000_000, turnaround_ns=40_000_000)
    assert round_trip_ms(reply, received_ns=1_042_500_000) == pytest.approx(2.5)
    assert round_trip_ms(reply, received_ns=1_010_000_000) is None  # a clock step


def test_table_takes_the_median_and_forgets_the_silent_and_the_gone() -> None:
    table = RttTable(window=3, max_losses=2)
    for rtt in (10.0, 11.0, 90.0, 12.0):
        table.record({"a": rtt, "b": 5.0})
    assert table.current() == {"a": 12.0, "b": 5.0}  # median of 11, 90, 12
    table.record({"a": None, "b": 5.0})
    assert table.current()["a"] == 12.0  # one loss: still known
    table.record({"a": None, "b": 5.0})
    assert "a" not in table.current()  # two in a row: unknown
    table.record({"a": 20.0})
    assert table.current() == {"a": 20.0}  # b is no longer probed


def test_policy_publishes_the_nearest_rounded() -> None:
    policy = RttPolicy(max_peers=2)
    assert policy.bounded({"far": 80.0, "near": 1.23456, "mid": 9.0}) == {
        "mid": 9.0,
        "near": 1.23,
    }
    assert list(policy.bounded({"b": 1.0, "a": 1.0, "c": 1.0})) == ["a", "b"]


def test_the_floor_is_the_nearest_member_left_out_rounded_down() -> None:
    policy = RttPolicy(max_peers=2)
    assert policy.floor({"far": 80.019, "near": 1.2, "mid": 9.0, "farther": 95.0}) == 80.01
    assert policy.floor({"near": 1.2, "mid": 9.0}) is None  # nothing left out


@pytest.mark.parametrize(
    ("published", "wanted", "changed"),
    [
        (None, None, False),
        (None, 40.0, True),
        (40.0, None, True),
        (40.0, 47.0, False),  # under 20 %
        (40.0, 49.0, True),
    ],
)
def test_the_floor_is_rewritten_when_it_comes_goes_or_moves_enough(
    published: float | None, wanted: float | None, changed: bool
) -> None:
    assert RttPolicy().floor_changed(published, wanted) is changed


@pytest.mark.parametrize(
    ("published", "wanted", "changed"),
    [
        ({"a": 10.0}, {"a": 10.9}, False),  # under 1 ms
        ({"a": 10.0}, {"a": 11.9}, False),  # under 20 %
        ({"a": 10.0}, {"a": 12.5}, True),
        ({"a": 0.3}, {"a": 1.2}, False),  # tripled, but under 1 ms
        ({"a": 0.3}, {"a": 1.4}, True),
        ({"a": 10.0}, {"a": 10.0, "b": 3.0}, True),  # a member came
        ({"a": 10.0, "b": 3.0}, {"a": 10.0}, True),  # or went
        ({}, {}, False),
    ],
)
def test_policy_writes_only_meaningful_changes(
    published: dict[str, float], wanted: dict[str, float], changed: bool
) -> None:
    assert RttPolicy().changed(published, wanted) is changed


def test_probe_targets_are_reachable_members_but_not_us() -> None:
    members = [("me", "198.19.0.1"), ("a", "198.19.0.2"), ("b", "198.19.0.3"), ("c", "198.19.0.4")]
    assert probe_targets(members, "me", ["a", "c", "me"]) == {"a": "198.19.0.2", "c": "198.19.0.4"}


# --- two echoes on loopback ------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SlowEcho(MeshEcho):
    """Answers 150 ms late, as a busy agent might."""

    def _answer(
        self, sock: socket.socket, echo: Echo, addr: tuple[str, int], received_ns: int
    ) -> None:
        time.sleep(0.15)
        super()._answer(sock, echo, addr, received_ns)


def launch(echo: MeshEcho, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=echo.run, args=(stop,), daemon=True)
    thread.start()
    return thread


def wait_rounds(echo: MeshEcho, rounds: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while echo.rounds < rounds:
        assert time.monotonic() < deadline, f"only {echo.rounds} rounds"
        time.sleep(0.02)


def test_two_echoes_measure_each_other_and_ignore_strangers() -> None:
    port = free_udp_port()
    a, b, stranger = (
        MeshEcho(port=port, interval_s=0.2, spread_s=0.02, timeout_s=0.5) for _ in range(3)
    )
    stop = threading.Event()
    threads = [launch(e, stop) for e in (a, b, stranger)]
    try:
        a.set_targets("127.0.0.2", {"b": "127.0.0.3"})
        b.set_targets("127.0.0.3", {"a": "127.0.0.2"})
        # The stranger probes a, but a does not count it as a member: no answer.
        stranger.set_targets("127.0.0.4", {"a": "127.0.0.2"})
        for echo in (a, b, stranger):
            wait_rounds(echo, 3)
        assert 0 < a.current()["b"] < 50 and 0 < b.current()["a"] < 50
        assert stranger.current() == {}
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    assert not any(t.is_alive() for t in threads)


def test_a_slow_responder_does_not_inflate_the_rtt() -> None:
    port = free_udp_port()
    prober = MeshEcho(port=port, interval_s=0.3, spread_s=0.01, timeout_s=1.0)
    slow = SlowEcho(port=port, interval_s=60.0, spread_s=0.01, timeout_s=1.0)
    stop = threading.Event()
    threads = [launch(e, stop) for e in (prober, slow)]
    try:
        slow.set_targets("127.0.0.6", {"prober": "127.0.0.5"})
        prober.set_targets("127.0.0.5", {"slow": "127.0.0.6"})
        wait_rounds(prober, 3)
        # Each reply left 150 ms after its request arrived; the RTT is the path's.
        assert 0 < prober.current()["slow"] < 50
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    assert not any(t.is_alive() for t in threads)


def test_an_echo_without_an_address_waits_and_a_new_address_rebinds() -> None:
    port = free_udp_port()
    echo = MeshEcho(port=port, interval_s=0.1, spread_s=0.01, timeout_s=0.2)
    peer = MeshEcho(port=port, interval_s=60.0)
    stop = threading.Event()
    threads = [launch(e, stop) for e in (echo, peer)]
    try:
        time.sleep(0.2)
        assert echo.rounds == 0  # no overlay address yet: nothing bound, nothing sent
        peer.set_targets("127.0.0.8", {"echo": "127.0.0.9"})
        echo.set_targets("127.0.0.7", {"peer": "127.0.0.8"})
        wait_rounds(echo, 2)
        assert "peer" not in echo.current()  # the peer knows us by another address
        echo.set_targets("127.0.0.9", {"peer": "127.0.0.8"})
        rounds = echo.rounds
        wait_rounds(echo, rounds + 2)
        assert "peer" in echo.current()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    assert not any(t.is_alive() for t in threads)
