"""The local development and test cluster: a real control plane on 127.0.0.1.

Plain functions for the CLI (``python -m testbed up|down|status|kubeconfig``) and for tests.
State (PKI, etcd data, logs, PIDs) lives in one directory, by default
``${GPUMESH_STATE:-~/.local/state/gpumesh}/dev``, so any process can find and stop a
cluster another process started.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.cluster import (
        ClusterError,
        ClusterStatus,
        ComponentStatus,
        FleetApplied,
        LocalCluster,
    )
    from testbed.fleet import Fleet, load_fleet
    from testbed.toolchain import GoMissingError, ToolchainError

# Imported on first use: `python -m testbed.toolchain` must not find its own
# module already imported by this package (runpy warns about that).
_LAZY = {
    "ClusterError": "cluster",
    "ClusterStatus": "cluster",
    "ComponentStatus": "cluster",
    "FleetApplied": "cluster",
    "LocalCluster": "cluster",
    "Fleet": "fleet",
    "load_fleet": "fleet",
    "GoMissingError": "toolchain",
    "ToolchainError": "toolchain",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "ClusterError",
    "ClusterStatus",
    "ComponentStatus",
    "Fleet",
    "FleetApplied",
    "GoMissingError",
    "LocalCluster",
    "ToolchainError",
    "apply_fleet",
    "default_state_dir",
    "down",
    "kubeconfig_path",
    "load_fleet",
    "status",
    "up",
]


def default_state_dir() -> Path:
    """``$GPUMESH_STATE/dev``, else ``~/.local/state/gpumesh/dev``."""
    base = os.environ.get("GPUMESH_STATE")
    root = Path(base).expanduser() if base else Path.home() / ".local" / "state" / "gpumesh"
    return root / "dev"


def _dir(state_dir: Path | str | None) -> Path:
    return Path(state_dir).expanduser() if state_dir is not None else default_state_dir()


def up(fleet_path: Path | str | None = None, state_dir: Path | str | None = None) -> ClusterStatus:
    """Start (or reuse) the dev cluster; with a fleet file, apply its nodes and wait Ready.

    Without ``fleet_path`` the cluster has no nodes (fleet Nodes already there are kept).
    """
    from testbed.cluster import LocalCluster
    from testbed.fleet import load_fleet

    fleet = load_fleet(fleet_path) if fleet_path is not None else None  # fail before starting
    cluster = LocalCluster(_dir(state_dir))
    result = cluster.up()
    if fleet is not None:
        cluster.apply_fleet(fleet)
    return result


def apply_fleet(fleet_path: Path | str, state_dir: Path | str | None = None) -> FleetApplied:
    """Make the running cluster's fleet Nodes the file's: apply them, prune the rest."""
    from testbed.cluster import LocalCluster
    from testbed.fleet import load_fleet

    return LocalCluster(_dir(state_dir)).apply_fleet(load_fleet(fleet_path))


def down(state_dir: Path | str | None = None, *, purge: bool = False) -> None:
    """Stop every process of the cluster; ``purge`` also deletes its state directory."""
    from testbed.cluster import LocalCluster

    LocalCluster(_dir(state_dir)).down(purge=purge)


def status(state_dir: Path | str | None = None) -> ClusterStatus:
    """Which components run and answer their health checks."""
    from testbed.cluster import LocalCluster

    return LocalCluster(_dir(state_dir)).status()


def kubeconfig_path(state_dir: Path | str | None = None) -> Path:
    """The admin kubeconfig of the cluster (exists once ``up`` has run)."""
    return _dir(state_dir).resolve() / "kubeconfig"
