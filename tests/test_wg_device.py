"""The UAPI client against a real wireguard-go, and the device state a sync assumes.

A sync no longer reads the device back after writing it (:func:`apply_changes` folds the
accepted changes into what it read): here every kind of change goes to a real
wireguard-go and the fold must equal what the device then reports. The device lives in a
throwaway network namespace with its interface down, so it sends nothing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gpumesh.node_agent.wg.diff import (
    ObservedDevice,
    ObservedPeer,
    PeerChanges,
    PeerUpdate,
    apply_changes,
)
from gpumesh.node_agent.wg.keys import PrivateKey
from gpumesh.node_agent.wg.uapi import RUN_DIR, UapiClient, build_set

pytestmark = pytest.mark.netns

ME = PrivateKey.generate()
NEXT = PrivateKey.generate()
A, B, C, D = (PrivateKey.generate().public_key for _ in range(4))


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "wireguard-go"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None if Path("/dev/net/tun").exists() else "no /dev/net/tun"


@pytest.fixture
def client() -> Iterator[UapiClient]:
    why = _missing()
    if why:
        pytest.fail(f"{why}: run `make system-packages` as root", pytrace=False)
    name = f"gmt{secrets.token_hex(3)}"  # the UAPI socket path is per machine: unique
    sock = RUN_DIR / f"{name}.sock"
    subprocess.run(["ip", "netns", "add", name], check=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", name, "wireguard-go", "-f", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not sock.is_socket():
            assert proc.poll() is None and time.monotonic() < deadline, "no wireguard-go"
            time.sleep(0.02)
        yield UapiClient(name)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        sock.unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "del", name], check=True)
    assert not sock.exists()
    assert (
        name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )


def settings(device: ObservedDevice) -> ObservedDevice:
    """What a set decides (handshakes and counters are the device's own)."""
    peers = {
        k: replace(p, last_handshake=None, rx_bytes=0, tx_bytes=0) for k, p in device.peers.items()
    }
    return ObservedDevice(device.public_key, device.listen_port, peers)


def check(client: UapiClient, changes: PeerChanges, key: PrivateKey = ME) -> ObservedDevice:
    before = client.get()
    client.apply(changes, key)
    after = client.get()
    assert settings(apply_changes(before, changes, key.public_key)) == settings(after)
    return after


def test_every_kind_of_change_lands_as_the_fold_says(client: UapiClient) -> None:
    device = check(client, PeerChanges(set_private_key=True, listen_port=51999))
    assert device.public_key == ME.public_key and device.listen_port == 51999
    device = check(
        client,
        PeerChanges(
            updates=(
                PeerUpdate(A, True, "198.51.100.1:51820", None, ("198.19.0.1/32",)),
                PeerUpdate(B, True, None, 25, ("198.19.0.2/32", "198.19.128.0/24")),
                PeerUpdate(C, True, "[2001:db8::3]:51820", None, ("198.19.0.3/32",)),
            )
        ),
    )
    assert device.peers[B].keepalive_s == 25 and device.peers[C].endpoint == "[2001:db8::3]:51820"
    # Remove one, re-point one, create one that takes over a range another peer holds (the
    # device moves it; the fold must too), and turn keepalive off.
    device = check(
        client,
        PeerChanges(
            updates=(
                PeerUpdate(A, False, "198.51.100.9:4000", None, None),
                PeerUpdate(B, False, None, 0, None),
                PeerUpdate(D, True, None, None, ("198.19.128.0/24", "198.19.0.4/32")),
            ),
            removals=(C,),
        ),
    )
    assert set(device.peers) == {A, B, D}
    assert device.peers[B].allowed_ips == ("198.19.0.2/32",)
    # A new device key that one of the peers has: the device drops that peer.
    check(client, PeerChanges(updates=(PeerUpdate(NEXT.public_key, True, None, None, ()),)))
    device = check(client, PeerChanges(set_private_key=True), NEXT)
    assert device.public_key == NEXT.public_key and set(device.peers) == {A, B, D}


def test_the_fold_of_nothing_is_the_device_as_read() -> None:
    device = ObservedDevice(ME.public_key, 51820, {A: ObservedPeer(A, "198.51.100.1:1")})
    assert apply_changes(device, PeerChanges(), ME.public_key) is device


def test_a_thousand_peer_set_is_accepted_in_one_request(client: UapiClient) -> None:
    updates = tuple(
        PeerUpdate(
            PrivateKey.generate().public_key,
            True,
            f"203.0.113.{i % 250 + 1}:{51820 + i // 250}",
            None,
            (f"198.19.{i // 250}.{i % 250 + 1}/32",),
        )
        for i in range(1000)
    )
    changes = PeerChanges(updates=updates, set_private_key=True, listen_port=51998)
    assert len(build_set(changes, ME)) > 100_000
    device = check(client, changes)
    assert len(device.peers) == 1000
