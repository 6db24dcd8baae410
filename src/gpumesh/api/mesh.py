"""The mesh catalogue: the wire format between the operator, which publishes it, and agents.

One :class:`CatalogueEntry` per member node, O(N) in size, in one ConfigMap. Every agent
derives its own WireGuard configuration from it, so the operator never builds N per-node
peer maps (headscale's O(N^2) trap).

The catalogue is also the agent's input to its UAPI socket, so :meth:`Catalogue.decode`
validates every field strictly: a name, key or endpoint with a newline in it would
otherwise be a way to inject UAPI commands.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

CATALOGUE_NAME: Final = "gpumesh-mesh"
CATALOGUE_KEY: Final = "catalogue.json"
GENERATION_ANNOTATION: Final = "gpumesh.io/mesh-generation"
CATALOGUE_VERSION: Final = 1
NAME_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
ENDPOINT_RE: Final = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")


class CatalogueError(ValueError):
    """A catalogue (or a node in it) is malformed: ``where`` names the part."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where


def valid_public_key(text: str) -> bool:
    """Base64 of exactly 32 bytes (a Curve25519 public key), nothing else."""
    if len(text) != 44 or not text.endswith("="):
        return False
    try:
        return len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def valid_endpoint(text: str) -> bool:
    match = ENDPOINT_RE.match(text)
    return bool(match) and 0 < int(match.group(2)) < 65536 if match else False


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """One member of the mesh: everything any other node needs to reach it."""

    name: str
    public_key: str
    endpoint: str | None
    overlay_ip: str
    pod_cidr: str
    relay: str | None

    @property
    def allowed_ips(self) -> tuple[str, str]:
        """Addresses routed to this node: its overlay address and its pod range."""
        return (f"{self.overlay_ip}/32", self.pod_cidr)

    def row(self) -> list[str | None]:
        return [
            self.name,
            self.public_key,
            self.endpoint,
            self.overlay_ip,
            self.pod_cidr,
            self.relay,
        ]


@dataclass(frozen=True)
class Catalogue:
    """The mesh at one generation: members sorted by name, plus the overlay range."""

    generation: int
    overlay_cidr: str
    entries: tuple[CatalogueEntry, ...]

    def by_name(self) -> dict[str, CatalogueEntry]:
        return {e.name: e for e in self.entries}

    def encode(self) -> str:
        """Compact JSON: about 150 bytes a node, so 5,000 nodes fit a ConfigMap."""
        doc = {
            "version": CATALOGUE_VERSION,
            "generation": self.generation,
            "overlayCidr": self.overlay_cidr,
            "nodes": [e.row() for e in self.entries],
        }
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> Catalogue:
        """Parse and validate; raises :class:`CatalogueError` naming the bad part."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise CatalogueError("catalogue", f"not JSON ({err})") from None
        if not isinstance(doc, dict):
            raise CatalogueError("catalogue", "not a JSON object")
        if doc.get("version") != CATALOGUE_VERSION:
            raise CatalogueError("catalogue.version", f"expected {CATALOGUE_VERSION}")
        generation = doc.get("generation")
        if not isinstance(generation, int) or generation < 0:
            raise CatalogueError("catalogue.generation", "expected a non-negative integer")
        overlay = doc.get("overlayCidr")
        if not isinstance(overlay, str) or not _is_network(overlay):
            raise CatalogueError("catalogue.overlayCidr", f"{overlay!r} is not a CIDR")
        rows = doc.get("nodes")
        if not isinstance(rows, list):
            raise CatalogueError("catalogue.nodes", "expected a list")
        entries = tuple(_entry(i, row) for i, row in enumerate(rows))
        names = [e.name for e in entries]
        if names != sorted(set(names)):
            raise CatalogueError("catalogue.nodes", "names must be unique and sorted")
        return cls(generation, overlay, entries)


def catalogue_of(
    generation: int, overlay_cidr: str, entries: Iterable[CatalogueEntry]
) -> Catalogue:
    return Catalogue(generation, overlay_cidr, tuple(sorted(entries, key=lambda e: e.name)))


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError:
        return False
    return True


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _entry(index: int, row: Any) -> CatalogueEntry:
    where = f"catalogue.nodes[{index}]"
    if not isinstance(row, list) or len(row) != 6:
        raise CatalogueError(where, "expected [name, key, endpoint, overlayIp, podCidr, relay]")
    name, key, endpoint, overlay, pods, relay = row
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CatalogueError(where, f"bad node name {name!r}")
    where = f"catalogue.nodes[{name}]"
    if not isinstance(key, str) or not valid_public_key(key):
        raise CatalogueError(where, "publicKey is not a base64 WireGuard key")
    if endpoint is not None and (not isinstance(endpoint, str) or not valid_endpoint(endpoint)):
        raise CatalogueError(where, f"endpoint {endpoint!r} is not host:port")
    if not isinstance(overlay, str) or not _is_address(overlay):
        raise CatalogueError(where, f"overlayIp {overlay!r} is not an address")
    if not isinstance(pods, str) or not _is_network(pods):
        raise CatalogueError(where, f"podCidr {pods!r} is not a CIDR")
    if relay is not None and (not isinstance(relay, str) or not NAME_RE.match(relay)):
        raise CatalogueError(where, f"relay {relay!r} is not a node name")
    # Canonical text, so agents compare and sort addresses as plain strings.
    overlay, pods = str(ipaddress.ip_address(overlay)), str(ipaddress.ip_network(pods))
    return CatalogueEntry(name, key, endpoint, overlay, pods, relay)


def catalogue_from_configmap(configmap: Mapping[str, Any]) -> Catalogue | None:
    """The catalogue in a ConfigMap, or None when it has none yet. Raises CatalogueError."""
    text = (configmap.get("data") or {}).get(CATALOGUE_KEY)
    return Catalogue.decode(text) if isinstance(text, str) else None
