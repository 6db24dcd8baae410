"""Kernel WireGuard through pyroute2: real netlink messages parsed, per-peer sets sent.

This machine's kernel may lack the WireGuard module, so the messages here are pyroute2's
own ``wgmsg`` encoded to bytes and decoded back, exactly what ``WireGuard.info`` yields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from socket import AF_INET, inet_pton
from typing import Any

from pyroute2.netlink.generic.wireguard import wgmsg

from gpumesh.node_agent.wg.device import (
    NETLINK_ALLOWED_IPS_PER_MESSAGE,
    NetlinkBackend,
    netlink_peer_messages,
    parse_netlink,
)
from gpumesh.node_agent.wg.diff import PeerChanges, PeerUpdate
from gpumesh.node_agent.wg.keys import PrivateKey

ME = PrivateKey.generate()
A = PrivateKey.generate().public_key
B = PrivateKey.generate().public_key


def allowed(cidr: str) -> dict[str, Any]:
    addr, mask = cidr.split("/")
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", AF_INET],
            ["WGALLOWEDIP_A_IPADDR", inet_pton(AF_INET, addr)],
            ["WGALLOWEDIP_A_CIDR_MASK", int(mask)],
        ]
    }


def device_message(peers: list[list[Any]], with_device: bool = True) -> wgmsg:
    msg = wgmsg()
    msg["cmd"] = 0
    msg["version"] = 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "wg0"])
    if with_device:
        msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", ME.reveal_base64()])
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", 51820])
    msg["attrs"].append(["WGDEVICE_A_PEERS", [{"attrs": attrs} for attrs in peers]])
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def test_parse_real_pyroute2_messages_including_a_continued_peer() -> None:
    first = device_message(
        [
            [
                ["WGPEER_A_PUBLIC_KEY", A],
                ["WGPEER_A_ENDPOINT", {"addr": "198.51.100.10", "port": 51820}],
                ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
                ["WGPEER_A_RX_BYTES", 200],
                ["WGPEER_A_TX_BYTES", 100],
                ["WGPEER_A_ALLOWEDIPS", [allowed("198.19.0.1/32")]],
            ]
        ]
    )
    second = device_message(  # the kernel splits long allowed-IP lists over messages
        [
            [["WGPEER_A_PUBLIC_KEY", A], ["WGPEER_A_ALLOWEDIPS", [allowed("198.19.128.0/24")]]],
            [["WGPEER_A_PUBLIC_KEY", B]],
        ],
        with_device=False,
    )
    dev = parse_netlink([first, second])
    assert dev.public_key == ME.public_key and dev.listen_port == 51820
    a = dev.peers[A]
    assert a.endpoint == "198.51.100.10:51820" and a.keepalive_s == 25
    assert a.allowed_ips == ("198.19.0.1/32", "198.19.128.0/24")
    assert (a.rx_bytes, a.tx_bytes) == (200, 100)
    assert dev.peers[B].endpoint is None and dev.peers[B].last_handshake is None


class FakeWireGuard:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def info(self, interface: str) -> Iterable[Any]:
        return [device_message([])]

    def set(
        self,
        interface: str,
        listen_port: int | None = None,
        fwmark: int | None = None,
        private_key: str | None = None,
        peer: Mapping[str, Any] | None = None,
    ) -> Any:
        self.calls.append(
            {"listen_port": listen_port, "private_key": private_key, "peer": dict(peer or {})}
        )


def test_apply_sends_one_set_per_peer_never_replace_peers() -> None:
    fake = FakeWireGuard()
    backend = NetlinkBackend("wg0", wireguard=lambda: fake)
    assert backend.observe().public_key == ME.public_key
    changes = PeerChanges(
        updates=(PeerUpdate(A, True, "[fd00::1]:51820", 25, ("198.19.0.1/32",)),),
        removals=(B,),
        set_private_key=True,
        listen_port=51820,
    )
    backend.apply(changes, ME)
    device, removal, update = fake.calls
    assert device["private_key"] == ME.reveal_base64() and device["listen_port"] == 51820
    assert removal["peer"] == {"public_key": B, "remove": True}
    assert update["peer"] == {
        "public_key": A,
        "endpoint_addr": "fd00::1",
        "endpoint_port": 51820,
        "persistent_keepalive": 25,
        "replace_allowed_ips": True,
        "allowed_ips": ["198.19.0.1/32"],
    }
    assert all("replace_peers" not in str(c) for c in fake.calls)


def test_long_allowed_ip_lists_are_chunked_replace_first_then_append() -> None:
    ips = tuple(f"198.19.{i // 256}.{i % 256}/32" for i in range(600))
    messages = netlink_peer_messages(PeerUpdate(A, False, None, None, ips))
    step = NETLINK_ALLOWED_IPS_PER_MESSAGE
    assert len(messages) == 3
    assert messages[0]["replace_allowed_ips"] is True and len(messages[0]["allowed_ips"]) == step
    assert all("replace_allowed_ips" not in m for m in messages[1:])
    assert [ip for m in messages for ip in m["allowed_ips"]] == list(ips)
