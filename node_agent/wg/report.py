"""What the mesh agent writes into its GPUNode's ``status.mesh``, and the patch for it (pure).

The agent owns ``publicKey``, ``endpoints``, ``peerEndpoints`` and ``rttMs``; the
operator owns the rest of ``status.mesh`` and this patch never names those fields.

- ``endpoints``: the configured candidates, best first, then the endpoint peers saw
  after a handshake (``observedEndpoint``, copied there by the operator from the relay's
  ``peerEndpoints``): for a NAT'd node, its NAT mapping.
- ``peerEndpoints``: on a relay, the endpoint each NAT'd node it relays for handshook
  from (its NAT mapping), while that handshake is fresh.
- ``rttMs``: round trips to the nearest members (see :class:`~.rtt.RttPolicy`), and
  ``rttFloorMs``, the least round trip among the measured members left out.

The patch is a JSON merge patch of the status subresource computed against what the API
holds: only fields that differ, and ``null`` for RTT entries to drop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from gpumesh.api.mesh import valid_endpoint
from gpumesh.node_agent.wg.diff import ObservedDevice
from gpumesh.node_agent.wg.peers import DesiredMesh

MAX_ENDPOINTS: Final = 16
MAX_PEER_ENDPOINTS: Final = 5000
"""The API's bounds (``status.mesh.endpoints`` and ``peerEndpoints``)."""
FRESH_HANDSHAKE_S: Final = 180.0
"""WireGuard rejects session keys older than this (REJECT_AFTER_TIME), and a live peer
with keepalive re-handshakes well within it: an older endpoint may be gone."""


@dataclass(frozen=True)
class MeshReport:
    """The agent-owned ``status.mesh`` fields."""

    public_key: str | None
    endpoints: tuple[str, ...] = ()
    peer_endpoints: tuple[tuple[str, str], ...] = ()
    """(node, endpoint), sorted by node."""
    rtt_ms: Mapping[str, float] = field(default_factory=dict)
    rtt_floor_ms: float | None = None
    """Every measured peer left out of ``rtt_ms`` is at least this far (None: none is)."""


def read_report(gpunode: Mapping[str, Any] | None) -> tuple[MeshReport, str | None]:
    """What the API holds of the agent's fields, and the operator's ``observedEndpoint``.

    Malformed entries are dropped (they then differ from what we want, and get rewritten).
    """
    mesh = ((gpunode or {}).get("status") or {}).get("mesh") or {}
    key = mesh.get("publicKey")
    endpoints = mesh.get("endpoints")
    rows = mesh.get("peerEndpoints")
    rtts = mesh.get("rttMs")
    observed = mesh.get("observedEndpoint")
    floor = mesh.get("rttFloorMs")
    peer_endpoints = tuple(
        (str(r["node"]), str(r["endpoint"]))
        for r in (rows if isinstance(rows, list) else [])
        if isinstance(r, Mapping)
        and isinstance(r.get("node"), str)
        and isinstance(r.get("endpoint"), str)
    )
    report = MeshReport(
        public_key=key if isinstance(key, str) else None,
        endpoints=tuple(str(e) for e in endpoints) if isinstance(endpoints, list) else (),
        peer_endpoints=peer_endpoints,
        rtt_ms={
            str(n): float(v)
            for n, v in (rtts.items() if isinstance(rtts, Mapping) else [])
            if isinstance(v, int | float) and not isinstance(v, bool)
        },
        rtt_floor_ms=float(floor)
        if isinstance(floor, int | float) and not isinstance(floor, bool)
        else None,
    )
    return report, observed if isinstance(observed, str) and valid_endpoint(observed) else None


def endpoint_candidates(configured: tuple[str, ...], observed: str | None) -> tuple[str, ...]:
    """Configured candidates first, then the handshake-observed one; no repeats, bounded."""
    candidates = [*configured, *([observed] if observed else [])]
    return tuple(dict.fromkeys(candidates))[:MAX_ENDPOINTS]


def handshake_endpoints(
    desired: DesiredMesh | None, observed: ObservedDevice, now: float
) -> tuple[tuple[str, str], ...]:
    """(node, endpoint) for each NAT'd node we relay for whose handshake is fresh.

    Only a relay sees a NAT'd node's mapping (the NAT'd node dials it); nodes with a
    public endpoint are reached at the one they publish.
    """
    if desired is None or not desired.relays_for:
        return ()
    relayed = set(desired.relays_for)
    out: list[tuple[str, str]] = []
    for peer in desired.peers:
        if peer.name not in relayed:
            continue
        seen = observed.peers.get(peer.public_key)
        if (
            seen is not None
            and seen.endpoint is not None
            and seen.last_handshake is not None
            and now - seen.last_handshake <= FRESH_HANDSHAKE_S
            and valid_endpoint(seen.endpoint)
        ):
            out.append((peer.name, seen.endpoint))
    return tuple(sorted(out))[:MAX_PEER_ENDPOINTS]


def report_patch(have: MeshReport, want: MeshReport, *, rtt: bool) -> dict[str, Any] | None:
    """Merge patch turning ``have`` into ``want`` (RTTs only when ``rtt``), or None."""
    mesh: dict[str, Any] = {}
    if want.public_key is not None and have.public_key != want.public_key:
        mesh["publicKey"] = want.public_key
    if have.endpoints != want.endpoints:
        mesh["endpoints"] = list(want.endpoints)
    if have.peer_endpoints != want.peer_endpoints:
        mesh["peerEndpoints"] = [{"node": n, "endpoint": e} for n, e in want.peer_endpoints]
    if rtt and dict(have.rtt_ms) != dict(want.rtt_ms):
        changes: dict[str, float | None] = {n: None for n in have.rtt_ms if n not in want.rtt_ms}
        changes.update((n, ms) for n, ms in want.rtt_ms.items() if have.rtt_ms.get(n) != ms)
        mesh["rttMs"] = changes
    if rtt and have.rtt_floor_ms != want.rtt_floor_ms:
        mesh["rttFloorMs"] = want.rtt_floor_ms
    return {"status": {"mesh": mesh}} if mesh else None
