"""The lab harness refuses address ranges this machine already uses, before touching it."""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from types import ModuleType
from typing import Any

import pytest

from corpus import ROOT


@pytest.fixture(scope="module")
def netns() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mesh_lab_netns", ROOT / "e2e" / "netns.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fake_ip(routes: list[dict[str, Any]], addrs: list[dict[str, Any]]) -> Any:
    def ip_json(*argv: str) -> list[dict[str, Any]]:
        return routes if argv[0] == "route" else addrs

    return ip_json


RANGES = [ipaddress.IPv4Network("198.51.100.0/24"), ipaddress.IPv4Network("198.19.0.0/16")]


def test_a_clashing_route_or_address_fails_clearly(
    netns: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = [
        {"dst": "default", "dev": "eth0"},
        {"dst": "192.0.2.0/24", "dev": "eth0"},
        {"dst": "198.19.4.0/22", "dev": "tun7"},
    ]
    addrs = [{"ifname": "wg9", "addr_info": [{"local": "198.51.100.7"}]}]
    monkeypatch.setattr(netns, "_ip_json", fake_ip(routes, addrs))
    with pytest.raises(netns.LabError) as info:
        netns.check_ranges_free(RANGES)
    message = str(info.value)
    assert "198.19.4.0/22 dev tun7" in message and "198.51.100.7 on wg9" in message


def test_free_ranges_pass_and_the_real_network_is_never_claimed(
    netns: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netns, "_ip_json", fake_ip([{"dst": "192.0.2.0/24"}], []))
    netns.check_ranges_free(RANGES)
    with pytest.raises(netns.LabError, match="real network"):
        netns.check_ranges_free([ipaddress.IPv4Network("192.0.0.0/16")])
