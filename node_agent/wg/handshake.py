"""First handshakes nobody answered: start a fresh one after 1 s instead of 5 s (pure).

Agents apply a new catalogue within milliseconds of each other. The first to apply sends
its handshake initiation to a peer that does not know it yet; that peer drops it, and
WireGuard (wireguard-go and the kernel alike) sends the next initiation only after
REKEY_TIMEOUT, 5 s, however many packets wait meanwhile. A NAT'd node is hit hardest: its
relay has no endpoint for it and cannot start the handshake itself, so the node stays cut
off for those 5 s (the mesh lab showed it: a NAT'd host reachable 5.1 s after the others).

A peer we created moments ago, that we sent to (its transmit counter moved) and that never
completed a handshake holds no session to lose. Creating it again makes the device send a
fresh initiation at once. :class:`FirstHandshakes` says which peers are due for that: each
at most once a second, and only in its first seconds; from then on the device's own
retries carry on.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpumesh.node_agent.wg.diff import ObservedDevice

RETRY_AFTER_S = 1.0
"""How long a first initiation may go unanswered before we send a fresh one (a round trip
across the world is under 0.3 s)."""
RETRY_UNTIL_S = 4.0
"""Stop before WireGuard's own retry (REKEY_TIMEOUT, 5 s after the first initiation)."""


class FirstHandshakes:
    """The peers this agent created recently that have not completed a handshake yet."""

    def __init__(self) -> None:
        self._created: dict[str, float] = {}
        self._sent: dict[str, float] = {}
        """Peer -> when its latest initiation can have gone out (creation or retry)."""

    def __len__(self) -> int:
        return len(self._created)

    def created(self, keys: Iterable[str], now: float) -> None:
        """Peers the agent just created (not re-created: their clock keeps running)."""
        for key in keys:
            self._created[key] = now
            self._sent[key] = now

    def next_check(self) -> float | None:
        """When a tracked peer is next due (None: none is tracked)."""
        return min((t + RETRY_AFTER_S for t in self._sent.values()), default=None)

    def due(self, observed: ObservedDevice, now: float) -> list[str]:
        """Peers to create again now; forgets those that handshook, are gone or are past
        :data:`RETRY_UNTIL_S`. A peer we have not sent to yet (no traffic) is left alone:
        its first packet starts a handshake of its own."""
        out: list[str] = []
        for key, created in list(self._created.items()):
            peer = observed.peers.get(key)
            if peer is None or peer.last_handshake is not None or now - created >= RETRY_UNTIL_S:
                del self._created[key], self._sent[key]
            elif now - self._sent[key] >= RETRY_AFTER_S and peer.tx_bytes > 0:
                self._sent[key] = now
                out.append(key)
        return sorted(out)
