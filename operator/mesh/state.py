"""The operator's mesh bookkeeping between API events and the planner, still pure.

:class:`MeshState` takes what the watches deliver (GPUNodes, the agents' heartbeat
Leases, deletions) and the passage of time (Leases lapse without any event), feeds the
:class:`~gpumesh.operator.mesh.planner.MeshPlanner` one event at a time, and says what to
write with :meth:`MeshState.take_writes`:

- a merge patch of ``status.mesh`` for each GPUNode whose operator-owned fields
  (overlayIp, podCidr, relay, observedEndpoint) differ from what its last seen body holds;
- the catalogue ConfigMap, only when its data differs from what was last published.

The kopf handler (``gpumesh.operator.handlers.mesh``) and the e2e lab's controller both
drive this class; neither holds mesh logic of its own. Not thread-safe: callers lock.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gpumesh.api.lease import lease_expiry
from gpumesh.api.mesh import (
    CATALOGUE_KEY,
    CATALOGUE_NAME,
    GENERATION_ANNOTATION,
    Catalogue,
    CatalogueError,
    catalogue_from_configmap,
    valid_endpoint,
)
from gpumesh.api.nodes import OPERATOR_MESH_FIELDS, Admission
from gpumesh.operator.mesh.config import MeshConfig
from gpumesh.operator.mesh.planner import Delta, Ledger, MeshPlanner
from gpumesh.operator.mesh.publish import (
    admitted,
    catalogue_configmap,
    lease_node,
    leases_by_node,
    ledger_from_configmap,
    mesh_node,
)

OWNED = OPERATOR_MESH_FIELDS
"""The ``status.mesh`` fields the operator writes (the agent owns the others)."""


@dataclass(frozen=True)
class Writes:
    """What to send to the API now."""

    statuses: tuple[tuple[str, dict[str, Any]], ...] = ()
    """(GPUNode name, merge patch for its status subresource)."""
    configmap: dict[str, Any] | None = None
    """The catalogue ConfigMap to apply, or None when it is unchanged."""

    def __bool__(self) -> bool:
        return bool(self.statuses) or self.configmap is not None


def trim_gpunode(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a GPUNode the mesh reads (kept per node, so keep it small)."""
    spec = body.get("spec") or {}
    mesh = (body.get("status") or {}).get("mesh") or {}
    return {
        "metadata": {"name": (body.get("metadata") or {}).get("name", "")},
        "spec": {
            k: spec[k] for k in ("supplier", "publicEndpoint", "meshRelay", "region") if k in spec
        },
        "status": {
            "mesh": {
                k: mesh[k]
                for k in ("publicKey", *OWNED, "peerEndpoints")
                if mesh.get(k) is not None
            }
        },
    }


def _owned(gpunode: Mapping[str, Any]) -> dict[str, Any]:
    mesh = (gpunode.get("status") or {}).get("mesh") or {}
    return {k: mesh.get(k) for k in OWNED}


def _peer_endpoints(gpunode: Mapping[str, Any]) -> dict[str, str]:
    """node -> endpoint, from a relay's ``status.mesh.peerEndpoints`` (bad rows skipped)."""
    rows = ((gpunode.get("status") or {}).get("mesh") or {}).get("peerEndpoints") or []
    out: dict[str, str] = {}
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, Mapping):
            continue
        node, endpoint = row.get("node"), row.get("endpoint")
        if isinstance(node, str) and isinstance(endpoint, str) and valid_endpoint(endpoint):
            out[node] = endpoint
    return out


@dataclass
class MeshState:
    """GPUNodes and Leases in, status patches and the catalogue ConfigMap out.

    ``published``: the catalogue ConfigMap as found at start (its ledger seeds the
    planner, so addresses survive an operator restart, and an unchanged plan is not
    written again).
    """

    config: MeshConfig
    namespace: str
    name: str = CATALOGUE_NAME
    published: Mapping[str, Any] | None = None
    planner: MeshPlanner = field(init=False)
    errors: list[str] = field(default_factory=list)
    _gpunodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    _leases: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    _expiry: list[tuple[float, str]] = field(default_factory=list)
    _expiry_at: dict[str, float] = field(default_factory=dict)
    _pending: set[str] = field(default_factory=set)
    _observed_by: dict[str, tuple[str, str]] = field(default_factory=dict)
    """NAT'd node -> (relay that saw it, endpoint)."""
    _admissions: dict[str, Admission] = field(default_factory=dict)
    """Node -> the mesh operator's word on it (from its Node's labels)."""
    _data: dict[str, str] | None = None

    def __post_init__(self) -> None:
        ledger: Ledger | None = ledger_from_configmap(self.published)
        self.planner = MeshPlanner(self.config, ledger)
        self.errors.extend(self.planner.restore_errors)
        data = (self.published or {}).get("data")
        self._data = dict(data) if isinstance(data, Mapping) else None

    # --- events --------------------------------------------------------------------------

    def sync(
        self,
        gpunodes: Iterable[Mapping[str, Any]],
        leases: Iterable[Mapping[str, Any]],
        kube_nodes: Iterable[Mapping[str, Any]],
        now: datetime,
    ) -> None:
        """Hold exactly these GPUNodes, Leases and Nodes (at start, or a full resync)."""
        self._admissions = {
            str((n.get("metadata") or {}).get("name", "")): Admission.of(n) for n in kube_nodes
        }
        self._gpunodes = {}
        self._observed_by = {}
        for body in gpunodes:
            self._store(body)
        self._leases = dict(leases_by_node([dict(lease) for lease in leases]))
        self._expiry = []
        self._expiry_at = {}
        for node in self._leases:
            self._schedule(node)
        nodes = [self._node(name, now) for name in sorted(self._gpunodes)]
        self._note(self.planner.sync(nodes, now.timestamp()))
        self._pending |= set(self._gpunodes)
        published = self._published_catalogue()
        if published is not None and published.entries == self.planner.catalogue().entries:
            self.planner.adopt_generation(published.generation)

    def resync(
        self,
        gpunodes: Iterable[Mapping[str, Any]],
        leases: Iterable[Mapping[str, Any]],
        kube_nodes: Iterable[Mapping[str, Any]],
        configmap: Mapping[str, Any] | None,
        now: datetime,
    ) -> None:
        """A periodic full resync: hold exactly what the API lists now, and publish the
        catalogue again if the ConfigMap is not what we last wrote (deleted, edited,
        restored from a backup), under a generation above both ours and the one found:
        agents that saw the outside write must see ours as newer.

        Repairs whatever a missed watch event left behind; :meth:`take_writes` still
        writes only where something differs. Events that arrived while the lists were
        read must be fed again afterwards (the lists may be older than they are).
        """
        self.sync(gpunodes, leases, kube_nodes, now)
        data = (configmap or {}).get("data")
        if not isinstance(data, Mapping) or dict(data) != self._data:
            self._data = None
            self.planner.outrank(_generation_of(configmap))

    def gpunode(self, body: Mapping[str, Any], now: datetime) -> None:
        """A GPUNode was added or changed."""
        name = self._store(body)
        self._note(self.planner.upsert(self._node(name, now), now.timestamp()))
        self._pending.add(name)

    def gpunode_deleted(self, name: str, now: datetime) -> None:
        self._gpunodes.pop(name, None)
        self._pending.discard(name)
        for nat, (relay, _endpoint) in list(self._observed_by.items()):
            if relay == name or nat == name:
                del self._observed_by[nat]
        if name in self.planner.nodes:
            self._note(self.planner.remove(name, now.timestamp()))

    def node(self, body: Mapping[str, Any], now: datetime) -> None:
        """A Node was added or changed: the mesh operator may have admitted or withdrawn it."""
        name = str((body.get("metadata") or {}).get("name", ""))
        admission = Admission.of(body)
        if self._admissions.get(name) != admission:
            self._admissions[name] = admission
            self._refresh(name, now)

    def node_deleted(self, name: str, now: datetime) -> None:
        if self._admissions.pop(name, None) is not None:
            self._refresh(name, now)

    def lease(self, body: Mapping[str, Any], now: datetime) -> None:
        """An agent heartbeat Lease was written (other Leases are ignored)."""
        node = lease_node(body)
        if node is None:
            return
        self._leases[node] = body
        self._schedule(node)
        self._refresh(node, now)

    def lease_deleted(self, body: Mapping[str, Any], now: datetime) -> None:
        node = lease_node(body)
        if node is not None and self._leases.pop(node, None) is not None:
            self._expiry_at.pop(node, None)
            self._refresh(node, now)

    def expire(
        self, now: datetime, confirm: Callable[[str], Mapping[str, Any] | None] | None = None
    ) -> None:
        """Nodes whose Lease lapsed by ``now`` leave the catalogue (they keep addresses).

        ``confirm(node)`` re-reads a Lease that looks lapsed before the node is dropped
        (its renewals may just be late through the watch, as right after a start): it
        returns the Lease as it is now, None if it is gone, or raises to keep our copy.
        """
        ts = now.timestamp()
        while self._expiry and self._expiry[0][0] <= ts:
            at, node = heapq.heappop(self._expiry)
            if self._expiry_at.get(node) != at:
                continue  # renewed since: a later entry stands for it
            del self._expiry_at[node]
            if confirm is not None and node in self._gpunodes:
                try:
                    fresh = confirm(node)
                except Exception:  # unreadable: trust what we have
                    fresh = self._leases.get(node)
                if fresh is None:
                    self._leases.pop(node, None)
                else:
                    self._leases[node] = fresh
                    expiry = lease_expiry(fresh)
                    if expiry is not None and expiry.timestamp() > ts:
                        self._schedule(node)  # renewed after all: look again then
            self._refresh(node, now)

    def next_expiry(self) -> float | None:
        """Unix time of the next Lease that may lapse, if any."""
        return self._expiry[0][0] if self._expiry else None

    # --- writes --------------------------------------------------------------------------

    def take_writes(self) -> Writes:
        """Status patches where a node's mesh status differs, and the ConfigMap if changed.

        Assumes the writes succeed (the next GPUNode event shows what was really written);
        call :meth:`failed` for those that did not.
        """
        statuses: list[tuple[str, dict[str, Any]]] = []
        for name in sorted(self._pending):
            gpunode = self._gpunodes.get(name)
            wanted = self.wanted(name)
            if gpunode is None or wanted is None:
                continue
            have = _owned(gpunode)
            diff = {k: v for k, v in wanted.items() if have.get(k) != v}
            if diff:
                statuses.append((name, {"status": {"mesh": diff}}))
                gpunode["status"].setdefault("mesh", {}).update(diff)
        self._pending.clear()
        configmap = None
        body = catalogue_configmap(
            self.planner.catalogue(),
            self.planner.ledger(),
            namespace=self.namespace,
            name=self.name,
        )
        if body["data"] != self._data:
            configmap = body
            self._data = dict(body["data"])
        return Writes(tuple(statuses), configmap)

    def failed(self, *, nodes: Iterable[str] = (), configmap: bool = False) -> None:
        """Some writes did not land: try them again at the next :meth:`take_writes`."""
        for name in nodes:
            gpunode = self._gpunodes.get(name)
            if gpunode is not None:
                gpunode["status"]["mesh"] = {}  # unknown now: compare against nothing
                self._pending.add(name)
        if configmap:
            self._data = None

    def wanted(self, name: str) -> dict[str, Any] | None:
        """The operator-owned ``status.mesh`` fields a node should carry."""
        assignment = self.planner.assignment(name)
        if assignment is None:
            return None
        observed = self._observed_by.get(name)
        if observed is not None and assignment.relay != observed[0]:
            observed = None  # seen by a relay it no longer uses
        return {
            "overlayIp": assignment.overlay_ip,
            "podCidr": assignment.pod_cidr,
            "relay": assignment.relay,
            "observedEndpoint": observed[1] if observed else None,
        }

    # --- internals -----------------------------------------------------------------------

    def _published_catalogue(self) -> Catalogue | None:
        if self._data is None:
            return None
        try:
            return catalogue_from_configmap({"data": self._data})
        except CatalogueError:
            return None

    def _store(self, body: Mapping[str, Any]) -> str:
        trimmed = trim_gpunode(body)
        name = str(trimmed["metadata"]["name"])
        self._gpunodes[name] = trimmed
        seen = _peer_endpoints(trimmed)
        for nat, (relay, _endpoint) in list(self._observed_by.items()):
            if relay == name and nat not in seen:
                del self._observed_by[nat]
                self._pending.add(nat)
        for nat, endpoint in seen.items():
            if self._observed_by.get(nat) != (name, endpoint):
                self._observed_by[nat] = (name, endpoint)
                self._pending.add(nat)
        return name

    def _node(self, name: str, now: datetime) -> Any:
        gpunode = self._gpunodes[name]
        claimed = (gpunode.get("spec") or {}).get("supplier")
        node = mesh_node(gpunode, self._leases.get(name), now)
        return admitted(node, claimed, self._admissions.get(name))

    def _refresh(self, node: str, now: datetime) -> None:
        if node in self._gpunodes:
            self._note(self.planner.upsert(self._node(node, now), now.timestamp()))

    def _schedule(self, node: str) -> None:
        expiry = lease_expiry(self._leases[node])
        if expiry is not None:
            self._expiry_at[node] = expiry.timestamp()
            heapq.heappush(self._expiry, (expiry.timestamp(), node))
        if len(self._expiry) > 4 * len(self._expiry_at) + 64:
            self._expiry = [(at, n) for n, at in self._expiry_at.items()]
            heapq.heapify(self._expiry)

    def _note(self, delta: Delta) -> None:
        for assignment in delta.assignments:
            self._pending.add(assignment.name)
        for name, reason in delta.errors:
            self.errors.append(f"{name}: {reason}")


def _generation_of(configmap: Mapping[str, Any] | None) -> int:
    """The highest generation a ConfigMap claims, in its catalogue or its annotation, read
    leniently: even a catalogue agents would refuse must not outrank ours."""
    found = [0]
    annotations = ((configmap or {}).get("metadata") or {}).get("annotations") or {}
    with suppress(ValueError, TypeError):
        found.append(int(annotations.get(GENERATION_ANNOTATION, 0)))
    text = ((configmap or {}).get("data") or {}).get(CATALOGUE_KEY)
    with suppress(ValueError, TypeError, AttributeError):
        generation = json.loads(str(text)).get("generation")
        if isinstance(generation, int):
            found.append(generation)
    return max(found)
