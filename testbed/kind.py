"""The ``--kind`` path: the same test target on a machine that has Docker and kind.

It cannot run on the project's own machines (no Docker, and no way to fetch kind's node
image or the KubeRay chart), so it is kept deliberately small and is not exercised by CI:
create the cluster from ``e2e/kind-config.yaml``, install the KubeRay operator with the
helm binary from the toolchain, and hand back a kubeconfig for ``GPUMESH_E2E_KUBECONFIG``.
kind has no kwok, so fleet nodes are not simulated there.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Final

from testbed import toolchain, versions

KUBERAY_CHART_REPO: Final = "https://ray-project.github.io/kuberay-helm/"


def kind_up(config: Path, *, name: str = "gpumesh", kubeconfig: Path | None = None) -> Path:
    """Create a kind cluster and install KubeRay into it; returns the kubeconfig path."""
    kind = shutil.which("kind")
    if kind is None:
        raise toolchain.ToolchainError("`kind` is not on PATH (and it needs Docker)")
    out = kubeconfig or Path.cwd() / f".kind-{name}.kubeconfig"
    subprocess.run(
        [
            kind,
            "create",
            "cluster",
            "--name",
            name,
            "--config",
            str(config),
            "--kubeconfig",
            str(out),
        ],
        check=True,
    )
    helm = str(toolchain.ensure(["helm"], assets=False).path("helm"))
    env_kc = ["--kubeconfig", str(out)]
    subprocess.run(
        [helm, "repo", "add", "kuberay", KUBERAY_CHART_REPO, "--force-update"], check=True
    )
    subprocess.run(
        [
            helm,
            "upgrade",
            "--install",
            "kuberay-operator",
            "kuberay/kuberay-operator",
            "--version",
            versions.KUBERAY.removeprefix("v"),
            "--namespace",
            "kuberay-system",
            "--create-namespace",
            "--wait",
            *env_kc,
        ],
        check=True,
    )
    return out


def kind_down(*, name: str = "gpumesh") -> None:
    """Delete the kind cluster."""
    kind = shutil.which("kind")
    if kind is not None:
        subprocess.run([kind, "delete", "cluster", "--name", name], check=True)
