"""Prometheus metrics for the mesh, from the last device read (no device I/O on scrape).

Per WireGuard peer: handshake age, bytes each way, and whether it is a relay for us.
Per mesh member: how it is reached, ``direct`` or ``relayed`` (and through which peer),
and the round trip over that path (from the agent's echo, every member it measures, not
only the bounded set it publishes).
Handshake age is computed at scrape time from the stored handshake timestamp.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpumesh.node_agent.wg.diff import ObservedDevice
from gpumesh.node_agent.wg.peers import DesiredMesh
from gpumesh.node_agent.wg.sync import SyncResult


class MeshCollector(Collector):
    """Holds the latest sync and device read; renders them on scrape."""

    def __init__(self, node: str, clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self.clock = clock
        self._lock = threading.Lock()
        self._desired: DesiredMesh | None = None
        self._observed = ObservedDevice()
        self._generation = -1
        self._syncs = 0
        self._failures = 0
        self._peer_ops = {"create": 0, "change": 0, "remove": 0}
        self._routes = {"add": 0, "remove": 0}
        self._last_sync_s = math.nan
        self._rtt_ms: dict[str, float] = {}

    def record_sync(self, result: SyncResult) -> None:
        with self._lock:
            self._desired = result.desired or self._desired
            self._observed = result.observed
            self._generation = result.generation
            self._syncs += 1
            self._peer_ops["create"] += result.changes.created
            self._peer_ops["change"] += result.changes.changed
            self._peer_ops["remove"] += len(result.changes.removals)
            self._routes["add"] += len(result.routes.added)
            self._routes["remove"] += len(result.routes.removed)
            self._last_sync_s = result.seconds

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1

    def record_observed(self, observed: ObservedDevice) -> None:
        with self._lock:
            self._observed = observed

    def record_rtt(self, rtt_ms: dict[str, float]) -> None:
        with self._lock:
            self._rtt_ms = dict(rtt_ms)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            desired, observed = self._desired, self._observed
            now = self.clock()
            node = self.node
            names = {p.public_key: p.name for p in desired.peers} if desired else {}
            relays = {p.public_key for p in desired.peers if p.via_for} if desired else set()
            age = GaugeMetricFamily(
                "gpumesh_mesh_peer_handshake_age_seconds",
                "Seconds since the latest handshake with the peer (absent: none yet).",
                labels=["node", "peer"],
            )
            rx = CounterMetricFamily(
                "gpumesh_mesh_peer_receive_bytes",
                "Bytes received from the peer.",
                labels=["node", "peer"],
            )
            tx = CounterMetricFamily(
                "gpumesh_mesh_peer_transmit_bytes",
                "Bytes sent to the peer.",
                labels=["node", "peer"],
            )
            relay = GaugeMetricFamily(
                "gpumesh_mesh_peer_is_relay",
                "1 when the peer relays traffic for other nodes to or from this one.",
                labels=["node", "peer"],
            )
            for key in sorted(observed.peers):
                peer = observed.peers[key]
                name = names.get(key, key)
                if peer.last_handshake is not None:
                    age.add_metric([node, name], max(0.0, now - peer.last_handshake))
                rx.add_metric([node, name], peer.rx_bytes)
                tx.add_metric([node, name], peer.tx_bytes)
                relay.add_metric([node, name], 1.0 if key in relays else 0.0)
            yield from (age, rx, tx, relay)
            path = GaugeMetricFamily(
                "gpumesh_mesh_member_path",
                "How this node reaches each mesh member: mode direct or relayed, via peer.",
                labels=["node", "member", "mode", "via"],
            )
            if desired is not None:
                for member, via in sorted(desired.path_of().items()):
                    mode = "direct" if member == via else "relayed"
                    path.add_metric([node, member, mode, via], 1.0)
            yield path
            rtt = GaugeMetricFamily(
                "gpumesh_mesh_member_rtt_seconds",
                "Round trip to the member over the mesh (median of recent echo rounds).",
                labels=["node", "member"],
            )
            for member, ms in sorted(self._rtt_ms.items()):
                rtt.add_metric([node, member], ms / 1e3)
            yield rtt
            unreachable = GaugeMetricFamily(
                "gpumesh_mesh_unreachable_members",
                "Members with no path from this node (NAT'd with no relay).",
                labels=["node"],
            )
            unreachable.add_metric([node], len(desired.unreachable) if desired else 0)
            yield unreachable
            generation = GaugeMetricFamily(
                "gpumesh_mesh_catalogue_generation",
                "Generation of the last catalogue applied.",
                labels=["node"],
            )
            generation.add_metric([node], self._generation)
            yield generation
            syncs = CounterMetricFamily(
                "gpumesh_mesh_syncs", "Syncs by result.", labels=["node", "result"]
            )
            syncs.add_metric([node, "ok"], self._syncs)
            syncs.add_metric([node, "error"], self._failures)
            yield syncs
            ops = CounterMetricFamily(
                "gpumesh_mesh_peer_operations", "Per-peer device writes.", labels=["node", "op"]
            )
            for op, count in self._peer_ops.items():
                ops.add_metric([node, op], count)
            yield ops
            routes = CounterMetricFamily(
                "gpumesh_mesh_route_operations", "Pod route writes.", labels=["node", "op"]
            )
            for op, count in self._routes.items():
                routes.add_metric([node, op], count)
            yield routes
            seconds = GaugeMetricFamily(
                "gpumesh_mesh_last_sync_seconds", "Duration of the last sync.", labels=["node"]
            )
            seconds.add_metric([node], self._last_sync_s)
            yield seconds


def registry_with(collector: MeshCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
