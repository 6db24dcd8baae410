"""The interface around the device: address, MTU, link state, pod routes, forwarding.

Routes to other nodes' pod ranges go over the WireGuard interface; WireGuard's allowed
IPs then pick the peer. Routes the agent adds carry their own protocol number
(:data:`RTPROT_GPUMESH`), so it repairs and prunes only its own routes and never touches
one an administrator added. Everything is read back and compared before a write, so a
sync with nothing to do writes nothing (and a deleted route comes back: drift repair).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

log = logging.getLogger(__name__)

RTPROT_GPUMESH: Final = 0x67
"""Protocol number on the routes we own (``ip route show proto 103``)."""
MAIN_TABLE: Final = 254
PROC_SYS: Final = Path("/proc/sys/net/ipv4")


class LinkError(RuntimeError):
    """The interface is missing or refused a change."""


@dataclass(frozen=True)
class RouteChanges:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class Links(Protocol):
    """What a sync needs from the interface (tests pass an in-memory fake)."""

    def configure(self, address: str, mtu: int) -> list[str]: ...

    def sync_routes(self, cidrs: Iterable[str]) -> RouteChanges: ...

    def enable_forwarding(self) -> list[str]: ...


class LinkManager:
    """Address, MTU, up state and routes of one interface, through rtnetlink (pyroute2)."""

    def __init__(self, interface: str, *, proc_sys: Path = PROC_SYS) -> None:
        self.interface = interface
        self.proc_sys = proc_sys

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    def _index(self, ipr: Any) -> int:
        found = ipr.link_lookup(ifname=self.interface)
        if not found:
            raise LinkError(f"interface {self.interface} does not exist")
        return int(found[0])

    def exists(self) -> bool:
        with self._ipr() as ipr:
            return bool(ipr.link_lookup(ifname=self.interface))

    def create_wireguard(self, interface: str | None = None) -> None:
        """Create a kernel WireGuard interface if it does not exist yet."""
        name = interface or self.interface
        with self._ipr() as ipr:
            if ipr.link_lookup(ifname=name):
                return
            try:
                ipr.link("add", ifname=name, kind="wireguard")
            except Exception as err:
                raise LinkError(
                    f"cannot create WireGuard interface {name} ({err}): no kernel module? "
                    "use the wireguard-go backend"
                ) from None

    def configure(self, address: str, mtu: int) -> list[str]:
        """Give the interface exactly ``address`` (ip/prefix), ``mtu``, and bring it up."""
        iface = ipaddress.ip_interface(address)
        changes: list[str] = []
        with self._ipr() as ipr:
            index = self._index(ipr)
            current = {
                (str(a.get("IFA_ADDRESS")), int(a["prefixlen"]))
                for a in ipr.get_addr(index=index, family=socket.AF_INET)
            }
            wanted = (str(iface.ip), iface.network.prefixlen)
            for addr, prefix in sorted(current - {wanted}):
                ipr.addr("del", index=index, address=addr, prefixlen=prefix)
                changes.append(f"address -{addr}/{prefix}")
            if wanted not in current:
                ipr.addr("add", index=index, address=wanted[0], prefixlen=wanted[1])
                changes.append(f"address +{address}")
            link = ipr.get_links(index)[0]
            if int(link.get("IFLA_MTU") or 0) != mtu:
                ipr.link("set", index=index, mtu=mtu)
                changes.append(f"mtu {mtu}")
            if not int(link["flags"]) & 1:  # IFF_UP
                ipr.link("set", index=index, state="up")
                changes.append("up")
        return changes

    def routes(self) -> set[str]:
        """Destinations of our routes over the interface."""
        with self._ipr() as ipr:
            return self._routes(ipr, self._index(ipr))

    def _routes(self, ipr: Any, index: int) -> set[str]:
        out: set[str] = set()
        for r in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            if r.get("RTA_OIF") != index or r["proto"] != RTPROT_GPUMESH:
                continue
            out.add(f"{r.get('RTA_DST') or '0.0.0.0'}/{r['dst_len']}")
        return out

    def sync_routes(self, cidrs: Iterable[str]) -> RouteChanges:
        """Route exactly ``cidrs`` over the interface (among the routes we own)."""
        wanted = {str(ipaddress.ip_network(c, strict=False)) for c in cidrs}
        with self._ipr() as ipr:
            index = self._index(ipr)
            have = self._routes(ipr, index)
            added = sorted(wanted - have)
            removed = sorted(have - wanted)
            for dst in removed:
                ipr.route("del", dst=dst, oif=index, proto=RTPROT_GPUMESH, table=MAIN_TABLE)
            for dst in added:
                ipr.route("replace", dst=dst, oif=index, proto=RTPROT_GPUMESH, table=MAIN_TABLE)
        return RouteChanges(tuple(added), tuple(removed))

    def enable_forwarding(self) -> list[str]:
        """A relay forwards between peers on one interface: ip_forward on, no redirects
        (a redirect would tell a peer to skip the relay, which cannot work here)."""
        changes: list[str] = []
        for rel, value in (
            ("ip_forward", "1"),
            ("conf/all/send_redirects", "0"),
            (f"conf/{self.interface}/send_redirects", "0"),
        ):
            path = self.proc_sys / rel
            try:
                if path.read_text().strip() != value:
                    path.write_text(value)
                    changes.append(f"{rel}={value}")
            except OSError as err:
                log.warning("cannot set %s=%s: %s", path, value, err)
        return changes


def host_addresses(exclude: Iterable[str] = ()) -> list[str]:
    """Global IPv4 addresses of this host's interfaces, except loopback and ``exclude``d
    interfaces (endpoint candidates to publish)."""
    from pyroute2 import IPRoute

    skip = set(exclude)
    out: list[str] = []
    with IPRoute() as ipr:
        names = {int(link["index"]): str(link.get("IFLA_IFNAME")) for link in ipr.get_links()}
        for a in ipr.get_addr(family=socket.AF_INET):
            name = names.get(int(a["index"]), "")
            address = ipaddress.ip_address(str(a.get("IFA_ADDRESS")))
            if name in skip or address.is_loopback or address.is_link_local:
                continue
            out.append(str(address))
    return out
