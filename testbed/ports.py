"""Loopback ports for processes the dev cluster, tests and benchmarks start.

A port is chosen here and bound a moment later by another process. One taken from the
kernel's ephemeral range (what binding port 0 gives) can be taken in between as the local
port of any outgoing connection, and this machine's tests open thousands: the process
then fails with "address already in use" (it did, in CI). So ports come from below that
range, where the kernel never puts a connection of its own.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(preferred: int = 0, taken: Collection[int] = ()) -> int:
    """A loopback port nobody listens on now and the kernel will not hand to an outgoing
    connection: ``preferred`` when it is free, else one at random below the ephemeral
    range (above it when that range starts too low). Never one of ``taken``."""
    if preferred and preferred not in taken and bindable(preferred):
        return preferred
    low, high = ephemeral_range()
    first, last = (LOWEST, low - 1) if low - LOWEST >= 1000 else (high + 1, 65535)
    for _ in range(1000):
        port = random.randint(first, last)
        if port not in taken and bindable(port):
            return port
    raise RuntimeError(f"no free loopback port in {first}-{last}")
