"""The agent's mesh echo: answers peers' RTT probes and probes every reachable member.

One UDP socket on ``<overlay address>:<port>``, one thread. The socket is bound to the
overlay address (with IP_FREEBIND, so before the address is up), never to the wildcard:
the echo must not answer on the public underlay. It answers only the overlay addresses of
current members, with a packet of the request's size (no amplification).

Each round spreads its probes over ``spread_s`` (1,000 members: one every millisecond,
so neither WireGuard's queues nor our receive buffer see a burst), waits ``timeout_s``
for the last reply, then records the round in :class:`~gpumesh.node_agent.wg.rtt.RttTable`.
Times come from the kernel's receive timestamps (SO_TIMESTAMPNS), so the agent's own
scheduling delay stays out of the figure; the responder's is subtracted (see
:mod:`gpumesh.node_agent.wg.rtt`).
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import logging
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Final

from gpumesh.node_agent.wg.rtt import (
    DEFAULT_RTT_PORT,
    PACKET_SIZE,
    REPLY,
    REQUEST,
    Echo,
    RttTable,
    decode,
    round_trip_ms,
)

log = logging.getLogger(__name__)

SO_TIMESTAMPNS: Final = 35
"""Linux (asm-generic, x86): the kernel's receive time on each datagram, in ns."""
IP_FREEBIND: Final = 15
_TIMESPEC: Final = struct.Struct("@ll")
_ANCILLARY: Final = socket.CMSG_SPACE(_TIMESPEC.size)
MAX_READS_PER_WAKE: Final = 512


class MeshEcho:
    """Probes ``targets`` every ``interval_s`` and answers their probes; thread-safe."""

    def __init__(
        self,
        *,
        port: int = DEFAULT_RTT_PORT,
        interval_s: float = 10.0,
        spread_s: float = 1.0,
        timeout_s: float = 2.0,
        table: RttTable | None = None,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        self.port = port
        self.interval_s = interval_s
        self.spread_s = spread_s
        self.timeout_s = timeout_s
        self.on_round = on_round
        self.rounds = 0
        self._table = table or RttTable()
        self._lock = threading.Lock()
        self._address: str | None = None
        self._targets: dict[str, str] = {}
        self._sources: frozenset[str] = frozenset()
        self._changed = threading.Event()
        self._said: set[str] = set()

    # --- from the agent ------------------------------------------------------------------

    def set_targets(self, address: str | None, targets: Mapping[str, str]) -> None:
        """Our overlay address and member -> overlay address of everyone to probe."""
        with self._lock:
            moved = address != self._address
            self._address, self._targets = address, dict(targets)
            self._sources = frozenset(targets.values())
        if moved:
            self._changed.set()

    def current(self) -> dict[str, float]:
        """member -> RTT in ms (median of recent rounds), for members that answer."""
        with self._lock:
            return self._table.current()

    # --- the thread ----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        sock: socket.socket | None = None
        bound: str | None = None
        seq = random.getrandbits(32)
        queue: list[tuple[str, str]] = []
        pending: dict[int, tuple[str, str]] = {}
        results: dict[str, float | None] = {}
        started = next_round = time.monotonic()
        in_round = False
        next_send = last_send = 0.0
        spacing = 0.0
        try:
            while not stop.is_set():
                with self._lock:
                    address, targets = self._address, dict(self._targets)
                if address != bound or sock is None:
                    if sock is not None:
                        sock.close()
                    sock, bound = None, address
                    in_round, pending, queue = False, {}, []
                    self._changed.clear()
                    if address is not None:
                        sock = self._open(address)
                    if sock is None:
                        self._changed.wait(min(self.interval_s, 5.0))
                        continue
                now = time.monotonic()
                if not in_round and now >= next_round:
                    in_round, started = True, now
                    queue = sorted(targets.items(), reverse=True)  # popped from the end
                    results = dict.fromkeys(targets)
                    spacing = self.spread_s / max(1, len(queue))
                    next_send = last_send = now
                while queue and now >= next_send:
                    node, ip = queue.pop()
                    seq = (seq + 1) & 0xFFFFFFFF
                    if self._send(sock, ip, Echo(REQUEST, seq, time.time_ns())):
                        pending[seq] = (node, ip)
                    next_send += spacing
                    last_send = now
                if in_round and not queue and (now >= last_send + self.timeout_s or not pending):
                    with self._lock:
                        self._table.record(results)
                    self.rounds += 1
                    in_round, pending = False, {}
                    next_round = started + self.interval_s
                    if self.on_round is not None:
                        self.on_round()
                due = (
                    next_send if queue else (last_send + self.timeout_s if in_round else next_round)
                )
                wait = min(max(0.0, due - time.monotonic()), 0.5)
                readable, _, _ = select.select([sock], [], [], wait)
                if readable:
                    self._drain(sock, pending, results)
        finally:
            if sock is not None:
                sock.close()

    def _open(self, address: str) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            except OSError:
                self._once("timestamps", "no kernel receive timestamps: RTTs include our delay")
            sock.bind((address, self.port))
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            self._once(f"bind:{address}", f"mesh echo cannot bind {address}:{self.port}: {err}")
            return None
        log.info("mesh echo on %s:%d", address, self.port)
        return sock

    def _send(self, sock: socket.socket, ip: str, echo: Echo) -> bool:
        try:
            sock.sendto(echo.encode(), (ip, self.port))
        except OSError as err:  # no route or no peer yet (ENOKEY): counted as lost
            name = errno_codes.errorcode.get(err.errno or 0, str(err))
            log.debug("echo to %s not sent: %s", ip, name)
            return False
        return True

    def _drain(
        self,
        sock: socket.socket,
        pending: dict[int, tuple[str, str]],
        results: dict[str, float | None],
    ) -> None:
        with self._lock:
            sources = self._sources
        for _ in range(MAX_READS_PER_WAKE):
            try:
                data, ancillary, _flags, addr = sock.recvmsg(PACKET_SIZE + 1, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued on the socket: nothing to read
            received_ns = _kernel_time(ancillary) or time.time_ns()
            echo = decode(data)
            source = addr[0] if isinstance(addr, tuple) else None
            if echo is None or source not in sources:
                continue
            if echo.kind == REQUEST:
                self._answer(sock, echo, addr, received_ns)
            elif echo.kind == REPLY:
                match = pending.pop(echo.seq, None)
                if match is not None and match[1] == source:
                    results[match[0]] = round_trip_ms(echo, received_ns)

    def _answer(
        self, sock: socket.socket, echo: Echo, addr: tuple[str, int], received_ns: int
    ) -> None:
        """Reply with our turnaround (kernel receive time to now), so the asker can take
        out whatever delayed us."""
        reply = echo.reply(time.time_ns() - received_ns)
        with contextlib.suppress(OSError):  # the asker is gone: nothing to do
            sock.sendto(reply.encode(), addr)

    def _once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning("%s", message)


def _kernel_time(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack(data[: _TIMESPEC.size])
            return int(sec) * 1_000_000_000 + int(nsec)
    return None
