"""UAPI messages and the per-peer diff: exact lines out, device state in, no replace_peers,
nothing at all for an unchanged plan, and a client that reads answers whole."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpumesh.node_agent.wg.diff import (
    ObservedDevice,
    ObservedPeer,
    PeerChanges,
    PeerUpdate,
    diff_device,
)
from gpumesh.node_agent.wg.keys import PrivateKey
from gpumesh.node_agent.wg.peers import DesiredPeer
from gpumesh.node_agent.wg.uapi import (
    UapiClient,
    UapiError,
    b64_to_hex,
    build_set,
    hex_to_b64,
    lines_of,
    parse_get,
)

ME = PrivateKey.generate()
A = PrivateKey.generate().public_key
B = PrivateKey.generate().public_key
C = PrivateKey.generate().public_key


Ips = tuple[str, ...]


def desired(key: str, endpoint: str | None, ips: Ips, keepalive: int = 0) -> DesiredPeer:
    return DesiredPeer(key[:4], key, endpoint, ips, keepalive)


def observed(key: str, endpoint: str | None, ips: Ips, keepalive: int = 0) -> ObservedPeer:
    return ObservedPeer(key, endpoint, ips, keepalive)


def device(*peers: ObservedPeer, port: int | None = 51820) -> ObservedDevice:
    return ObservedDevice(ME.public_key, port, {p.public_key: p for p in peers})


def test_unchanged_plan_means_no_changes_and_no_message() -> None:
    peers = [
        desired(A, "198.51.100.10:51820", ("198.19.0.1/32", "198.19.128.0/24")),
        desired(B, None, ("198.19.0.2/32",), keepalive=25),
    ]
    dev = device(
        observed(A, "198.51.100.10:51820", ("198.19.128.0/24", "198.19.0.1/32")),
        observed(B, "198.51.100.77:4242", ("198.19.0.2/32",), keepalive=25),  # learned
    )
    changes = diff_device(peers, dev, public_key=ME.public_key, listen_port=51820)
    assert not changes


def test_new_changed_and_gone_peers_each_get_only_their_lines() -> None:
    peers = [
        desired(A, "198.51.100.10:51820", ("198.19.0.1/32", "198.19.131.0/24")),  # ips grew
        desired(C, "198.51.100.12:51820", ("198.19.0.3/32",)),  # new
    ]
    dev = device(
        observed(A, "198.51.100.10:51820", ("198.19.0.1/32",)),
        observed(B, "198.51.100.11:51820", ("198.19.0.2/32",)),  # gone
    )
    changes = diff_device(peers, dev, public_key=ME.public_key, listen_port=51820)
    assert changes.removals == (B,)
    assert changes.created == 1 and changes.changed == 1
    text = build_set(changes).decode()
    assert text == (
        "set=1\n"
        f"public_key={b64_to_hex(B)}\nremove=true\n"
        f"public_key={b64_to_hex(A)}\nreplace_allowed_ips=true\n"
        "allowed_ip=198.19.0.1/32\nallowed_ip=198.19.131.0/24\n"
        f"public_key={b64_to_hex(C)}\nendpoint=198.51.100.12:51820\n"
        "replace_allowed_ips=true\nallowed_ip=198.19.0.3/32\n"
        "\n"
    )
    assert "replace_peers" not in text


def test_keepalive_and_endpoint_changes_touch_nothing_else() -> None:
    peers = [desired(A, "198.51.100.20:51820", ("198.19.0.1/32",), keepalive=25)]
    dev = device(observed(A, "198.51.100.10:51820", ("198.19.0.1/32",)))
    (update,) = diff_device(peers, dev, public_key=ME.public_key, listen_port=51820).updates
    assert update == PeerUpdate(A, False, "198.51.100.20:51820", 25, None)


def test_roaming_is_respected_once_we_applied_the_endpoint() -> None:
    peers = [desired(A, "198.51.100.10:51820", ("198.19.0.1/32",))]
    roamed = device(observed(A, "198.51.100.99:6000", ("198.19.0.1/32",)))
    applied = {A: "198.51.100.10:51820"}

    def diff(wanted: list[DesiredPeer]) -> PeerChanges:
        return diff_device(
            wanted, roamed, public_key=ME.public_key, listen_port=51820, applied_endpoints=applied
        )

    assert not diff(peers)
    moved = [desired(A, "198.51.100.30:51820", ("198.19.0.1/32",))]
    (update,) = diff(moved).updates
    assert update.endpoint == "198.51.100.30:51820"


def test_device_key_and_port_are_installed_when_they_differ() -> None:
    fresh = ObservedDevice(public_key=None, listen_port=0, peers={})
    changes = diff_device([], fresh, public_key=ME.public_key, listen_port=51820)
    assert changes.set_private_key and changes.listen_port == 51820
    request = build_set(changes, ME)
    assert request.startswith(f"set=1\nprivate_key={ME.reveal_hex()}\nlisten_port=51820\n".encode())
    assert "private_key=(hidden)" in list(lines_of(request))
    with pytest.raises(ValueError, match="private key"):
        build_set(changes)


def test_peers_turning_keepalive_on_are_sent_last() -> None:
    changes = PeerChanges(
        updates=(
            PeerUpdate(A, True, None, 25, ("198.19.0.1/32",)),
            PeerUpdate(B, True, "198.51.100.2:51820", None, ("198.19.0.2/32",)),
        )
    )
    keys = [line for line in build_set(changes).decode().split("\n") if "public_key" in line]
    assert keys == [f"public_key={b64_to_hex(B)}", f"public_key={b64_to_hex(A)}"]


def test_baseline_replace_peers_is_only_on_request() -> None:
    changes = PeerChanges(updates=(PeerUpdate(A, True, None, None, ("198.19.0.1/32",)),))
    assert b"replace_peers=true" in build_set(changes, replace_peers=True)
    assert b"replace_peers" not in build_set(changes)


def test_newline_in_a_value_cannot_inject_commands() -> None:
    bad = PeerChanges(updates=(PeerUpdate(A, True, "1.2.3.4:5\nreplace_peers=true", None, ()),))
    with pytest.raises(ValueError, match="cannot go into a UAPI line"):
        build_set(bad)


@pytest.mark.parametrize("bad", ["198.19.0.2/32\nreplace_peers=true", "198.19.0.2/32\r", ""])
def test_no_allowed_ip_of_many_can_inject_commands(bad: str) -> None:
    ips = tuple(f"198.19.{i // 250}.{i % 250}/32" for i in range(500))
    good = PeerChanges(updates=(PeerUpdate(A, True, None, None, ips),))
    assert build_set(good).decode().count("\nallowed_ip=") == 500
    changes = PeerChanges(updates=(PeerUpdate(A, True, None, None, (*ips[:300], bad, *ips[300:])),))
    with pytest.raises(ValueError, match=re.escape(f"allowed IP {bad!r} cannot")):
        build_set(changes)


GET_ANSWER = (
    "private_key={priv}\nlisten_port=51820\nfwmark=0\n"
    "public_key={a}\npreshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    "protocol_version=1\nendpoint=198.51.100.10:51820\nlast_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\ntx_bytes=100\nrx_bytes=200\n"
    "persistent_keepalive_interval=0\nallowed_ip=198.19.128.0/24\nallowed_ip=198.19.0.1/32\n"
    "public_key={b}\nprotocol_version=1\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
    "tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=25\n"
    "errno=0\n\n"
)


def answer() -> str:
    return GET_ANSWER.format(priv=ME.reveal_hex(), a=b64_to_hex(A), b=b64_to_hex(B))


def test_parse_get_reads_peers_and_keeps_only_the_public_key() -> None:
    dev = parse_get(answer())
    assert dev.public_key == ME.public_key and dev.listen_port == 51820
    a, b = dev.peers[A], dev.peers[B]
    assert a.endpoint == "198.51.100.10:51820" and a.last_handshake == 1700000000.5
    assert a.allowed_ips == ("198.19.0.1/32", "198.19.128.0/24")
    assert (a.rx_bytes, a.tx_bytes) == (200, 100)
    assert b.endpoint is None and b.last_handshake is None and b.keepalive_s == 25
    assert ME.reveal_hex() not in repr(dev)
    assert hex_to_b64(b64_to_hex(A)) == A


def test_parse_get_rejects_errors_and_garbage() -> None:
    with pytest.raises(ValueError, match="errno 22"):
        parse_get("errno=22\n\n")
    with pytest.raises(ValueError, match="without '='"):
        parse_get("garbage\n\n")


@pytest.fixture
def fake_device(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A Unix socket answering like wireguard-go, in small pieces (as a stream may)."""
    path = tmp_path / "wgtest.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n\n"):
                    data += conn.recv(4096)
                received.append(data)
                reply = answer().encode() if data == b"get=1\n\n" else b"errno=0\n\n"
                if b"remove=true" in data and b"set=1" in data and b"fail" in data:
                    reply = b"errno=22\n\n"
                for i in range(0, len(reply), 7):
                    conn.sendall(reply[i : i + 7])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, received
    server.close()


def test_client_gets_and_sets_over_the_socket(fake_device: tuple[Path, list[bytes]]) -> None:
    path, received = fake_device
    client = UapiClient("wgtest", run_dir=path.parent)
    assert client.exists()
    assert set(client.get().peers) == {A, B}
    changes = PeerChanges(removals=(C,))
    client.apply(changes)
    client.apply(PeerChanges())  # nothing to do: nothing sent
    assert received == [b"get=1\n\n", build_set(changes)]


def test_client_reports_a_missing_socket_without_the_request(tmp_path: Path) -> None:
    client = UapiClient("absent", run_dir=tmp_path)
    with pytest.raises(UapiError, match="absent") as info:
        client.set(build_set(PeerChanges(set_private_key=True), ME))
    assert ME.reveal_hex() not in str(info.value)
