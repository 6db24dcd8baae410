"""Which just-created peers get a fresh first handshake, and when."""

from __future__ import annotations

from gpumesh.node_agent.wg.diff import ObservedDevice, ObservedPeer
from gpumesh.node_agent.wg.handshake import RETRY_AFTER_S, RETRY_UNTIL_S, FirstHandshakes

T0 = 100.0


def device(**peers: ObservedPeer) -> ObservedDevice:
    return ObservedDevice("me", 51820, peers)


def waiting(key: str) -> ObservedPeer:
    """Sent an initiation, got nothing back."""
    return ObservedPeer(key, "198.51.100.11:51820", tx_bytes=148)


def test_an_unanswered_first_initiation_is_sent_again_after_a_second() -> None:
    tracker = FirstHandshakes()
    tracker.created(["relay"], T0)
    assert tracker.next_check() == T0 + RETRY_AFTER_S
    assert tracker.due(device(relay=waiting("relay")), T0 + 0.5) == []
    assert tracker.due(device(relay=waiting("relay")), T0 + RETRY_AFTER_S) == ["relay"]
    assert tracker.next_check() == T0 + 2 * RETRY_AFTER_S
    assert tracker.due(device(relay=waiting("relay")), T0 + 1.5) == [], "once a second"


def test_a_peer_that_handshook_is_forgotten() -> None:
    tracker = FirstHandshakes()
    tracker.created(["relay"], T0)
    answered = ObservedPeer("relay", tx_bytes=148, rx_bytes=92, last_handshake=1_700_000_000.0)
    assert tracker.due(device(relay=answered), T0 + 1) == []
    assert len(tracker) == 0 and tracker.next_check() is None


def test_a_peer_nobody_sent_to_is_left_to_its_first_packet() -> None:
    """No traffic means no initiation went out: nothing was dropped, nothing to redo."""
    tracker = FirstHandshakes()
    tracker.created(["quiet"], T0)
    assert tracker.due(device(quiet=ObservedPeer("quiet", "198.51.100.12:51820")), T0 + 1) == []
    assert len(tracker) == 1, "still watched: it may send later"


def test_retries_stop_before_wireguard_retries_by_itself() -> None:
    tracker = FirstHandshakes()
    tracker.created(["relay"], T0)
    sent = [
        t
        for t in (T0 + 1, T0 + 2, T0 + 3, T0 + RETRY_UNTIL_S, T0 + 6)
        if tracker.due(device(relay=waiting("relay")), t)
    ]
    assert sent == [T0 + 1, T0 + 2, T0 + 3]
    assert len(tracker) == 0


def test_a_removed_peer_is_forgotten_and_each_peer_keeps_its_own_clock() -> None:
    tracker = FirstHandshakes()
    tracker.created(["gone", "early"], T0)
    tracker.created(["late"], T0 + 0.5)
    both = device(early=waiting("early"), late=waiting("late"))
    assert tracker.due(both, T0 + 1) == ["early"]
    assert tracker.due(both, T0 + 1.5) == ["late"]
    assert len(tracker) == 2
