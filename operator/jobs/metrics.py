"""Prometheus counters of GPU time and spend, per workload and supplier node.

``gpumesh_gpu_seconds_total`` and ``gpumesh_cost_usd_total`` carry the labels namespace,
kind (GPUCluster or Job), name, node and supplier, so a supplier sums what its nodes
earned and a renter what a workload cost. They grow by exactly what metering writes into
status; the process remembers per workload up to when it counted, so a flush computed
again from a status the watch had not yet caught up with is not counted twice.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from prometheus_client import REGISTRY, CollectorRegistry, Counter

from gpumesh.operator.jobs.metering import Flush

log = logging.getLogger(__name__)

LABELS = ("namespace", "kind", "name", "node", "supplier")


class UsageCounters:
    """The two counters, and how far each workload is counted."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.gpu_seconds = Counter(
            "gpumesh_gpu_seconds",
            "GPU-seconds held by gpumesh workloads, per supplier node.",
            LABELS,
            registry=registry,
        )
        self.cost = Counter(
            "gpumesh_cost_usd",
            "US dollars of GPU time held by gpumesh workloads, per supplier node.",
            LABELS,
            registry=registry,
        )
        self._lock = threading.Lock()
        self._counted_until: dict[tuple[str, str, str], datetime] = {}

    def record(self, namespace: str, kind: str, name: str, flush: Flush | None) -> None:
        """Add what ``flush`` counted for the workload, less any part already added."""
        if flush is None:
            return
        key = (namespace, kind, name)
        with self._lock:
            since = self._counted_until.get(key)
            start = max(flush.start, since) if since is not None else flush.start
            if flush.end <= start:
                return
            self._counted_until[key] = flush.end
        seconds = (flush.end - start).total_seconds()
        for held in flush.holdings:
            labels = (namespace, kind, name, held.node, held.supplier)
            self.gpu_seconds.labels(*labels).inc(held.gpus * seconds)
            self.cost.labels(*labels).inc(float(held.cost(seconds)))

    def forget(self, namespace: str, kind: str, name: str) -> None:
        """The workload is gone: drop its mark (its counter series stay, as counters do)."""
        with self._lock:
            self._counted_until.pop((namespace, kind, name), None)


COUNTERS = UsageCounters()
"""The process's counters, on the default registry that the metrics port serves."""
