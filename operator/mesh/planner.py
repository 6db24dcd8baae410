"""The mesh planner: addresses, pod ranges and relays, updated one event at a time.

Pure and incremental. The operator feeds it GPUNode events (:meth:`MeshPlanner.upsert`
for add/change, :meth:`MeshPlanner.remove` for delete) or a whole list
(:meth:`MeshPlanner.sync`, for resyncs and at start). Each call returns a :class:`Delta`
naming only what changed: the catalogue entries to publish and the status fields to
write. Adding or removing one node costs O(log N) plus the nodes it actually moves (the
NAT'd nodes of a relay that left), never a replan of everyone.

Determinism: the result depends only on the inputs and their order of arrival; a full
:meth:`~MeshPlanner.sync` processes nodes in a fixed order (relay-capable ones first,
each group by name), so the same set of nodes and the same ledger give the same mesh.
Allocations are stable: a node keeps its overlay address, pod range and relay for as
long as it exists (even while its heartbeat has lapsed); freed addresses rest for
``MeshConfig.cooldown_s`` before anyone else gets them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpumesh.api.mesh import Catalogue, CatalogueEntry, catalogue_of
from gpumesh.operator.mesh.alloc import AddressMap, IndexPool, PoolExhaustedError
from gpumesh.operator.mesh.config import MeshConfig
from gpumesh.operator.mesh.model import MeshNode
from gpumesh.operator.mesh.relays import RelayBalancer


@dataclass(frozen=True, slots=True)
class Assignment:
    """The operator-owned part of a node's ``status.mesh``."""

    name: str
    overlay_ip: str
    pod_cidr: str
    relay: str | None


@dataclass(frozen=True)
class Delta:
    """What one planner call changed."""

    changed: tuple[CatalogueEntry, ...] = ()
    """Catalogue entries added or changed."""
    removed: tuple[str, ...] = ()
    """Names that left the catalogue (deleted, heartbeat lapsed, or key withdrawn)."""
    assignments: tuple[Assignment, ...] = ()
    """Nodes whose overlay address, pod range or relay changed: write their status."""
    errors: tuple[tuple[str, str], ...] = ()
    """(node, reason) for nodes that could not be placed in the mesh."""

    @property
    def catalogue_changed(self) -> bool:
        return bool(self.changed or self.removed)

    def __bool__(self) -> bool:
        return bool(self.changed or self.removed or self.assignments or self.errors)


@dataclass
class _DeltaBuilder:
    changed: dict[str, CatalogueEntry] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    assignments: dict[str, Assignment] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def build(self) -> Delta:
        return Delta(
            changed=tuple(self.changed[n] for n in sorted(self.changed)),
            removed=tuple(sorted(self.removed)),
            assignments=tuple(self.assignments[n] for n in sorted(self.assignments)),
            errors=tuple(sorted(self.errors.items())),
        )


@dataclass
class Ledger:
    """What the planner must remember across operator restarts, as plain data.

    ``allocations``: node -> (overlay IP, pod CIDR, relay or None), for every node that
    exists, member or not. ``released``: (kind, address, released_at) for addresses still
    cooling down, kind being ``"overlay"`` or ``"pod"``.
    """

    allocations: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)
    released: list[tuple[str, str, float]] = field(default_factory=list)
    generation: int = 0

    def to_json(self) -> str:
        doc = {
            "generation": self.generation,
            "allocations": {n: list(a) for n, a in sorted(self.allocations.items())},
            "released": [list(r) for r in self.released],
        }
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        """Parse; anything malformed is skipped (a bad record must not block the mesh)."""
        doc: Any = json.loads(text)
        ledger = cls()
        generation = doc.get("generation") if isinstance(doc, dict) else None
        if isinstance(generation, int) and generation >= 0:
            ledger.generation = generation
        allocations = doc.get("allocations") if isinstance(doc, dict) else None
        for name, row in (allocations or {}).items():
            if isinstance(row, list) and len(row) == 3 and all(isinstance(x, str) for x in row[:2]):
                relay = row[2] if isinstance(row[2], str) else None
                ledger.allocations[str(name)] = (row[0], row[1], relay)
        released = doc.get("released") if isinstance(doc, dict) else None
        for row in released or []:
            if (
                isinstance(row, list)
                and len(row) == 3
                and row[0] in ("overlay", "pod")
                and isinstance(row[1], str)
                and isinstance(row[2], int | float)
            ):
                ledger.released.append((row[0], row[1], float(row[2])))
        return ledger


class MeshPlanner:
    """Incremental mesh planning. Times (``now``) are seconds on any steady clock the
    caller persists consistently (the operator uses Unix time, as the ledger does)."""

    def __init__(self, config: MeshConfig, ledger: Ledger | None = None) -> None:
        self.config = config
        self.addresses = AddressMap.of(config)
        self.generation = 0
        self._overlay = IndexPool(config.overlay_capacity, config.cooldown_s)
        self._pods = IndexPool(config.pod_capacity, config.cooldown_s)
        self._nodes: dict[str, MeshNode] = {}
        self._alloc: dict[str, tuple[int, int]] = {}
        self._entries: dict[str, CatalogueEntry] = {}
        self._relay_of: dict[str, str] = {}
        self._relayed_by: dict[str, set[str]] = {}
        self._orphans: set[str] = set()  # NAT'd members with no relay to use yet
        self._abroad: dict[str, str] = {}  # NAT'd member -> its region, relayed from elsewhere
        self._gained: set[str] = set()  # regions that gained a relay since the last pass
        self._preferred: dict[str, str] = {}  # relay remembered from the ledger
        self._relays = RelayBalancer()
        self._catalogue: Catalogue | None = None
        self.restore_errors: list[str] = []
        if ledger is not None:
            self.generation = ledger.generation  # agents see generations only move on
            self._restore(ledger)

    # --- reading ---------------------------------------------------------------------------

    @property
    def entries(self) -> Mapping[str, CatalogueEntry]:
        return self._entries

    @property
    def nodes(self) -> Mapping[str, MeshNode]:
        """The planner's inputs, as last given."""
        return self._nodes

    def relay_load(self) -> dict[str, int]:
        return dict(self._relays.load)

    def assignment(self, name: str) -> Assignment | None:
        indices = self._alloc.get(name)
        if indices is None:
            return None
        return Assignment(
            name,
            self.addresses.overlay_ip(indices[0]),
            self.addresses.pod_cidr(indices[1]),
            self._relay_of.get(name),
        )

    def catalogue(self) -> Catalogue:
        """The current catalogue (cached until the next change)."""
        if self._catalogue is None:
            self._catalogue = catalogue_of(
                self.generation, self.config.overlay_cidr, self._entries.values()
            )
        return self._catalogue

    def bump_generation(self) -> int:
        """Publish the same plan under a new generation (agents re-check everything)."""
        self.generation += 1
        self._catalogue = None
        return self.generation

    def outrank(self, generation: int) -> int:
        """A generation above both ours and ``generation`` (one written by someone else)."""
        self.generation = max(self.generation, generation) + 1
        self._catalogue = None
        return self.generation

    def adopt_generation(self, generation: int) -> None:
        """Number the current plan ``generation`` (a restarted operator whose plan equals
        the published one keeps its number, so nothing is written again)."""
        self.generation = generation
        self._catalogue = None

    def ledger(self) -> Ledger:
        allocations: dict[str, tuple[str, str, str | None]] = {}
        for name in sorted(self._alloc):
            a = self.assignment(name)
            assert a is not None
            allocations[name] = (a.overlay_ip, a.pod_cidr, a.relay or self._preferred.get(name))
        released = [
            ("overlay", self.addresses.overlay_ip(i), t) for t, i in self._overlay.cooling()
        ]
        released += [("pod", self.addresses.pod_cidr(i), t) for t, i in self._pods.cooling()]
        return Ledger(allocations, released, self.generation)

    # --- events ----------------------------------------------------------------------------

    def upsert(self, node: MeshNode, now: float) -> Delta:
        """A GPUNode was added or changed (key, endpoint, heartbeat)."""
        out = _DeltaBuilder()
        self._upsert(node, now, out)
        self._assign_relays(out)
        return self._finish(out)

    def remove(self, name: str, now: float) -> Delta:
        """A GPUNode was deleted: it leaves the mesh and its addresses start cooling."""
        out = _DeltaBuilder()
        self._remove(name, now, out)
        self._assign_relays(out)
        return self._finish(out)

    def sync(self, nodes: Iterable[MeshNode], now: float) -> Delta:
        """Make the planner hold exactly ``nodes`` (a full resync, or the first plan)."""
        out = _DeltaBuilder()
        wanted = {n.name: n for n in nodes}
        for name in sorted(set(self._nodes) - set(wanted)):
            self._remove(name, now, out)
        for name in sorted(set(self._alloc) - set(wanted) - set(self._nodes)):
            self._remove(name, now, out)  # restored from a ledger, node gone meanwhile
        # Relays first, so NAT'd nodes find them (and their remembered relay) on arrival.
        order = sorted(wanted.values(), key=lambda n: (n.public_endpoint is None, n.name))
        for node in order:
            self._upsert(node, now, out)
        self._assign_relays(out)
        return self._finish(out)

    # --- internals -------------------------------------------------------------------------

    def _finish(self, out: _DeltaBuilder) -> Delta:
        delta = out.build()
        if delta.catalogue_changed:
            self.generation += 1
            self._catalogue = None
        return delta

    def _restore(self, ledger: Ledger) -> None:
        overlay_held: list[int] = []
        pod_held: list[int] = []
        names: list[str] = []
        for name in sorted(ledger.allocations):
            overlay_ip, pod_cidr, relay = ledger.allocations[name]
            try:
                indices = (
                    self.addresses.overlay_index(overlay_ip),
                    self.addresses.pod_index(pod_cidr),
                )
            except ValueError:
                self.restore_errors.append(f"{name}: unreadable {overlay_ip} / {pod_cidr}")
                continue
            if not (
                0 <= indices[0] < self._overlay.size
                and 0 <= indices[1] < self._pods.size
                and indices[0] not in overlay_held
                and indices[1] not in pod_held
            ):
                self.restore_errors.append(
                    f"{name}: {overlay_ip} / {pod_cidr} is outside the configured ranges or "
                    "taken twice; the node gets new addresses"
                )
                continue
            overlay_held.append(indices[0])
            pod_held.append(indices[1])
            names.append(name)
            self._alloc[name] = indices
            if relay is not None:
                self._preferred[name] = relay
        cooling_overlay: list[tuple[float, int]] = []
        cooling_pods: list[tuple[float, int]] = []
        for kind, address, released_at in ledger.released:
            try:
                if kind == "overlay":
                    cooling_overlay.append((released_at, self.addresses.overlay_index(address)))
                else:
                    cooling_pods.append((released_at, self.addresses.pod_index(address)))
            except ValueError:
                continue
        self._overlay.restore(overlay_held, cooling_overlay)
        self._pods.restore(pod_held, cooling_pods)

    def _upsert(self, node: MeshNode, now: float, out: _DeltaBuilder) -> None:
        name = node.name
        before = self._nodes.get(name)
        self._nodes[name] = node
        if before is not None and before.region != node.region and name in self._relay_of:
            self._drop_relay(name, out)  # moved to another region: choose its relay again
        if name not in self._alloc and not self._allocate(name, now, out):
            self._leave(name, out)
            return
        member = node.alive and node.public_key is not None
        capable = member and node.public_endpoint is not None and node.relay
        if name in self._relays and (not capable or self._relays.region.get(name) != node.region):
            self._retire_relay(name, out)  # a relay that moved region is chosen afresh too
        if capable and self._relays.add(name, node.region) and node.region is not None:
            self._gained.add(node.region)
        if member and node.public_endpoint is None:
            if name not in self._relay_of:
                self._orphans.add(name)
        else:
            self._drop_relay(name, out)
        if member:
            self._refresh_entry(name, out)
        else:
            self._leave(name, out)

    def _allocate(self, name: str, now: float, out: _DeltaBuilder) -> bool:
        try:
            overlay = self._overlay.take(now)
        except PoolExhaustedError as err:
            out.errors[name] = f"no overlay address free in {self.config.overlay_cidr}: {err}"
            return False
        try:
            pods = self._pods.take(now)
        except PoolExhaustedError as err:
            self._overlay.undo(overlay)  # never handed out: no cooldown needed
            out.errors[name] = f"no /{self.config.pod_prefix} free in {self.config.pod_cidr}: {err}"
            return False
        self._alloc[name] = (overlay, pods)
        self._note_assignment(name, out)
        return True

    def _remove(self, name: str, now: float, out: _DeltaBuilder) -> None:
        if name in self._relays:
            self._retire_relay(name, out)
        self._drop_relay(name, out, note=False)
        self._leave(name, out)
        self._nodes.pop(name, None)
        self._preferred.pop(name, None)
        indices = self._alloc.pop(name, None)
        if indices is not None:
            self._overlay.release(indices[0], now)
            self._pods.release(indices[1], now)
        out.assignments.pop(name, None)

    def _retire_relay(self, relay: str, out: _DeltaBuilder) -> None:
        """``relay`` can relay no more: its NAT'd nodes are orphaned until reassigned."""
        self._relays.remove(relay)
        for nat in sorted(self._relayed_by.pop(relay, set())):
            del self._relay_of[nat]
            self._abroad.pop(nat, None)
            self._orphans.add(nat)
            self._note_assignment(nat, out)
            self._refresh_entry(nat, out)

    def _leave(self, name: str, out: _DeltaBuilder) -> None:
        self._orphans.discard(name)
        if self._entries.pop(name, None) is not None:
            out.removed.add(name)
        out.changed.pop(name, None)

    def _drop_relay(self, name: str, out: _DeltaBuilder, *, note: bool = True) -> None:
        self._orphans.discard(name)
        relay = self._relay_of.pop(name, None)
        self._abroad.pop(name, None)
        if relay is not None:
            self._relayed_by[relay].discard(name)
            self._relays.unassign(relay)
            if note:
                self._note_assignment(name, out)

    def _assign_relays(self, out: _DeltaBuilder) -> None:
        """Orphans get a relay (their region's when it has one); NAT'd nodes relayed from
        another region move home once their region gained a relay."""
        if not len(self._relays):
            return
        for name in sorted(self._orphans):
            region = self._nodes[name].region
            relay = self._preferred.pop(name, None)
            if (
                relay is None
                or relay not in self._relays
                or (self._relays.region.get(relay) != region and self._relays.has_region(region))
            ):
                relay = self._relays.pick(region)
            if relay is None:
                return
            self._orphans.discard(name)
            self._relay_to(name, relay, out)
        gained, self._gained = self._gained, set()
        if not gained:
            return
        for name, region in sorted(self._abroad.items()):
            if region in gained:
                self._drop_relay(name, out, note=False)
                home = self._relays.pick(region)
                assert home is not None  # the region just gained one
                self._relay_to(name, home, out)

    def _relay_to(self, name: str, relay: str, out: _DeltaBuilder) -> None:
        self._relay_of[name] = relay
        self._relayed_by.setdefault(relay, set()).add(name)
        self._relays.assign(relay)
        region = self._nodes[name].region
        if region is not None and self._relays.region.get(relay) != region:
            self._abroad[name] = region
        self._note_assignment(name, out)
        self._refresh_entry(name, out)

    def _note_assignment(self, name: str, out: _DeltaBuilder) -> None:
        assignment = self.assignment(name)
        if assignment is not None:
            out.assignments[name] = assignment

    def _refresh_entry(self, name: str, out: _DeltaBuilder) -> None:
        node = self._nodes[name]
        overlay, pods = self._alloc[name]
        assert node.public_key is not None
        entry = CatalogueEntry(
            name=name,
            public_key=node.public_key,
            endpoint=node.public_endpoint,
            overlay_ip=self.addresses.overlay_ip(overlay),
            pod_cidr=self.addresses.pod_cidr(pods),
            relay=self._relay_of.get(name),
        )
        if self._entries.get(name) != entry:
            self._entries[name] = entry
            out.changed[name] = entry
            out.removed.discard(name)


def plan(
    nodes: Iterable[MeshNode], config: MeshConfig, ledger: Ledger | None = None, now: float = 0.0
) -> MeshPlanner:
    """A full plan from scratch (the planner it leaves can then take events)."""
    planner = MeshPlanner(config, ledger)
    planner.sync(nodes, now)
    return planner
