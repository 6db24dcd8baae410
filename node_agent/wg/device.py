"""The WireGuard device behind one interface: wireguard-go over UAPI, or the kernel.

Both backends read the device into an :class:`ObservedDevice` and apply a
:class:`PeerChanges` peer by peer; neither ever replaces all peers. The kernel backend
speaks generic netlink through pyroute2 (``wg`` does the same); wireguard-go is reached
through its UAPI socket, which is *not* per network namespace: two wireguard-go
interfaces on one machine need distinct names.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, Protocol

from gpumesh.node_agent.wg.diff import ObservedDevice, ObservedPeer, PeerChanges, PeerUpdate
from gpumesh.node_agent.wg.keys import PrivateKey
from gpumesh.node_agent.wg.uapi import RUN_DIR, UapiClient, UapiError

log = logging.getLogger(__name__)

NETLINK_ALLOWED_IPS_PER_MESSAGE: Final = 256
"""A relay's peer can carry thousands of allowed IPs; netlink messages are bounded, so
they go in chunks (the first replaces, the rest append), as ``wg`` does."""


class DeviceError(RuntimeError):
    """The device could not be created, read or changed."""


class WgBackend(Protocol):
    """What the syncer needs from a WireGuard implementation."""

    kind: str
    interface: str

    def ensure(self) -> None:
        """Make sure the interface exists (create it, or wait for it)."""

    def observe(self) -> ObservedDevice: ...

    def apply(self, changes: PeerChanges, private_key: PrivateKey | None) -> None: ...


class UapiBackend:
    """wireguard-go through its UAPI socket."""

    kind = "uapi"

    def __init__(
        self,
        interface: str,
        *,
        run_dir: Path = RUN_DIR,
        spawn: bool = False,
        wireguard_go: str = "wireguard-go",
        wait_s: float = 10.0,
    ) -> None:
        self.interface = interface
        self.client = UapiClient(interface, run_dir=run_dir)
        self.spawn = spawn
        self.wireguard_go = wireguard_go
        self.wait_s = wait_s

    def ensure(self) -> None:
        if self.client.exists():
            return
        if self.spawn:
            exe = shutil.which(self.wireguard_go)
            if exe is None:
                raise DeviceError(f"{self.wireguard_go} is not installed")
            # Without -f wireguard-go daemonises itself and outlives the agent, as a
            # device should (an agent restart must not drop sessions).
            subprocess.run([exe, self.interface], check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + self.wait_s
        while not self.client.exists():
            if time.monotonic() > deadline:
                raise DeviceError(
                    f"no UAPI socket {self.client.path}: is wireguard-go running for "
                    f"{self.interface}?"
                )
            time.sleep(0.05)

    def observe(self) -> ObservedDevice:
        try:
            return self.client.get()
        except UapiError as err:
            raise DeviceError(str(err)) from None

    def apply(self, changes: PeerChanges, private_key: PrivateKey | None) -> None:
        try:
            self.client.apply(changes, private_key)
        except (UapiError, ValueError) as err:
            raise DeviceError(str(err)) from None


class WireGuardNetlink(Protocol):
    """The part of ``pyroute2.WireGuard`` used here (tests pass a fake)."""

    def info(self, interface: str) -> Iterable[Any]: ...

    def set(
        self,
        interface: str,
        listen_port: int | None = None,
        fwmark: int | None = None,
        private_key: str | None = None,
        peer: Mapping[str, Any] | None = None,
    ) -> Any: ...


def _pyroute2_wireguard() -> WireGuardNetlink:
    from pyroute2 import WireGuard

    wg: WireGuardNetlink = WireGuard()
    return wg


class NetlinkBackend:
    """Kernel WireGuard through generic netlink (pyroute2)."""

    kind = "netlink"

    def __init__(
        self,
        interface: str,
        *,
        wireguard: Callable[[], WireGuardNetlink] = _pyroute2_wireguard,
        create_link: Callable[[str], None] | None = None,
    ) -> None:
        self.interface = interface
        self._factory = wireguard
        self._wg: WireGuardNetlink | None = None
        self._create_link = create_link

    @property
    def wg(self) -> WireGuardNetlink:
        if self._wg is None:
            self._wg = self._factory()
        return self._wg

    def ensure(self) -> None:
        if self._create_link is not None:
            self._create_link(self.interface)

    def observe(self) -> ObservedDevice:
        try:
            messages = list(self.wg.info(self.interface))
        except Exception as err:  # pyroute2 raises NetlinkError and OSError subclasses
            raise DeviceError(f"{self.interface}: netlink get failed: {err}") from None
        return parse_netlink(messages)

    def apply(self, changes: PeerChanges, private_key: PrivateKey | None) -> None:
        try:
            if changes.set_private_key or changes.listen_port is not None:
                secret = None
                if changes.set_private_key:
                    if private_key is None:
                        raise DeviceError("changes install the private key but none was given")
                    secret = private_key.reveal_base64()
                self.wg.set(self.interface, listen_port=changes.listen_port, private_key=secret)
            for key in changes.removals:
                self.wg.set(self.interface, peer={"public_key": key, "remove": True})
            for update in changes.updates:
                for peer in netlink_peer_messages(update):
                    self.wg.set(self.interface, peer=peer)
        except DeviceError:
            raise
        except Exception as err:
            raise DeviceError(f"{self.interface}: netlink set failed: {err}") from None


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def netlink_peer_messages(update: PeerUpdate) -> list[dict[str, Any]]:
    """pyroute2 peer dicts for one update; long allowed-IP lists are chunked."""
    first: dict[str, Any] = {"public_key": update.public_key}
    if update.endpoint is not None:
        first["endpoint_addr"], first["endpoint_port"] = split_endpoint(update.endpoint)
    if update.keepalive_s is not None:
        first["persistent_keepalive"] = update.keepalive_s
    if update.allowed_ips is None:
        return [first]
    ips = list(update.allowed_ips)
    step = NETLINK_ALLOWED_IPS_PER_MESSAGE
    first["replace_allowed_ips"] = True
    first["allowed_ips"] = ips[:step]
    out = [first]
    for start in range(step, len(ips), step):
        out.append({"public_key": update.public_key, "allowed_ips": ips[start : start + step]})
    return out


def _attr(msg: Any, name: str) -> Any:
    getter = getattr(msg, "get_attr", None)
    if getter is not None:
        return getter(name)
    return msg.get(name) if isinstance(msg, Mapping) else None


def _value(attr: Any, key: str = "value") -> Any:
    if attr is None:
        return None
    if isinstance(attr, bytes | str | int):
        return attr
    getter = getattr(attr, "get", None)
    return getter(key) if getter is not None else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_netlink(messages: Iterable[Any]) -> ObservedDevice:
    """An ObservedDevice from pyroute2 ``WireGuard.info`` messages (one device, maybe
    split over several messages when it has many peers)."""
    public_key: str | None = None
    listen_port: int | None = None
    peers: dict[str, ObservedPeer] = {}
    for msg in messages:
        secret = _text(_value(_attr(msg, "WGDEVICE_A_PRIVATE_KEY")))
        if secret and public_key is None:
            public_key = PrivateKey.from_base64(secret).public_key
        del secret
        port = _attr(msg, "WGDEVICE_A_LISTEN_PORT")
        if port is not None:
            listen_port = int(port)
        for peer in _attr(msg, "WGDEVICE_A_PEERS") or []:
            key = _text(_value(_attr(peer, "WGPEER_A_PUBLIC_KEY")))
            if key is None:
                continue
            endpoint_attr = _attr(peer, "WGPEER_A_ENDPOINT")
            endpoint = None
            if endpoint_attr is not None:
                addr, port_ = _value(endpoint_attr, "addr"), _value(endpoint_attr, "port")
                if addr and port_:
                    endpoint = f"[{addr}]:{port_}" if ":" in str(addr) else f"{addr}:{port_}"
            handshake_attr = _attr(peer, "WGPEER_A_LAST_HANDSHAKE_TIME")
            sec = _value(handshake_attr, "tv_sec") or 0
            nsec = _value(handshake_attr, "tv_nsec") or 0
            ips = [
                str(_value(ip, "addr"))
                for ip in (_attr(peer, "WGPEER_A_ALLOWEDIPS") or [])
                if _value(ip, "addr")
            ]
            previous = peers.get(key)
            if previous is not None:  # a peer's allowed IPs continued in the next message
                peers[key] = replace(
                    previous, allowed_ips=tuple(sorted([*previous.allowed_ips, *ips]))
                )
                continue
            peers[key] = ObservedPeer(
                public_key=key,
                endpoint=endpoint,
                allowed_ips=tuple(sorted(ips)),
                keepalive_s=int(_attr(peer, "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
                last_handshake=(sec + nsec / 1e9) if sec else None,
                rx_bytes=int(_attr(peer, "WGPEER_A_RX_BYTES") or 0),
                tx_bytes=int(_attr(peer, "WGPEER_A_TX_BYTES") or 0),
            )
    return ObservedDevice(public_key=public_key, listen_port=listen_port, peers=peers)
