"""The mesh's address plan: overlay range, pod supernet, per-node pod prefix, cooldown.

Every range is configurable because suppliers' networks differ; the defaults suit a
production fleet and must never be used by tests (they use ranges inside 198.19.0.0/16).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

DEFAULT_OVERLAY_CIDR: Final = "10.90.0.0/16"
DEFAULT_POD_CIDR: Final = "10.128.0.0/11"
DEFAULT_POD_PREFIX: Final = 24
DEFAULT_COOLDOWN_S: Final = 3600.0


class MeshConfigError(ValueError):
    """A setting is unusable: ``field`` names it, the message says how to fix it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"mesh.{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class MeshConfig:
    """Where overlay addresses and pod ranges come from, and how long freed ones rest.

    ``cooldown_s``: an address freed by a deleted node is not handed out again for this
    long, so packets and stale peer entries still aimed at the old node never reach a new
    one. ``overlay_cidr`` gives each node one address (network and broadcast excluded);
    ``pod_cidr`` is cut into ``/pod_prefix`` blocks, one per node.
    """

    overlay_cidr: str = DEFAULT_OVERLAY_CIDR
    pod_cidr: str = DEFAULT_POD_CIDR
    pod_prefix: int = DEFAULT_POD_PREFIX
    cooldown_s: float = DEFAULT_COOLDOWN_S

    def __post_init__(self) -> None:
        overlay = _network("overlay_cidr", self.overlay_cidr)
        pods = _network("pod_cidr", self.pod_cidr)
        if overlay.prefixlen > 30:
            raise MeshConfigError("overlay_cidr", f"{overlay} holds no usable addresses")
        if not pods.prefixlen <= self.pod_prefix <= 32:
            raise MeshConfigError(
                "pod_prefix", f"/{self.pod_prefix} must lie between /{pods.prefixlen} and /32"
            )
        if overlay.overlaps(pods):
            raise MeshConfigError("pod_cidr", f"{pods} overlaps overlay_cidr {overlay}")
        if self.cooldown_s < 0:
            raise MeshConfigError("cooldown_s", "must not be negative")

    @property
    def overlay(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.overlay_cidr)

    @property
    def pods(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.pod_cidr)

    @property
    def overlay_capacity(self) -> int:
        return self.overlay.num_addresses - 2

    @property
    def pod_capacity(self) -> int:
        return 1 << (self.pod_prefix - self.pods.prefixlen)


def _network(field: str, text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as err:
        raise MeshConfigError(field, f"{text!r} is not a network in CIDR form ({err})") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise MeshConfigError(field, f"{text}: only IPv4 ranges are supported so far")
    return net
