"""From the catalogue to this node's desired WireGuard peers and routes (pure, O(N)).

Every agent runs the same function on the same catalogue, so the mesh is consistent
without the operator computing N peer maps. The rules:

- A node with an endpoint (public) has every other public node as a direct peer, with its
  endpoint. A NAT'd node's addresses go into the allowed IPs of its relay's peer entry,
  unless this node *is* that relay: then the NAT'd node is a direct peer with no endpoint
  (it dials in; its NAT mapping is learned from the handshake) and persistent keepalive.
- A NAT'd node has one peer, its relay, with persistent keepalive and the allowed IPs of
  every other member: everything goes through the relay.
- Each member's allowed IPs are its overlay address (/32) and its pod range; every range
  appears in exactly one peer, as WireGuard's cryptokey routing requires.
- Members that cannot be reached (NAT'd with no relay, or whose relay is gone) are left
  out and listed in :attr:`DesiredMesh.unreachable`.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass

from gpumesh.api.mesh import Catalogue, CatalogueEntry

DEFAULT_KEEPALIVE_S = 25


@dataclass(frozen=True, slots=True)
class DesiredPeer:
    """One WireGuard peer entry this node should have."""

    name: str
    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    """Canonical CIDRs, sorted."""
    keepalive_s: int
    """0: off."""
    via_for: tuple[str, ...] = ()
    """Other nodes reached through this peer (it relays for them, or for us)."""


@dataclass(frozen=True)
class DesiredMesh:
    """Everything the agent configures: interface address, peers, routes."""

    me: CatalogueEntry
    address: str
    """Overlay address with the overlay prefix, as ``198.19.0.5/24``."""
    peers: tuple[DesiredPeer, ...]
    """Sorted by node name."""
    routes: tuple[str, ...]
    """Pod ranges of reachable members, routed over the interface (sorted)."""
    unreachable: tuple[str, ...]
    relays_for: tuple[str, ...]
    """NAT'd nodes this node relays for: it must forward packets."""

    def by_key(self) -> dict[str, DesiredPeer]:
        return {p.public_key: p for p in self.peers}

    def path_of(self) -> dict[str, str]:
        """Node name -> name of the peer that carries its traffic (itself when direct)."""
        out: dict[str, str] = {}
        for peer in self.peers:
            out[peer.name] = peer.name
            for other in peer.via_for:
                out[other] = peer.name
        return out


def canonical_cidr(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=False))


def derive_peers(
    catalogue: Catalogue, me: str, *, keepalive_s: int = DEFAULT_KEEPALIVE_S
) -> DesiredMesh | None:
    """This node's desired mesh, or None when it is not (yet) a member.

    A non-member keeps its current configuration: dropping every peer because a heartbeat
    was late would cut the node off for nothing (its peers drop it anyway).
    """
    entries = catalogue.entries
    mine = next((e for e in entries if e.name == me), None)
    if mine is None:
        return None
    prefix = ipaddress.ip_network(catalogue.overlay_cidr).prefixlen
    address = f"{mine.overlay_ip}/{prefix}"
    keys_seen = {mine.public_key}
    members: list[CatalogueEntry] = []
    unreachable: list[str] = []
    for e in entries:
        if e.name == me:
            continue
        if e.public_key in keys_seen:  # a cloned key: WireGuard can hold it only once
            unreachable.append(e.name)
            continue
        keys_seen.add(e.public_key)
        members.append(e)
    by_name = {e.name: e for e in members}
    by_name[me] = mine

    def relay_of(e: CatalogueEntry) -> CatalogueEntry | None:
        relay = by_name.get(e.relay) if e.relay else None
        return relay if relay is not None and relay.endpoint is not None else None

    peers: list[DesiredPeer] = []
    reachable: list[CatalogueEntry] = []
    if mine.endpoint is None:
        relay = relay_of(mine)
        if relay is None or relay.name == me:
            unreachable += [e.name for e in members]
        else:
            carried = []
            for e in members:
                if e.name == relay.name:
                    continue
                if e.endpoint is None and relay_of(e) is None:
                    unreachable.append(e.name)  # NAT'd with no relay: no path at all
                else:
                    carried.append(e)
            ips = [*relay.allowed_ips, *(ip for e in carried for ip in e.allowed_ips)]
            peers.append(
                DesiredPeer(
                    name=relay.name,
                    public_key=relay.public_key,
                    endpoint=relay.endpoint,
                    allowed_ips=_sorted_cidrs(ips),
                    keepalive_s=keepalive_s,
                    via_for=tuple(e.name for e in carried),
                )
            )
            reachable = [relay, *carried]
        return _mesh(mine, address, peers, reachable, unreachable, ())

    carried_by: dict[str, list[CatalogueEntry]] = defaultdict(list)
    relays_for: list[str] = []
    for e in members:
        if e.endpoint is not None:
            continue
        relay = relay_of(e)
        if relay is None:
            unreachable.append(e.name)
        elif relay.name == me:
            relays_for.append(e.name)
        else:
            carried_by[relay.name].append(e)
    for e in members:
        if e.endpoint is not None:
            carried = carried_by.get(e.name, [])
            ips = [*e.allowed_ips, *(ip for c in carried for ip in c.allowed_ips)]
            peers.append(
                DesiredPeer(
                    name=e.name,
                    public_key=e.public_key,
                    endpoint=e.endpoint,
                    allowed_ips=_sorted_cidrs(ips),
                    keepalive_s=0,
                    via_for=tuple(c.name for c in carried),
                )
            )
            reachable.append(e)
            reachable += carried
        elif e.name in relays_for:
            peers.append(
                DesiredPeer(
                    name=e.name,
                    public_key=e.public_key,
                    endpoint=None,
                    allowed_ips=_sorted_cidrs(e.allowed_ips),
                    keepalive_s=keepalive_s,
                )
            )
            reachable.append(e)
    return _mesh(mine, address, peers, reachable, unreachable, relays_for)


def _sorted_cidrs(cidrs: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    # Catalogue addresses are canonical already (Catalogue.decode and the planner write
    # them so): plain string sorting is enough, and 10x cheaper than parsing them.
    return tuple(sorted(set(cidrs)))


def _mesh(
    mine: CatalogueEntry,
    address: str,
    peers: list[DesiredPeer],
    reachable: list[CatalogueEntry],
    unreachable: list[str],
    relays_for: list[str] | tuple[str, ...],
) -> DesiredMesh:
    return DesiredMesh(
        me=mine,
        address=address,
        peers=tuple(sorted(peers, key=lambda p: p.name)),
        routes=_sorted_cidrs([e.pod_cidr for e in reachable]),
        unreachable=tuple(sorted(unreachable)),
        relays_for=tuple(sorted(relays_for)),
    )
