"""Loopback ports for the processes tests start, away from the kernel's ephemeral range."""

from __future__ import annotations

import socket

from testbed.ports import ephemeral_range, free_port


def test_a_port_is_never_one_an_outgoing_connection_could_take() -> None:
    low, high = ephemeral_range()
    for _ in range(200):
        port = free_port()
        assert not low <= port <= high


def test_a_preferred_port_is_kept_while_free_and_never_one_already_taken() -> None:
    port = free_port()
    assert free_port(preferred=port) == port
    assert free_port(preferred=port, taken={port}) != port


def test_a_port_someone_listens_on_is_not_offered() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        held = sock.getsockname()[1]
        assert free_port(preferred=held) != held
