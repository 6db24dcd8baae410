"""The Helm charts render and the real API server accepts every object they make.

helm and kubectl are the pinned binaries from the toolchain; `kubectl apply
--dry-run=server` runs admission and schema validation without creating anything.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed import mesh, toolchain
from testbed.testing import KubeTarget

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SUPPLIER_VALUES = ["--set", "supplier=acme-dc,region=eu-west,pricePerGpuHour=2.10"]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(toolchain.binary_path("helm")), *args], capture_output=True, text=True, check=False
    )


def server_dry_run(kube: KubeTarget, manifests: str) -> None:
    applied = subprocess.run(
        [
            str(toolchain.binary_path("kubectl")),
            f"--kubeconfig={kube.kubeconfig}",
            "apply",
            "--dry-run=server",
            "--server-side",
            "--force-conflicts",  # the charts may be installed already (helm owns the fields)
            "--field-manager=gpumesh-e2e",
            "-f",
            "-",
        ],
        input=manifests,
        capture_output=True,
        text=True,
        check=False,
    )
    assert applied.returncode == 0, applied.stderr


@pytest.fixture(scope="module")
def namespace(kube: KubeTarget) -> str:
    mesh.ensure_namespace(kube.api, "gpumesh-system")
    return "gpumesh-system"


def test_charts_pass_helm_lint() -> None:
    linted = helm(
        "lint",
        str(ROOT / "charts/gpumesh-operator"),
        str(ROOT / "charts/gpumesh-supplier"),
        *SUPPLIER_VALUES,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_operator_chart_is_accepted_by_the_api_server(kube: KubeTarget, namespace: str) -> None:
    rendered = helm(
        "template",
        "gpumesh",
        str(ROOT / "charts/gpumesh-operator"),
        "-n",
        namespace,
        "--include-crds",
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "kind: Deployment" in rendered.stdout
    server_dry_run(kube, rendered.stdout)


def test_supplier_chart_is_accepted_by_the_api_server(kube: KubeTarget, namespace: str) -> None:
    rendered = helm(
        "template",
        "acme",
        str(ROOT / "charts/gpumesh-supplier"),
        "-n",
        namespace,
        *SUPPLIER_VALUES,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "kind: DaemonSet" in rendered.stdout
    server_dry_run(kube, rendered.stdout)


def test_supplier_chart_refuses_a_price_that_is_not_a_decimal_string() -> None:
    rendered = helm(
        "template",
        "acme",
        str(ROOT / "charts/gpumesh-supplier"),
        "--set",
        "supplier=acme-dc,region=eu-west,pricePerGpuHour=cheap",
    )
    assert rendered.returncode != 0
    assert "pricePerGpuHour must be a decimal string" in rendered.stderr
