"""The agent's ``status.mesh`` fields: read back from the API, and the smallest patch."""

from __future__ import annotations

from gpumesh.node_agent.wg.report import (
    MAX_ENDPOINTS,
    MeshReport,
    endpoint_candidates,
    read_report,
    report_patch,
)

KEY = "A" * 43 + "="


def test_read_report_keeps_the_agents_fields_and_skips_garbage() -> None:
    body = {
        "status": {
            "mesh": {
                "publicKey": KEY,
                "endpoints": ["198.51.100.1:51820"],
                "peerEndpoints": [{"node": "n1", "endpoint": "203.0.113.7:4000"}, {"node": 3}],
                "rttMs": {"a": 1.5, "b": "fast", "c": True, "d": 2},
                "rttFloorMs": 40,
                "observedEndpoint": "203.0.113.9:5555",
                "overlayIp": "198.19.0.5",
            }
        }
    }
    report, observed = read_report(body)
    assert report == MeshReport(
        KEY, ("198.51.100.1:51820",), (("n1", "203.0.113.7:4000"),), {"a": 1.5, "d": 2.0}, 40.0
    )
    assert observed == "203.0.113.9:5555"
    assert read_report(None) == (MeshReport(None), None)
    assert read_report({"status": {"mesh": {"observedEndpoint": "x\ny:1"}}})[1] is None


def test_candidates_put_the_observed_endpoint_last_once_and_stay_bounded() -> None:
    mine = ("198.51.100.1:51820", "10.0.0.1:51820")
    assert endpoint_candidates(mine, "203.0.113.9:5555") == (*mine, "203.0.113.9:5555")
    assert endpoint_candidates(mine, "10.0.0.1:51820") == mine
    many = tuple(f"10.0.0.{i}:1" for i in range(MAX_ENDPOINTS))
    assert endpoint_candidates(many, "203.0.113.9:5555") == many


def test_the_patch_names_only_what_differs_and_deletes_gone_rtts() -> None:
    have = MeshReport(KEY, ("198.51.100.1:51820",), (), {"a": 1.0, "b": 2.0})
    assert report_patch(have, have, rtt=True) is None
    want = MeshReport(KEY, ("198.51.100.1:51820",), (("n1", "203.0.113.7:4000"),), {"a": 1.0})
    assert report_patch(have, want, rtt=False) == {
        "status": {"mesh": {"peerEndpoints": [{"node": "n1", "endpoint": "203.0.113.7:4000"}]}}
    }
    assert report_patch(have, want, rtt=True) == {
        "status": {
            "mesh": {
                "peerEndpoints": [{"node": "n1", "endpoint": "203.0.113.7:4000"}],
                "rttMs": {"b": None},
            }
        }
    }
    # Nothing of ours yet: empty fields are not written (the API's absence means empty).
    assert report_patch(MeshReport(None), MeshReport(KEY), rtt=True) == {
        "status": {"mesh": {"publicKey": KEY}}
    }


def test_the_floor_goes_with_the_rtts_and_is_deleted_when_gone() -> None:
    have = MeshReport(KEY, rtt_ms={"a": 1.0}, rtt_floor_ms=30.0)
    gone = MeshReport(KEY, rtt_ms={"a": 1.0})
    assert report_patch(have, gone, rtt=False) is None
    assert report_patch(have, gone, rtt=True) == {"status": {"mesh": {"rttFloorMs": None}}}
    moved = MeshReport(KEY, rtt_ms={"a": 1.0}, rtt_floor_ms=45.5)
    assert report_patch(have, moved, rtt=True) == {"status": {"mesh": {"rttFloorMs": 45.5}}}
