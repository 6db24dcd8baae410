"""The gpumesh side of the local mesh: CRDs, the operator, one node agent per fleet node.

`python -m testbed up` and the e2e fixtures both use these, so what a newcomer plays with is
what the tests prove. Processes run the shipped programs (`python -m gpumesh ...`), log
into the state directory and are recorded there so `python -m testbed down` stops them from
any shell.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpumesh import crdgen
from gpumesh.api.base import GROUP, VERSION
from testbed.fleet import FleetNode, Supplier

APPLY = "application/apply-patch+yaml"
FIELD_MANAGER = "gpumesh-dev"
RECORD = "mesh-processes.json"


@dataclass
class MeshProcess:
    """A gpumesh process started for the local mesh."""

    name: str
    pid: int
    log: str
    fingerprint: str = ""
    """What it was started for (for an agent: its node as the fleet file describes it)."""

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        return state != "Z"


def apply_crds(api: client.ApiClient, timeout: float = 60.0) -> None:
    """Install gpumesh's CRDs server-side and wait until the API serves them."""
    ext = client.ApiextensionsV1Api(api)
    for crd in crdgen.all_crds():
        ext.patch_custom_resource_definition(
            crd["metadata"]["name"],
            crd,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY,
        )
    deadline = time.monotonic() + timeout
    for crd in crdgen.all_crds():
        name = crd["metadata"]["name"]
        while not _established(ext, name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established after {timeout:.0f}s")
            time.sleep(0.2)


def ensure_namespace(api: client.ApiClient, name: str) -> None:
    core = client.CoreV1Api(api)
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    core.patch_namespace(name, body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY)


def _established(ext: Any, name: str) -> bool:
    try:
        crd = ext.read_custom_resource_definition(name)
    except ApiException:
        return False
    return any(
        c.type == "Established" and c.status == "True" for c in (crd.status.conditions or [])
    )


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpumesh", *args]


def spawn(
    name: str,
    argv: Sequence[str],
    logs: Path,
    env: dict[str, str] | None = None,
    fingerprint: str = "",
) -> tuple[subprocess.Popen[bytes], MeshProcess]:
    """Start one process in its own session, output to ``logs/NAME.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
    return proc, MeshProcess(name, proc.pid, str(log_path), fingerprint)


DEV_OPERATOR_ENV: Final = {
    # The fleet's agents compute their proofs with NumPy: products of 64 x ~4000 x 64, a
    # few seconds for an 8-GPU node while a dozen agents share two cores.
    "GPUMESH_PROOF_SIDE": "64",
    "GPUMESH_PROOF_SCALE": "0.0001",
    "GPUMESH_PROOF_ALLOWANCE_SECONDS": "20",
    "GPUMESH_PROOF_OPEN_SECONDS": "10",
    "GPUMESH_PROOF_RETRY_SECONDS": "60",
}
"""What the dev operator runs with, besides its kubeconfig."""


def operator_argv(liveness_port: int) -> list[str]:
    """The operator as the chart runs it, on loopback; metrics off (several replicas and
    operators share this machine; a later ``--metrics-port`` wins)."""
    return _python(
        "operator",
        "run",
        "--text-logs",
        f"--liveness=http://127.0.0.1:{liveness_port}/healthz",
        "--metrics-port=0",
    )


def agent_argv(
    fleet_file: Path, supplier: Supplier, node: FleetNode, kubeconfig: Path, interval: float
) -> list[str]:
    """One node's agent playing the fleet file's GPUs (and faults) through fake NVML."""
    return _python(
        "agent",
        "run",
        f"--node={node.name}",
        f"--kubeconfig={kubeconfig}",
        f"--fake-nvml={fleet_file}",
        f"--interval={interval}",
        "--metrics-host=127.0.0.1",
        "--metrics-port=0",
        "--lease-renew=5",
    )


AGENT_PREFIX = "agent-"


def agent_name(node: str) -> str:
    """The recorded name of a node's agent process."""
    return AGENT_PREFIX + node


@dataclass(frozen=True)
class AgentPlan:
    """How the running agents become the fleet's: which stop, which start."""

    stop: tuple[MeshProcess, ...]
    start: tuple[str, ...]
    """Agent names to start, in fleet order."""


def agent_fingerprint(supplier: Supplier, node: FleetNode, *settings: object) -> str:
    """What an agent plays: its node and supplier as the fleet describes them, and the
    agent's settings. The same node in another fleet file keeps its agent running."""
    described = [
        supplier.model_dump(mode="json", exclude={"nodes"}),
        node.model_dump(mode="json"),
        [str(s) for s in settings],
    ]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def plan_agents(desired: Mapping[str, str], recorded: Sequence[MeshProcess]) -> AgentPlan:
    """One agent per fleet node, playing what the fleet file says of it now.

    ``desired`` maps agent names to their fingerprints. An agent whose node left the fleet
    stops; one whose node changed (re-scripted GPUs or faults) restarts; one that died
    starts again; one that runs as wanted is left alone.
    """
    alive = {p.name: p for p in _running_agents(recorded)}
    stop = [p for name, p in alive.items() if desired.get(name) != p.fingerprint]
    stopping = {p.name for p in stop}
    start = [name for name in desired if name not in alive or name in stopping]
    return AgentPlan(tuple(stop), tuple(start))


def departed(wanted: Collection[str], recorded: Sequence[MeshProcess]) -> list[MeshProcess]:
    """Running agents whose node is no longer in the fleet (``wanted``: agent names)."""
    return [p for p in _running_agents(recorded) if p.name not in wanted]


def _running_agents(recorded: Sequence[MeshProcess]) -> list[MeshProcess]:
    return [p for p in recorded if p.name.startswith(AGENT_PREFIX) and p.alive()]


def delete_gpunodes(api: client.ApiClient, names: Iterable[str]) -> None:
    """Delete GPUNodes by name; ones already gone are fine."""
    custom = client.CustomObjectsApi(api)
    for name in names:
        try:
            custom.delete_cluster_custom_object(GROUP, VERSION, "gpunodes", name)
        except ApiException as err:
            if err.status != 404:
                raise


def record(state_dir: Path, processes: Sequence[MeshProcess]) -> None:
    """Add processes to the state directory's record, for `python -m testbed down`; a process
    recorded under the same name before is replaced."""
    path = state_dir / RECORD
    names = {p.name for p in processes}
    known = [p for p in load_record(state_dir) if p.alive() and p.name not in names]
    known += list(processes)
    path.write_text(json.dumps([asdict(p) for p in known], indent=2))


def load_record(state_dir: Path) -> list[MeshProcess]:
    try:
        raw = json.loads((state_dir / RECORD).read_text())
    except FileNotFoundError:
        return []
    known = {f.name for f in fields(MeshProcess)}  # a record from another version of gpumesh
    return [MeshProcess(**{k: v for k, v in p.items() if k in known}) for p in raw]


def stop(processes: Iterable[MeshProcess], grace: float = 10.0) -> None:
    """SIGTERM each process group, then SIGKILL what is left after ``grace`` seconds."""
    procs = [p for p in processes if p.alive()]
    for p in procs:
        _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in procs:
        if p.alive():
            _signal_group(p.pid, signal.SIGKILL)


def stop_recorded(state_dir: Path) -> None:
    stop(load_record(state_dir))
    (state_dir / RECORD).unlink(missing_ok=True)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
