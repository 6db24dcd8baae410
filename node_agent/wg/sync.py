"""One node's mesh sync: catalogue in, device and routes brought in line, changes out.

Each :meth:`MeshSyncer.sync` reads the device and the routes back and compares before it
writes, so the same call serves a new catalogue and drift repair (a peer or route removed
by hand comes back on the next sync). An unchanged plan writes nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gpumesh.api.mesh import Catalogue, valid_endpoint
from gpumesh.node_agent.wg.device import WgBackend
from gpumesh.node_agent.wg.diff import (
    ObservedDevice,
    PeerChanges,
    apply_changes,
    creation,
    diff_device,
)
from gpumesh.node_agent.wg.keys import KeyStore, PrivateKey
from gpumesh.node_agent.wg.links import Links, RouteChanges
from gpumesh.node_agent.wg.peers import DEFAULT_KEEPALIVE_S, DesiredMesh, derive_peers

log = logging.getLogger(__name__)

DEFAULT_LISTEN_PORT = 51820
DEFAULT_MTU = 1420
"""1420 suits data-centre underlays; use 1280 across the open internet (blackholes)."""


def resolve_endpoint(endpoint: str) -> str | None:
    """``host:port`` -> ``ip:port`` as the device reports it; None if unresolvable."""
    if not valid_endpoint(endpoint):
        return None
    host, _, port = endpoint.rpartition(":")
    bare = host.strip("[]")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:
        return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    try:
        infos = socket.getaddrinfo(bare, int(port), type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        for info in infos:
            if info[0] == family:
                addr = str(info[4][0])
                return f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}"
    return None


class CachingResolver:
    """Resolves each endpoint once per ``ttl_s`` (address literals once for good)."""

    def __init__(
        self,
        resolve: Callable[[str], str | None] = resolve_endpoint,
        *,
        ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolve = resolve
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[str | None, float]] = {}

    def __call__(self, endpoint: str) -> str | None:
        now = self._clock()
        hit = self._cache.get(endpoint)
        if hit is not None and hit[1] > now:
            return hit[0]
        value = self._resolve(endpoint)
        literal = value is not None and endpoint == value
        self._cache[endpoint] = (value, float("inf") if literal else now + self._ttl_s)
        return value


@dataclass(frozen=True)
class SyncResult:
    """What one sync found and did."""

    generation: int
    desired: DesiredMesh | None
    changes: PeerChanges
    routes: RouteChanges
    link_changes: tuple[str, ...]
    observed: ObservedDevice
    seconds: float
    at: float = field(default_factory=time.time)

    @property
    def changed(self) -> bool:
        return bool(self.changes or self.routes or self.link_changes)

    def summary(self) -> str:
        c = self.changes
        peers = f"+{c.created} ~{c.changed} -{len(c.removals)} peers"
        routes = f"+{len(self.routes.added)} -{len(self.routes.removed)} routes"
        extra = f", {', '.join(self.link_changes)}" if self.link_changes else ""
        key = ", key installed" if c.set_private_key else ""
        return f"generation {self.generation}: {peers}, {routes}{key}{extra}"


class MeshSyncer:
    """Owns one node's WireGuard device, key and routes."""

    def __init__(
        self,
        node: str,
        backend: WgBackend,
        keys: KeyStore,
        links: Links | None,
        *,
        listen_port: int = DEFAULT_LISTEN_PORT,
        mtu: int = DEFAULT_MTU,
        keepalive_s: int = DEFAULT_KEEPALIVE_S,
        manage_forwarding: bool = True,
        resolver: Callable[[str], str | None] | None = None,
    ) -> None:
        self.node = node
        self.backend = backend
        self.keys = keys
        self.links = links
        self.listen_port = listen_port
        self.mtu = mtu
        self.keepalive_s = keepalive_s
        self.manage_forwarding = manage_forwarding
        self.resolver = resolver or CachingResolver()
        self._key: PrivateKey | None = None
        self._applied_endpoints: dict[str, str] = {}
        self.last: SyncResult | None = None

    @property
    def key(self) -> PrivateKey:
        if self._key is None:
            self._key = self.keys.load_or_create()
        return self._key

    @property
    def public_key(self) -> str:
        return self.key.public_key

    def start(self) -> None:
        """Load (or make) the key and make sure the device exists and holds it."""
        _ = self.key
        self.backend.ensure()
        observed = self.backend.observe()
        changes = diff_device(
            [], observed, public_key=self.public_key, listen_port=self.listen_port
        )
        # Only the key and port: peers wait for the catalogue (an agent restart must not
        # drop the peers the device still has).
        self.backend.apply(
            PeerChanges(set_private_key=changes.set_private_key, listen_port=changes.listen_port),
            self.key,
        )

    def observe(self) -> ObservedDevice:
        return self.backend.observe()

    def rotate_key(self) -> str:
        """New key pair on disk and on the device; returns the new public key.

        Peers keep the old public key until the catalogue carries the new one, so the
        node is unreachable for about one catalogue round trip: publish at once.
        """
        self._key = self.keys.rotate()
        self.backend.apply(PeerChanges(set_private_key=True), self._key)
        return self._key.public_key

    def recreate(self, keys: Iterable[str]) -> PeerChanges:
        """Remove these peers and create them again as the last sync left them, in one
        transaction: the device then sends each a fresh handshake initiation at once (see
        :mod:`~gpumesh.node_agent.wg.handshake`; only for peers that never handshook, so no
        session is dropped). Keys the last sync did not configure are skipped."""
        desired = self.last.desired if self.last is not None else None
        peers = {p.public_key: p for p in desired.peers} if desired is not None else {}
        updates = tuple(
            creation(peers[key], self._applied_endpoints.get(key)) for key in keys if key in peers
        )
        changes = PeerChanges(updates=updates, removals=tuple(u.public_key for u in updates))
        self.backend.apply(changes, self.key)
        return changes

    def sync(self, catalogue: Catalogue) -> SyncResult:
        started = time.perf_counter()
        desired = derive_peers(catalogue, self.node, keepalive_s=self.keepalive_s)
        link_changes: list[str] = []
        route_changes = RouteChanges()
        observed = self.backend.observe()
        if desired is None:
            changes = diff_device(
                [], observed, public_key=self.public_key, listen_port=self.listen_port
            )
            changes = PeerChanges(
                set_private_key=changes.set_private_key, listen_port=changes.listen_port
            )
            self.backend.apply(changes, self.key)
        else:
            if self.links is not None:
                link_changes += self.links.configure(desired.address, self.mtu)
            resolved = {
                p.endpoint: r
                for p in desired.peers
                if p.endpoint is not None and (r := self.resolver(p.endpoint)) is not None
            }
            changes = diff_device(
                desired.peers,
                observed,
                public_key=self.public_key,
                listen_port=self.listen_port,
                applied_endpoints=self._applied_endpoints,
                resolved=resolved,
            )
            self.backend.apply(changes, self.key)
            self._applied_endpoints = {
                p.public_key: resolved[p.endpoint]
                for p in desired.peers
                if p.endpoint is not None and p.endpoint in resolved
            }
            if self.links is not None:
                route_changes = self.links.sync_routes(desired.routes)
                if desired.relays_for and self.manage_forwarding:
                    link_changes += self.links.enable_forwarding()
        # Not read back: a set the device accepted holds exactly what was sent.
        observed = apply_changes(observed, changes, self.public_key)
        result = SyncResult(
            generation=catalogue.generation,
            desired=desired,
            changes=changes,
            routes=route_changes,
            link_changes=tuple(link_changes),
            observed=observed,
            seconds=time.perf_counter() - started,
        )
        self.last = result
        return result
