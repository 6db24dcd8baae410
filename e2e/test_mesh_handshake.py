"""A NAT'd node's first handshake, dropped by a relay that did not know it yet, on real
wireguard-go: WireGuard itself waits 5 s to try again; the agent's parts try after 1 s.

Two lab hosts (network namespaces on a bridge, no control plane): a relay with a public
endpoint and a NAT'd host behind a firewall. The NAT'd host applies the catalogue first,
as happens when its agent is a little quicker, so its initiation reaches a relay that
drops it. The test then does what the agent loop does (:class:`FirstHandshakes` decides,
:meth:`MeshSyncer.recreate` acts) and times the handshake.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from netns import Host, Lab, missing_prerequisites, ns_run

from gpumesh.node_agent.wg.device import UapiBackend
from gpumesh.node_agent.wg.handshake import RETRY_AFTER_S, FirstHandshakes
from gpumesh.node_agent.wg.keys import KeyStore
from gpumesh.node_agent.wg.sync import MeshSyncer
from gpumesh.operator.mesh import MeshConfig, MeshNode, plan

pytestmark = pytest.mark.netns

CONFIG = MeshConfig(overlay_cidr="198.19.0.0/24", pod_cidr="198.19.128.0/17", pod_prefix=24)


@pytest.fixture
def lab() -> Iterator[Lab]:
    why = missing_prerequisites()
    if why:
        pytest.fail(f"mesh lab: {why}", pytrace=False)
    opened = Lab().open()
    try:
        yield opened
    finally:
        opened.close()
        assert not opened.leftovers(), f"the lab left {opened.leftovers()} behind"


def syncer_on(lab: Lab, host: Host) -> MeshSyncer:
    """A host's device up (as the agent's links would bring it) with its key installed."""
    lab.start_wireguard(host)
    ns_run(host.ns, "ip", "link", "set", host.interface, "up")
    syncer = MeshSyncer(
        host.name,
        UapiBackend(host.interface),
        KeyStore(host.key_dir),
        None,
        listen_port=host.listen_port,
    )
    syncer.start()
    return syncer


def handshook(syncer: MeshSyncer, key: str) -> bool:
    return syncer.observe().peers[key].last_handshake is not None


def test_a_dropped_first_handshake_is_retried_after_one_second(lab: Lab) -> None:
    relay_host, natd_host = lab.add_host(0, public=True), lab.add_host(1, public=False)
    relay, natd = syncer_on(lab, relay_host), syncer_on(lab, natd_host)
    catalogue = plan(
        [
            MeshNode(relay_host.name, relay.public_key, relay_host.endpoint),
            MeshNode(natd_host.name, natd.public_key, None),
        ],
        CONFIG,
    ).catalogue()
    tracker = FirstHandshakes()
    started = time.monotonic()
    result = natd.sync(catalogue)  # its keepalive sends the first initiation at once
    tracker.created((u.public_key for u in result.changes.updates if u.create), started)
    assert result.changes.created == 1
    time.sleep(0.2)
    relay.sync(catalogue)  # too late for that initiation: the relay dropped it

    time.sleep(max(0.0, started + RETRY_AFTER_S - time.monotonic()))
    observed = natd.observe()
    peer = observed.peers[relay.public_key]
    assert peer.last_handshake is None, "WireGuard retried by itself within 1 s"
    assert peer.tx_bytes > 0, "the initiation went out"
    due = tracker.due(observed, time.monotonic())
    assert due == [relay.public_key]
    changes = natd.recreate(due)
    assert changes.removals == (relay.public_key,) and changes.created == 1
    retried = time.monotonic()
    while not handshook(natd, relay.public_key):
        assert time.monotonic() - retried < 2.0, "no handshake 2 s after the fresh initiation"
        time.sleep(0.02)
    took = time.monotonic() - started
    print(f"handshake {took:.2f} s after the NAT'd host applied the catalogue")
    assert handshook(relay, natd.public_key)
    recreated = natd.observe().peers[relay.public_key]
    assert recreated.keepalive_s == 25 and recreated.endpoint == relay_host.endpoint
    assert set(recreated.allowed_ips) == set(result.observed.peers[relay.public_key].allowed_ips)
