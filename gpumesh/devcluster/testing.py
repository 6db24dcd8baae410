"""Small helpers shared by the e2e suite (and anyone else testing against a cluster).

They live in the package rather than in ``e2e/conftest.py`` so test modules can import
and type them normally.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kubernetes.client import ApiClient

from gpumesh.devcluster.fleet import Fleet

T = TypeVar("T")


@dataclass(frozen=True)
class KubeTarget:
    """The cluster an e2e session runs against.

    ``state_dir`` is None for a cluster named by ``GPUMESH_E2E_KUBECONFIG`` (nothing local
    to inspect); ``fleet`` is None when no simulated fleet was applied (no kwok there).
    """

    kubeconfig: Path
    api: ApiClient
    state_dir: Path | None
    started_here: bool
    fleet: Fleet | None


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float = 60.0,
    interval: float = 0.25,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` on timeout.

    Controllers converge asynchronously, so tests wait for the state they assert on.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
