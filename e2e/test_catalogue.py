"""The mesh catalogue ConfigMap has one writer, the operator: a catalogue written by anyone
else (a restore from backup, a hand edit) or deleted is replaced within seconds, under a
generation above the one found, so agents that read the outside write take ours as newer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpumesh.api.mesh import CATALOGUE_KEY, CATALOGUE_NAME, Catalogue
from gpumesh.operator.settings import OperatorSettings
from testbed.testing import KubeTarget, OperatedMesh, operated_mesh, wait_for

pytestmark = pytest.mark.e2e

FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"
SYSTEM = OperatorSettings().namespace


@pytest.fixture(scope="module")
def world(kube: KubeTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatedMesh]:
    if kube.fleet is None:
        pytest.skip("this cluster has no simulated fleet for agents to play")
    with operated_mesh(kube, tmp_path_factory.mktemp("catalogue"), FLEET, ()) as mesh:
        yield mesh


def published(api: client.ApiClient) -> Catalogue | None:
    core: Any = client.CoreV1Api(api)
    try:
        found = core.read_namespaced_config_map(CATALOGUE_NAME, SYSTEM)
    except ApiException:
        return None
    text = (found.data or {}).get(CATALOGUE_KEY)
    return Catalogue.decode(text) if text else None


def above(api: client.ApiClient, generation: int) -> Catalogue | None:
    found = published(api)
    return found if found is not None and found.generation > generation else None


def test_an_outside_write_of_the_catalogue_is_replaced_within_seconds(world: OperatedMesh) -> None:
    api = world.api
    ours = wait_for("a published catalogue", lambda: published(api))
    theirs = ours.generation + 1000
    core: Any = client.CoreV1Api(api)
    # A member the operator never planned (the dev fleet's agents run no WireGuard, so
    # the operator's own catalogue may have none).
    intruder = [
        "intruder",
        "A" * 43 + "=",
        "127.0.0.1:9",
        "10.90.255.1",
        "10.255.0.0/24",
        None,
    ]
    empty = {
        "version": 1,
        "generation": theirs,
        "overlayCidr": ours.overlay_cidr,
        "nodes": [intruder],
    }
    assert Catalogue.decode(json.dumps(empty)).entries  # a valid catalogue, not ours
    written = time.monotonic()
    core.patch_namespaced_config_map(
        CATALOGUE_NAME, SYSTEM, {"data": {CATALOGUE_KEY: json.dumps(empty)}}
    )
    again = wait_for("our catalogue back", lambda: above(api, theirs), timeout=30)
    took = time.monotonic() - written
    print(f"catalogue restored {took:.1f} s after an outside write")
    assert again.entries == ours.entries
    assert took < 15

    core.delete_namespaced_config_map(CATALOGUE_NAME, SYSTEM)
    deleted = time.monotonic()
    back = wait_for("the catalogue published again", lambda: published(api), timeout=30)
    assert back.entries == ours.entries and back.generation > again.generation
    assert time.monotonic() - deleted < 15
