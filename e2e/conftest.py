"""Session fixture ``kube``: a real Kubernetes control plane for the e2e tests.

Which cluster, in order:
1. ``GPUMESH_E2E_KUBECONFIG`` names one (e.g. a kind cluster): used as is, never changed
   beyond what tests create.
2. With ``GPUMESH_E2E_REUSE_DEV=1``, a healthy dev cluster (``python -m testbed up``) in the
   default state dir: reused, and the example fleet's nodes are applied to it (nothing
   else is pruned). Opt-in because `make up` also runs an operator and agents there,
   which would compete with the ones the tests start.
3. Otherwise a fresh local cluster in a temporary state dir, stopped at the end of the
   session with no process left behind; its state (logs) is kept only if a test failed.

When a test that used the cluster fails, the tail of every component log is attached to
its report, since most e2e failures are explained by a controller's log.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from types import FrameType

import pytest
from kubernetes.config import new_client_from_config

from testbed import default_state_dir
from testbed.cluster import LocalCluster, tail
from testbed.fleet import load_fleet
from testbed.testing import KubeTarget
from testbed.toolchain import GoMissingError

KUBECONFIG_ENV = "GPUMESH_E2E_KUBECONFIG"
REUSE_DEV_ENV = "GPUMESH_E2E_REUSE_DEV"
FLEET_FILE = Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml"
LOG_TAIL_LINES = 40

_logs_dir: Path | None = None
_failed = False


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers here too, so the suite also runs outside this pyproject."""
    config.addinivalue_line(
        "markers", "e2e: needs a Kubernetes control plane (the local one is started if none)"
    )
    config.addinivalue_line(
        "markers", "after_all: runs after every other test (it reads what they left)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked after_all go last, in their collected order."""
    items.sort(key=lambda item: item.get_closest_marker("after_all") is not None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach component log tails to the report of a failed test that used ``kube``."""
    global _failed
    report = yield
    if report.failed and "kube" in getattr(item, "fixturenames", ()):
        _failed = True
        if _logs_dir is not None:
            for log in sorted(_logs_dir.glob("*.log")):
                report.sections.append(
                    (f"{log.stem} log (last {LOG_TAIL_LINES} lines)", tail(log, LOG_TAIL_LINES))
                )
    return report


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember e2e tests that skipped (a skip here would hide what was never run)."""
    if report.skipped and report.nodeid.startswith("e2e/"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """On the local control plane every e2e test runs: a skipped one fails the session.

    Against a cluster named by GPUMESH_E2E_KUBECONFIG, tests that need the simulated
    fleet say why they skip, and that is allowed.
    """
    if _skipped and not os.environ.get(KUBECONFIG_ENV) and exitstatus == 0:
        names = ", ".join(_skipped[:5]) + (" ..." if len(_skipped) > 5 else "")
        print(f"\nfailing the run: {len(_skipped)} e2e test(s) skipped: {names}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _teardown_on_sigterm() -> None:
    """Let `timeout`/CI's SIGTERM unwind like Ctrl-C, so fixture teardown still runs."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def interrupt(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, interrupt)


def _target(
    kubeconfig: Path, state_dir: Path | None, started: bool, with_fleet: bool
) -> KubeTarget:
    api = new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    fleet = load_fleet(FLEET_FILE) if with_fleet else None
    return KubeTarget(kubeconfig, api, state_dir, started, fleet)


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeTarget]:
    """The cluster under test (see the module docstring for which one)."""
    global _logs_dir, _failed
    external = os.environ.get(KUBECONFIG_ENV)
    if external:
        target = _target(Path(external), None, started=False, with_fleet=False)
        yield target
        target.api.close()  # type: ignore[no-untyped-call]
        return

    dev = LocalCluster(default_state_dir())
    if os.environ.get(REUSE_DEV_ENV) == "1" and dev.status().healthy:
        dev.apply_fleet(load_fleet(FLEET_FILE), prune=False)
        _logs_dir = dev.logs_dir
        target = _target(dev.kubeconfig, dev.state_dir, started=False, with_fleet=True)
        yield target
        target.api.close()  # type: ignore[no-untyped-call]
        return

    state_dir = Path(tempfile.mkdtemp(prefix="gpumesh-e2e-"))
    cluster = LocalCluster(state_dir, ephemeral=True)
    _teardown_on_sigterm()
    try:
        _logs_dir = cluster.logs_dir
        try:
            cluster.up()
            cluster.apply_fleet(load_fleet(FLEET_FILE))
        except GoMissingError as exc:
            # A missing toolchain is a broken setup, not a reason to pass without e2e.
            raise pytest.UsageError(f"no local control plane can be built: {exc}") from exc
        except BaseException:
            _failed = True  # keep the logs: the exception names the one to read
            raise
        target = _target(cluster.kubeconfig, state_dir, started=True, with_fleet=True)
        try:
            yield target
        finally:
            target.api.close()  # type: ignore[no-untyped-call]
    finally:
        cluster.down()
        if _failed:
            print(f"\ne2e cluster state and logs kept in {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
