"""GPUCluster reconciliation at scale: N GPUClusters through gpumesh against N RayClusters.

One run starts an ephemeral local control plane (etcd, kube-apiserver, controller-manager,
scheduler, kwok, KubeRay) in its own temporary state directory, creates 1,000 kwok GPU
nodes (a mix of models, regions, suppliers and prices, 8 GPUs each) plus one head-capable
CPU node per region, and one GPUNode per node whose status is written through the status
subresource as a node agent would (Healthy, its GPUs, verification Passed): 1,000 agent
processes do not fit two cores, so the agents are simulated by their writes.

For each N the baseline applies N RayClusters directly, shaped as gpumesh renders them
(gpumesh's own renderer: one head pinned to a head node, one worker with one GPU pinned
to a node through its hostname), and times from the first create until every one is
Ready: HeadPodReady True and readyWorkerReplicas at the desired count. Then the operator
(``python -m gpumesh operator run``) gets N GPUClusters of the same shape, timed until
every one shows ``status.phase == Ready`` (which gpumesh computes from the same two
fields). Each phase runs in its own namespace, deleted (and waited for) afterwards. The
whole sequence runs in several rounds on the same cluster (the operator stopped for the
KubeRay-alone phases), and the verdict is the median of the rounds' own ratios: on two
shared cores one pair of phases can swing by a tenth either way.

In the first round, before the largest N, the latency from a GPUCluster's creation to its
RayCluster existing, at a paced 10 creations per second, from a watch on RayClusters (the
ADDED event).

Each side is observed through one watch: on RayClusters for KubeRay alone, on
GPUClusters for gpumesh.

Knobs (environment): ``BENCH_RECONCILE_SIZES`` (default ``100,1000``),
``BENCH_RECONCILE_PHASE_TIMEOUT`` (seconds, default 600), ``BENCH_RECONCILE_LATENCY``
(clusters in the paced run, default 200; 0 skips it), ``BENCH_RECONCILE_ROUNDS`` (default
5), ``BENCH_RECONCILE_STAGES=1`` (split each gpumesh cluster's time into stages, through a
second watch, on RayClusters, that only gpumesh's phases would pay for: diagnostic),
``BENCH_RECONCILE_PROFILE`` (a path: the first round's operator runs under cProfile, all
threads, and its stats are written there), ``BENCH_RECONCILE_KEEP=1`` keeps the state
directory (component and operator logs).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import inspect
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from bench.harness import (
    ListWatch,
    Report,
    Row,
    Stats,
    api_client,
    load,
    log,
    parallel,
    stop_process,
    untyped,
    wait_until,
)
from gpumesh.api.base import GROUP, VERSION
from gpumesh.api.gpucluster import PRIMARY_GROUP, GPUClusterSpec
from gpumesh.api.gpunode import GPUNodeStatus
from gpumesh.api.proof import gpus_fingerprint
from gpumesh.operator.render.raycluster import Owner, WorkerSlot, raycluster
from testbed import mesh
from testbed.cluster import LocalCluster
from testbed.fleet import FleetNode, Supplier, node_manifest
from testbed.ports import free_port

COMMAND = "python -m bench reconcile"
ROOT = Path(__file__).resolve().parent.parent
RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"
MERGE = "application/merge-patch+json"
PHASE_LABEL = "bench.gpumesh.io/phase"

GPU_NODES = int(os.environ.get("BENCH_RECONCILE_NODES", 1000))
NODES_PER_SUPPLIER = 20
GPUS_PER_NODE = 8
CREATE_THREADS = 8
LATENCY_RATE = 10.0  # GPUClusters created per second in the paced run
TARGET_OVERHEAD = 1.25
TARGET_P99_S = 2.0
RESYNC_SECONDS = "60"


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


SIZES = tuple(int(s) for s in os.environ.get("BENCH_RECONCILE_SIZES", "100,1000").split(","))
PHASE_TIMEOUT_S = float(_env_int("BENCH_RECONCILE_PHASE_TIMEOUT", 600))
ROUNDS = _env_int("BENCH_RECONCILE_ROUNDS", 5)
LATENCY_COUNT = _env_int("BENCH_RECONCILE_LATENCY", 200)
#: Split gpumesh's clusters' time into stages: a second watch (on RayClusters) that the
#: API server feeds and this process decodes, in gpumesh's phases only. Diagnostic, so off
#: by default: the verdict compares the two sides with the same observers (one watch each).
STAGES = os.environ.get("BENCH_RECONCILE_STAGES") == "1"


# --- the simulated fleet -----------------------------------------------------------------


@dataclass(frozen=True)
class GpuModel:
    """One kind of supplier machine: its GPU, its size and a typical price."""

    product: str
    selector: str  # what a renter writes in spec.workers.gpu.models
    slug: str
    memory_mib: int
    compute_capability: str
    cpu: str
    memory: str
    price: Decimal


MODELS = (
    GpuModel(
        "NVIDIA H100 80GB HBM3", "H100", "h100", 81559, "9.0", "192", "2000Gi", Decimal("2.49")
    ),
    GpuModel(
        "NVIDIA A100-SXM4-80GB", "A100 80GB", "a100", 81920, "8.0", "128", "1000Gi",
        Decimal("1.49"),
    ),
    GpuModel("NVIDIA L40S", "L40S", "l40s", 46068, "8.9", "64", "512Gi", Decimal("0.99")),
    GpuModel(
        "NVIDIA GeForce RTX 4090", "RTX 4090", "4090", 24564, "8.9", "32", "256Gi",
        Decimal("0.44"),
    ),
)  # fmt: skip
REGIONS = ("us-east", "us-west", "eu-west", "eu-north", "ap-south")
# All heads of a region land on its first head node (see the report notes), so each one
# is sized to hold every head of the run: 2 CPU and 8Gi per head by default.
HEAD_NODE = {"cpu": "4096", "memory": "16Ti", "pods": 2500}


@dataclass(frozen=True)
class SimNode:
    """A node of the simulated fleet, with what its GPUNode and renters need to know."""

    supplier: Supplier
    node: FleetNode
    model: GpuModel | None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def region(self) -> str:
        return self.supplier.region


def fleet(gpu_nodes: int = GPU_NODES) -> list[SimNode]:
    """``gpu_nodes`` GPU nodes from suppliers of 20 nodes each (one model and region per
    supplier, prices around the model's typical one), and one head node per region."""
    nodes: list[SimNode] = []
    for k in range(-(-gpu_nodes // NODES_PER_SUPPLIER)):
        model = MODELS[k % len(MODELS)]
        factor = Decimal("0.80") + Decimal((k * 7) % 40) / 100
        count = min(NODES_PER_SUPPLIER, gpu_nodes - k * NODES_PER_SUPPLIER)
        members = tuple(
            FleetNode.model_validate(
                {
                    "name": f"s{k:02d}-{model.slug}-{i:02d}",
                    "gpuModel": model.product,
                    "gpuCount": GPUS_PER_NODE,
                    "gpuMemoryMiB": model.memory_mib,
                    "computeCapability": model.compute_capability,
                    "cpu": model.cpu,
                    "memory": model.memory,
                }
            )
            for i in range(count)
        )
        supplier = Supplier.model_validate(
            {
                "name": f"supplier-{k:02d}",
                "region": REGIONS[k % len(REGIONS)],
                "pricePerGpuHour": str((model.price * factor).quantize(Decimal("0.01"))),
                "nodes": members,
            }
        )
        nodes += [SimNode(supplier, n, model) for n in members]
    for region in REGIONS:
        head = FleetNode.model_validate({"name": f"head-{region}-0", **HEAD_NODE})
        supplier = Supplier.model_validate(
            {
                "name": f"dc-{region}",
                "region": region,
                "pricePerGpuHour": "0",
                "headCapable": True,
                "nodes": (head,),
            }
        )
        nodes.append(SimNode(supplier, head, None))
    return nodes


def gpunode(sim: SimNode) -> dict[str, Any]:
    spec = {
        "supplier": sim.supplier.name,
        "region": sim.region,
        "pricePerGpuHour": str(sim.supplier.price_per_gpu_hour),
        "headCapable": sim.supplier.head_capable,
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GPUNode",
        "metadata": {"name": sim.name},
        "spec": spec,
    }


def agent_status(sim: SimNode, now: datetime) -> dict[str, Any]:
    """What a node agent on healthy, verified GPUs reports (validated by the API model)."""
    model = sim.model
    gpus = [
        {
            "index": i,
            "uuid": f"GPU-{uuid.UUID(hashlib.sha256(f'{sim.name}/{i}'.encode()).hexdigest()[:32])}",
            "model": model.product,
            "memoryMib": model.memory_mib,
            "computeCapability": model.compute_capability,
            "pciBusId": f"00000000:{0x18 + i:02X}:00.0",
            "health": "Healthy",
            "temperatureC": 41,
            "powerW": 88.0,
        }
        for i in range(sim.node.gpu_count)
        if model is not None
    ]
    status = {
        "health": "Healthy",
        "gpuCount": len(gpus),
        "gpus": gpus,
        "driverVersion": "570.124.06",
        "cudaVersion": "12.8",
        "heartbeatTime": now.isoformat(),
    }
    if model is not None and gpus:
        # Verified before the run, as the operator records it: its challenge answered and
        # judged Passed for exactly these GPUs, so nothing is challenged during the run.
        challenge = hashlib.sha256(f"bench/{sim.name}".encode()).hexdigest()
        status["challenge"] = {
            "id": challenge[:16],
            "seed": challenge,
            "issuedTime": now.isoformat(),
            "deadlineSeconds": 30.0,
            "gpus": [{"uuid": g["uuid"], "rows": 16, "inner": 16, "cols": 16} for g in gpus],
            "committedTime": now.isoformat(),
        }
        status["verification"] = {
            "result": "Passed",
            "reason": "Verified",
            "challengeId": challenge[:16],
            "checkedTime": now.isoformat(),
            "gpus": gpus_fingerprint(
                [(str(g["uuid"]), model.product, model.memory_mib) for g in gpus]
            ),
            "message": "bench: verified before the run",
        }
    if model is not None:
        status["gpuModel"] = model.product
    return GPUNodeStatus.model_validate(status).to_api()


# --- the cluster under test ----------------------------------------------------------------


def create_fleet(api: client.ApiClient, nodes: Sequence[SimNode]) -> None:
    """Nodes (kwok plays their kubelets), then GPUNodes with an agent-written status."""
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    parallel(
        lambda s: core.create_node(untyped(node_manifest(s.supplier, s.node))),
        nodes,
        CREATE_THREADS,
    )
    names = {s.name for s in nodes}
    wait_until(f"{len(nodes)} nodes Ready", lambda: ready_nodes(core) >= names, 300)

    def register(sim: SimNode) -> None:
        custom.create_cluster_custom_object(GROUP, VERSION, "gpunodes", gpunode(sim))
        status = agent_status(sim, datetime.now(UTC))
        custom.patch_cluster_custom_object_status(
            GROUP, VERSION, "gpunodes", sim.name, {"status": status}, _content_type=MERGE
        )

    parallel(register, nodes, CREATE_THREADS)


def settle_kwok(api: client.ApiClient, nodes: Sequence[SimNode]) -> float:
    """Wait until kwok really plays pods on the nodes; the seconds it took.

    kwok takes nodes over one at a time after they are created (a lease, then a listing of
    the pods on the node) and ignores their pods until then, well after the nodes show
    Ready. A pod pinned to every head node and to every 25th GPU node tells when that is
    over, so the first timed phase does not pay for it.
    """
    ns = "bench-probe"
    mesh.ensure_namespace(api, ns)
    core = client.CoreV1Api(api)
    sample = {s.name: s for s in [*nodes[::25], nodes[-1]]}
    sample |= {s.name: s for s in nodes if s.model is None}
    started = time.monotonic()

    def probe(name: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"probe-{name}", "namespace": ns},
            "spec": {
                "nodeName": name,
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "probe", "image": "registry.invalid/probe"}],
            },
        }
        core.create_namespaced_pod(ns, untyped(body))

    parallel(probe, sample, CREATE_THREADS)

    def all_ready() -> bool:
        pods: list[Any] = core.list_namespaced_pod(ns).items
        ready = [
            p
            for p in pods
            if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]
        return len(ready) == len(sample)

    wait_until("kwok to run a probe pod on every sampled node", all_ready, 600)
    took = time.monotonic() - started
    delete_namespace(api, ns)
    return took


def ready_nodes(core: Any) -> set[str]:
    return {
        n.metadata.name
        for n in core.list_node().items
        if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
    }


def delete_namespace(api: client.ApiClient, name: str, timeout: float = 900) -> float:
    """Delete a namespace and wait until it is gone; the seconds it took."""
    core = client.CoreV1Api(api)
    started = time.monotonic()
    with contextlib.suppress(ApiException):
        core.delete_namespace(name)

    def gone() -> bool:
        try:
            core.read_namespace(name)
        except ApiException as err:
            if err.status == 404:
                return True
            raise
        return False

    wait_until(f"namespace {name} deleted", gone, timeout, every=2.0)
    return time.monotonic() - started


# --- watching ------------------------------------------------------------------------------


Obj = Mapping[str, Any]


class Watcher(ListWatch):
    """Watches one namespaced kind; per name, when it was first seen and when ``done``
    first held. Times are ``time.monotonic()`` in this process."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        group: str,
        version: str,
        plural: str,
        done: Callable[[Obj], bool] | None = None,
    ) -> None:
        custom = client.CustomObjectsApi(api)
        super().__init__(
            custom.list_namespaced_custom_object, group, version, namespace, plural, name=plural
        )
        self.done = done
        self.seen: dict[str, float] = {}
        self.done_at: dict[str, float] = {}

    def observe(self, obj: Obj, now: float) -> None:
        name = obj["metadata"]["name"]
        self.seen.setdefault(name, now)
        if self.done is not None and name not in self.done_at and self.done(obj):
            self.done_at[name] = now

    def wait(self, names: set[str], deadline: float, *, seen: bool = False, label: str) -> bool:
        """Until every name is done (or seen); False at the deadline. Logs progress."""
        table = self.seen if seen else self.done_at
        next_log = time.monotonic() + 30
        with self._cond:
            while not names <= table.keys():
                now = time.monotonic()
                if now >= deadline:
                    return False
                if now >= next_log:
                    log(f"{label}: {len(names & table.keys())}/{len(names)}")
                    next_log = now + 30
                self._cond.wait(timeout=min(5.0, deadline - now))
        return True


def raycluster_ready(obj: Obj) -> bool:
    """KubeRay alone: head pod ready and every desired worker ready."""
    status = obj.get("status") or {}
    groups = (obj.get("spec") or {}).get("workerGroupSpecs") or []
    desired = sum(int(g.get("replicas") or 0) for g in groups)
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    ready = int(status.get("readyWorkerReplicas") or 0)
    return conditions.get("HeadPodReady") == "True" and ready >= desired


def gpucluster_ready(obj: Obj) -> bool:
    status = obj.get("status") or {}
    return bool(
        status.get("phase") == "Ready"
        and status.get("observedGeneration") == obj["metadata"].get("generation")
    )


# --- what is created ---------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One renter's ask: a head and one worker with one GPU of ``model``."""

    name: str
    model: GpuModel

    def spec(self) -> dict[str, Any]:
        return {"workers": {"gpu": {"models": [self.model.selector]}, "replicas": 1}}


def requests(n: int, prefix: str = "c") -> list[Request]:
    return [Request(f"{prefix}{i:04d}", MODELS[i % len(MODELS)]) for i in range(n)]


def gpucluster_body(req: Request) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GPUCluster",
        "metadata": {"name": req.name},
        "spec": req.spec(),
    }


def baseline_bodies(
    reqs: Sequence[Request], nodes: Sequence[SimNode], ns: str
) -> list[dict[str, Any]]:
    """The RayClusters gpumesh would render, placed by hand: each worker on its own node
    of the asked model, the head on the head node of that node's region."""
    by_model: dict[str, list[SimNode]] = {}
    for sim in nodes:
        if sim.model is not None:
            by_model.setdefault(sim.model.slug, []).append(sim)
    taken: dict[str, int] = {}
    bodies = []
    for req in reqs:
        pool = by_model[req.model.slug]
        k = taken.get(req.model.slug, 0)
        taken[req.model.slug] = k + 1
        bodies.append(baseline_manifest(req, pool[k % len(pool)], nodes, ns))
    return bodies


def baseline_manifest(
    req: Request, node: SimNode, nodes: Sequence[SimNode], ns: str
) -> dict[str, Any]:
    """gpumesh's rendering of ``req`` with its worker on ``node``, owned by nothing."""
    head = next(s.name for s in nodes if s.model is None and s.region == node.region)
    spec = GPUClusterSpec.model_validate(req.spec())
    owner = Owner(f"{GROUP}/{VERSION}", "GPUCluster", req.name, "none")
    manifest = raycluster(
        spec,
        [WorkerSlot(PRIMARY_GROUP, node.name, 1)],
        name=req.name,
        namespace=ns,
        owner=owner,
        head_node=head,
    )
    # Nothing owns these: an owner reference to a missing object is garbage.
    manifest["metadata"].pop("ownerReferences")
    manifest["metadata"]["labels"] = {PHASE_LABEL: "baseline"}
    return manifest


def warm_up_kuberay(api: client.ApiClient, nodes: Sequence[SimNode]) -> float:
    """RayClusters on every head node and a GPU node of each model in every region, to
    Ready and deleted, untimed: in the first minutes after 1,000 nodes appear, pods on
    some nodes (the head nodes, created last) wait minutes for kwok, which would be
    charged to whichever phase runs first."""
    ns = "bench-warmup-kuberay"
    picked: dict[tuple[str, str], SimNode] = {}
    for sim in nodes:
        if sim.model is not None:
            picked.setdefault((sim.region, sim.model.slug), sim)
    bodies = [
        baseline_manifest(Request(f"w-{sim.name}", sim.model), sim, nodes, ns)
        for sim in picked.values()
        if sim.model is not None
    ]
    result = timed_phase(
        api, "warm-up KubeRay", ns, (RAY_GROUP, RAY_VERSION, RAY_PLURAL), bodies, raycluster_ready
    )
    delete_namespace(api, ns)
    if not result.complete:
        raise RuntimeError(f"warm-up RayClusters not Ready in {PHASE_TIMEOUT_S:.0f} s")
    return result.total_s


def create_all(
    api: client.ApiClient, ns: str, plural: str, group: str, version: str, bodies: Sequence[Obj]
) -> dict[str, float]:
    """Create every object from ``CREATE_THREADS`` threads; name -> when its create was sent."""
    custom = client.CustomObjectsApi(api)
    sent: dict[str, float] = {}

    def create(body: Obj) -> None:
        sent[body["metadata"]["name"]] = time.monotonic()
        custom.create_namespaced_custom_object(group, version, ns, plural, dict(body))

    parallel(create, bodies, CREATE_THREADS)
    return sent


# --- phases --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU seconds per named process over a phase: where the two cores went."""

    pids: dict[str, int]

    def read(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    @staticmethod
    def spent(before: Mapping[str, float], after: Mapping[str, float]) -> str:
        used = {name: after[name] - before.get(name, 0.0) for name in after}
        parts = [
            f"{name} {seconds:.0f} s" for name, seconds in sorted(used.items()) if seconds >= 1
        ]
        return "CPU used in the phase: " + ", ".join(parts)


WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY", "DELETE")
READ_VERBS = ("GET", "LIST")
_REQUEST_LINE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def api_requests(api: client.ApiClient) -> Counter[str]:
    """The API server's count of requests so far, by verb, resource and subresource (its
    own ``apiserver_request_total``; watches left out): which requests a phase adds."""
    client_: Any = untyped(api)
    method, url, headers, body, post = client_.param_serialize(
        "GET", "/metrics", auth_settings=["BearerToken"]
    )
    text = client_.call_api(method, url, headers, body, post).read().decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        found = _REQUEST_LINE.match(line)
        if found is None:
            continue
        labels = dict(_LABEL.findall(found["labels"]))
        if labels.get("verb") not in WRITE_VERBS + READ_VERBS:
            continue
        what = labels.get("resource", "")
        if labels.get("subresource"):
            what += "/" + labels["subresource"]
        counts[f"{labels['verb']} {what}"] += int(float(found["value"]))
    return counts


def requests_spent(before: Counter[str], after: Counter[str], per: int) -> str:
    """The phase's requests per created object, writes and reads, the most frequent first."""

    def spent(verbs: tuple[str, ...]) -> str:
        made = [(after[k] - before[k], k) for k in after if k.split()[0] in verbs]
        parts = [f"{k} {n / per:.2f}" for n, k in sorted(made, reverse=True) if n / per >= 0.05]
        return ", ".join(parts) or "none"

    return (
        f"API requests in the phase, per cluster: writes {spent(WRITE_VERBS)}; "
        f"reads {spent(READ_VERBS)}"
    )


@dataclass
class PhaseResult:
    """All-Ready time of one phase, and each cluster's create -> Ready."""

    what: str
    n: int
    ready: int
    total_s: float
    per_cluster: Stats
    load_before: str
    load_after: str
    create_s: float
    cleanup_s: float = 0.0
    extra: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.ready == self.n


def timed_phase(
    api: client.ApiClient,
    what: str,
    ns: str,
    kind: tuple[str, str, str],
    bodies: Sequence[Obj],
    ready: Callable[[Obj], bool],
    cpu: CpuMeter | None = None,
    *,
    through_rayclusters: bool = False,
) -> PhaseResult:
    """Create ``bodies`` and time until every one is ``ready``. ``through_rayclusters``
    (gpumesh's phases) also watches the RayClusters the objects lead to, to split each
    cluster's time into its stages; that watch is one more for the API server to feed,
    and counts against gpumesh."""
    group, version, plural = kind
    mesh.ensure_namespace(api, ns)
    before = load()
    cpu_before = cpu.read() if cpu else {}
    requests_before = api_requests(api)
    log(f"{what}: creating {len(bodies)} {plural}")
    names = {b["metadata"]["name"] for b in bodies}
    with contextlib.ExitStack() as stack:
        watcher = stack.enter_context(Watcher(api, ns, group, version, plural, ready))
        rays = (
            stack.enter_context(
                Watcher(api, ns, RAY_GROUP, RAY_VERSION, RAY_PLURAL, raycluster_ready)
            )
            if through_rayclusters
            else None
        )
        started = time.monotonic()
        sent = create_all(api, ns, plural, group, version, bodies)
        create_s = time.monotonic() - started
        log(f"{what}: created in {create_s:.1f} s; waiting for Ready")
        watcher.wait(names, started + PHASE_TIMEOUT_S, label=f"{what} Ready")
        done = dict(watcher.done_at)
        stages = stage_times(sent, rays.seen, rays.done_at, done) if rays else None
    finished = max(done.values(), default=time.monotonic())
    per = tuple(done[n] - sent[n] for n in names if n in done)
    result = PhaseResult(
        what=what,
        n=len(names),
        ready=len(done),
        total_s=(finished if len(done) == len(names) else started + PHASE_TIMEOUT_S) - started,
        per_cluster=Stats(per or (float("nan"),)),
        load_before=before,
        load_after=load(),
        create_s=create_s,
    )
    if cpu is not None:
        result.extra.append(CpuMeter.spent(cpu_before, cpu.read()))
    result.extra.append(requests_spent(requests_before, api_requests(api), len(names)))
    if stages is not None:
        result.extra.append(stages)
    log(f"{what}: {result.ready}/{result.n} Ready in {result.total_s:.1f} s")
    return result


def stage_times(
    sent: Mapping[str, float],
    raycluster_seen: Mapping[str, float],
    raycluster_ready: Mapping[str, float],
    done: Mapping[str, float],
) -> str:
    """Each cluster's time split in three (seconds, p50 / max, from watches): create sent
    -> its RayCluster exists (admission and apply), -> KubeRay has it ready, -> the
    GPUCluster shows Ready (the operator sees it and writes); plus when the last
    RayCluster appeared after the first create."""

    def split(start: Mapping[str, float], end: Mapping[str, float]) -> str:
        spans = sorted(end[n] - start[n] for n in start if n in end)
        if not spans:
            return "none"
        return f"{statistics.median(spans):.2f} / {spans[-1]:.2f}"

    last = max(raycluster_seen.values(), default=math.nan) - min(sent.values(), default=math.nan)
    return (
        "stages, p50 / max s: create -> RayCluster "
        f"{split(sent, raycluster_seen)}, -> RayCluster ready "
        f"{split(raycluster_seen, raycluster_ready)}, -> GPUCluster Ready "
        f"{split(raycluster_ready, done)}; last RayCluster {last:.2f} s after the first create"
    )


# --- the operator --------------------------------------------------------------------------


class Operator:
    """``python -m gpumesh operator run`` against the bench cluster (optionally profiled)."""

    def __init__(self, kubeconfig: Path, logs: Path, profile: str | None) -> None:
        self.kubeconfig = kubeconfig
        self.logs = logs
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.liveness = free_port()
        self.log_path = logs / "operator.log"
        self.start_s = 0.0

    def argv(self) -> list[str]:
        argv = mesh.operator_argv(self.liveness)
        if _supports_metrics_port():
            argv.append("--metrics-port=0")  # several operators may share this machine
        if self.profile:
            # python -m gpumesh ARGS  ->  python -m bench.reconcile profile OUT ARGS
            argv = [sys.executable, "-m", "bench.reconcile", "profile", self.profile, *argv[3:]]
        return argv

    def __enter__(self) -> Operator:
        env = {
            "KUBECONFIG": str(self.kubeconfig),
            "GPUMESH_RESYNC_SECONDS": RESYNC_SECONDS,
            "PYTHONPATH": str(ROOT),
        }
        started = time.monotonic()
        self.proc, _ = mesh.spawn("operator", self.argv(), self.logs, env)
        url = f"http://127.0.0.1:{self.liveness}/healthz"
        try:
            wait_until("operator liveness endpoint", lambda: self._alive() and _http_ok(url), 180)
        except BaseException:
            self.__exit__()
            raise
        self.start_s = time.monotonic() - started
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited: see {self.log_path}")
        return True

    def __exit__(self, *_: object) -> None:
        stop_process(self.proc, grace=60 if self.profile else 20)


def _supports_metrics_port() -> bool:
    from gpumesh.operator import cli

    return "metrics_port" in inspect.signature(cli.run).parameters


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def warm_up(api: client.ApiClient) -> float:
    """One GPUCluster to Ready, created as soon as the operator answers its liveness probe,
    before anything is timed; the seconds that took (the cost of an operator start)."""
    ns = "bench-warmup"
    mesh.ensure_namespace(api, ns)
    body = gpucluster_body(Request("warmup", MODELS[0]))
    with Watcher(api, ns, GROUP, VERSION, "gpuclusters", gpucluster_ready) as watcher:
        started = time.monotonic()
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, ns, "gpuclusters", body
        )
        if not watcher.wait({"warmup"}, started + 900, label="warm-up"):
            raise RuntimeError("the warm-up GPUCluster did not become Ready in 900 s")
        took = watcher.done_at["warmup"] - started
    delete_namespace(api, ns)
    return took


def operator_log_summary(path: Path) -> str:
    """The errors the operator logged, most frequent first (kopf's per-handler success
    lines are off unless --verbose, so only trouble is counted)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    failed: Counter[str] = Counter()
    for m in re.finditer(r"(?:Handler|Timer) '(\w+)' failed with an exception[^:]*: (.*)", text):
        reason = m.group(2)
        if "being terminated" in text[m.end() : m.end() + 2000] and "(403)" in reason:
            reason = "403 namespace is being terminated"
        failed[f"{m.group(1)}: {reason[:60]}"] += 1
    retrying = False
    for line in text.splitlines():  # the work queue logs a failure, then its traceback
        if "failed; retrying" in line:
            retrying = True
        elif retrying and re.match(r"^\w+(Error|Exception)\b", line):
            failed[f"reconcile: {line[:60]}"] += 1
            retrying = False
    errors = "; ".join(f"{count}x {what}" for what, count in failed.most_common(4))
    return f"errors: {errors or 'none'}."


def lease_pace(kwok_log: Path, nodes: int) -> str:
    """Node leases kwok renewed per second, overall and in its slowest minute."""
    per_minute: Counter[str] = Counter()
    with contextlib.suppress(FileNotFoundError), kwok_log.open(errors="replace") as fh:
        for line in fh:
            if '"msg":"Syncing lease"' in line:
                m = re.search(r'"time":"[^T]*T(\d\d:\d\d)', line)
                if m:
                    per_minute[m.group(1)] += 1
    minutes = sorted(per_minute)[1:-1]  # the first and last minute are partial
    if not minutes:
        return "no lease renewals logged"
    rates = [per_minute[m] / 60 for m in minutes]
    return (
        f"kwok renewed {sum(rates) / len(rates):.0f} node leases/s on average (slowest "
        f"minute {min(rates):.0f}/s); {nodes} nodes at kwok's 10 s renew interval need "
        f"{nodes / 10:.0f}/s"
    )


def paced_latency(api: client.ApiClient, count: int) -> tuple[Stats, float]:
    """GPUClusters at LATENCY_RATE per second; creation -> RayCluster ADDED, per cluster."""
    ns = "bench-latency"
    mesh.ensure_namespace(api, ns)
    bodies = [gpucluster_body(r) for r in requests(count, prefix="l")]
    custom = client.CustomObjectsApi(api)
    sent: dict[str, float] = {}

    def create(body: Obj) -> None:
        sent[body["metadata"]["name"]] = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, "gpuclusters", dict(body))

    log(f"latency: {count} GPUClusters at {LATENCY_RATE:.0f}/s")
    with (
        Watcher(api, ns, RAY_GROUP, RAY_VERSION, RAY_PLURAL) as watcher,
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        started = time.monotonic()
        futures = []
        for i, body in enumerate(bodies):
            time.sleep(max(0.0, started + i / LATENCY_RATE - time.monotonic()))
            futures.append(pool.submit(create, body))
        for future in futures:
            future.result()
        achieved = count / (time.monotonic() - started)
        names = {b["metadata"]["name"] for b in bodies}
        watcher.wait(names, time.monotonic() + 120, seen=True, label="latency RayClusters")
        seen = dict(watcher.seen)
    latencies = tuple(seen[n] - sent[n] for n in names if n in seen)
    missing = count - len(latencies)
    if missing:
        log(f"latency: {missing} RayClusters never appeared within 120 s")
        latencies += (float("inf"),) * missing
    return Stats(latencies), achieved


# --- the run -------------------------------------------------------------------------------


@dataclass
class Outcome:
    baseline: dict[int, list[PhaseResult]] = field(default_factory=dict)
    """Each N's KubeRay-alone phase, one per round."""
    gpumesh: dict[int, list[PhaseResult]] = field(default_factory=dict)
    latency: Stats | None = None
    latency_rate: float = 0.0
    operator_log: str = ""
    kwok_leases: str = ""
    warm_up_s: float = 0.0
    setup_s: float = 0.0
    kwok_settle_s: float = 0.0
    kuberay_warm_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def measure(state_dir: Path, nodes: Sequence[SimNode], profile: str | None) -> Outcome:
    out = Outcome()
    cluster = LocalCluster(state_dir, ephemeral=True)
    logs = state_dir / "bench-logs"
    try:
        started = time.monotonic()
        cluster.up()
        api = api_client(cluster.kubeconfig)
        mesh.apply_crds(api)
        mesh.ensure_namespace(api, "gpumesh-system")
        log(f"creating {len(nodes)} nodes and GPUNodes")
        create_fleet(api, nodes)
        out.kwok_settle_s = settle_kwok(api, nodes)
        out.kuberay_warm_s = warm_up_kuberay(api, nodes)
        out.setup_s = time.monotonic() - started
        log(f"cluster and fleet ready in {out.setup_s:.0f} s")
        components = {c.name: c.pid for c in cluster.status().components if c.running}
        for round_ in range(ROUNDS):
            one_round(api, out, nodes, cluster.kubeconfig, components, logs, round_, profile)
        out.operator_log = operator_log_summary(logs / "operator.log")
        out.kwok_leases = lease_pace(Path(cluster.logs_dir) / "kwok.log", len(nodes))
        api.close()  # type: ignore[no-untyped-call]
    finally:
        cluster.down()
    return out


def one_round(
    api: client.ApiClient,
    out: Outcome,
    nodes: Sequence[SimNode],
    kubeconfig: Path,
    components: Mapping[str, int],
    logs: Path,
    round_: int,
    profile: str | None,
) -> None:
    """KubeRay alone for each N, then the operator started and gpumesh for each N.

    Each round runs both sides again, so a ratio rests on several pairs measured close
    together rather than on one pair a noisy moment can swing. The paced latency run
    happens in the first round only (before the largest N).
    """
    cpu = CpuMeter(dict(components))
    tag = f"round {round_ + 1}/{ROUNDS}"
    for n in SIZES:
        ns = f"bench-baseline-{n}-{round_}"
        base = timed_phase(
            api,
            f"{tag} KubeRay alone N={n}",
            ns,
            (RAY_GROUP, RAY_VERSION, RAY_PLURAL),
            baseline_bodies(requests(n), nodes, ns),
            raycluster_ready,
            cpu,
        )
        base.cleanup_s = delete_namespace(api, ns)
        out.baseline.setdefault(n, []).append(base)
    with Operator(kubeconfig, logs, profile if round_ == 0 else None) as operator:
        assert operator.proc is not None
        cpu = CpuMeter({**components, "gpumesh-operator": operator.proc.pid})
        warm_up_s = warm_up(api) + operator.start_s
        out.warm_up_s = max(out.warm_up_s, warm_up_s)
        log(f"operator up and first GPUCluster Ready in {warm_up_s:.0f} s")
        for i, n in enumerate(SIZES):
            ns = f"bench-gpumesh-{n}-{round_}"
            ours = timed_phase(
                api,
                f"{tag} gpumesh N={n}",
                ns,
                (GROUP, VERSION, "gpuclusters"),
                [gpucluster_body(r) for r in requests(n)],
                gpucluster_ready,
                cpu,
                through_rayclusters=STAGES,
            )
            ours.cleanup_s = delete_namespace(api, ns)
            out.gpumesh.setdefault(n, []).append(ours)
            # Before the largest run, whose backlog could still be draining after it.
            first = round_ == 0 and LATENCY_COUNT > 0
            if first and (i == len(SIZES) - 2 or len(SIZES) == 1):
                out.latency, out.latency_rate = paced_latency(api, LATENCY_COUNT)
                delete_namespace(api, "bench-latency")


def run() -> Report:
    nodes = fleet()
    state_dir = Path(tempfile.mkdtemp(prefix="gpumesh-bench-reconcile-"))
    keep = os.environ.get("BENCH_RECONCILE_KEEP") == "1"
    profile = os.environ.get("BENCH_RECONCILE_PROFILE") or None
    if profile:
        profile = str(Path(profile).resolve())
    load_start = load()
    try:
        out = measure(state_dir, nodes, profile)
    except BaseException:
        print(f"bench/reconcile: state and logs kept in {state_dir}", file=sys.stderr)
        raise
    if keep:
        print(f"bench/reconcile: state and logs kept in {state_dir}", file=sys.stderr)
    else:
        shutil.rmtree(state_dir, ignore_errors=True)
    return report(out, nodes, load_start)


def report(out: Outcome, nodes: Sequence[SimNode], load_start: str) -> Report:
    rep = Report("GPUCluster reconcile: gpumesh against KubeRay alone (kwok nodes)", COMMAND)
    for n, ours_runs in out.gpumesh.items():
        base_runs = out.baseline[n]
        ratio = paired_ratio(ours_runs, base_runs)
        complete = all(r.complete for r in (*ours_runs, *base_runs))
        timed_out = "" if complete else f" (TIMED OUT at {PHASE_TIMEOUT_S:.0f} s)"
        rep.rows.append(
            Row(
                f"all {n} Ready, total, {len(ours_runs)} rounds{timed_out}",
                _totals(ours_runs),
                _totals(base_runs),
                target=f"<= {TARGET_OVERHEAD:.2f}x",
                met=complete and ratio <= TARGET_OVERHEAD,
                ratio=ratio,
            )
        )
        ready = sum(r.ready for r in ours_runs), sum(r.ready for r in base_runs)
        rep.rows.append(
            Row(
                f"per cluster create -> Ready, N={n} ({ready[0]}/{ready[1]} of "
                f"{n * len(ours_runs)} Ready)",
                _pooled(ours_runs),
                _pooled(base_runs),
            )
        )
    if out.latency is not None:
        rep.rows.append(
            Row(
                f"GPUCluster create -> RayCluster exists, {len(out.latency.samples)} at "
                f"{out.latency_rate:.1f}/s",
                out.latency,
                target=f"p99 <= {TARGET_P99_S * 1e3:.0f} ms",
                met=out.latency.p99 <= TARGET_P99_S,
            )
        )
    gpu_nodes = sum(1 for s in nodes if s.model is not None)
    rep.notes += [
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), shared with other work; "
        f"load average (1/5/15 min) {load_start} at the start. Every component runs on it: "
        "etcd, kube-apiserver, controller-manager, scheduler, kwok, KubeRay v1.6.1, the "
        "operator and this benchmark.",
        f"Fleet: {gpu_nodes} kwok GPU nodes with {GPUS_PER_NODE} `nvidia.com/gpu` each "
        f"({', '.join(m.slug for m in MODELS)}; {len(REGIONS)} regions; "
        f"{-(-gpu_nodes // NODES_PER_SUPPLIER)} suppliers with prices around each model's) "
        f"and {len(nodes) - gpu_nodes} head-capable CPU nodes, one per region. Set up in "
        f"{out.setup_s:.0f} s, of which {out.kwok_settle_s:.0f} s waiting for kwok to take "
        "the nodes over (probe pods on a sample of nodes Ready) and "
        f"{out.kuberay_warm_s:.0f} s for untimed warm-up RayClusters on every head node "
        "(pods on the head nodes wait minutes for kwok right after the nodes are created).",
        "Simulated: pods run nowhere (kwok marks them Running and Ready); node agents are "
        "simulated by writing each GPUNode's status through the status subresource once "
        "(Healthy, 8 GPUs, verification Passed), since 1,000 agent processes do not fit "
        "2 cores.",
        "Shape: each cluster is a head (2 CPU, 8Gi) and one worker with 1 GPU, asking for one "
        "of the models. The baseline applies the RayCluster gpumesh's renderer makes, placed "
        "by hand (each worker on its own node, head on the region's head node); gpumesh "
        "places them itself. Ready is the same for both: HeadPodReady and every desired "
        "worker ready (gpumesh: `status.phase == Ready`, computed from those fields).",
        "Total = first create sent -> last cluster seen Ready through a watch; objects are "
        f"created from {CREATE_THREADS} threads. The operator runs with "
        f"GPUMESH_RESYNC_SECONDS={RESYNC_SECONDS}; it is not running during the KubeRay-alone "
        "phases. Each round: KubeRay alone for each N, then the operator started (warmed up "
        "with one GPUCluster) and gpumesh for each N, then the operator stopped; the paced "
        f"latency run comes before the largest N of the first round. {ROUNDS} rounds: the "
        "table's p50 is the median round; the ratio (and the verdict) is the median of the "
        "rounds' own ratios, each pair measured minutes apart.",
        "Head nodes are sized for every head of the run: the operator puts all heads of a "
        "region on its first head node (head CPU and memory of other gpumesh clusters are "
        "not counted), so realistically sized head nodes would leave heads Pending.",
    ]
    for n, ours_runs in out.gpumesh.items():
        ratios = ", ".join(
            f"{o.total_s / b.total_s:.2f}x" for o, b in zip(ours_runs, out.baseline[n], strict=True)
        )
        medians = _totals(ours_runs).p50 / _totals(out.baseline[n]).p50
        rep.notes.append(
            f"N={n}, ratio of each round (gpumesh / KubeRay alone): {ratios}; their median "
            f"{paired_ratio(ours_runs, out.baseline[n]):.2f}x (the verdict); ratio of the "
            f"median totals {medians:.2f}x."
        )
        for round_, (alone, with_us) in enumerate(
            zip(out.baseline[n], ours_runs, strict=True), start=1
        ):
            rep.notes.append(
                f"N={n}, round {round_}: KubeRay alone {alone.total_s:.1f} s ({alone.ready}/{n} "
                f"Ready; creates took {alone.create_s:.1f} s; load {alone.load_before} -> "
                f"{alone.load_after}), gpumesh {with_us.total_s:.1f} s ({with_us.ready}/{n} Ready; "
                f"creates took {with_us.create_s:.1f} s; load {with_us.load_before} -> "
                f"{with_us.load_after}); ratio {with_us.total_s / alone.total_s:.2f}x. Namespace "
                f"deletion took {alone.cleanup_s:.0f} s / {with_us.cleanup_s:.0f} s. "
                + " ".join(f"KubeRay alone: {e}." for e in alone.extra)
                + " "
                + " ".join(f"gpumesh: {e}." for e in with_us.extra)
            )
    if out.latency is not None:
        s = out.latency
        rep.notes.append(
            f"Latency: {len(s.samples)} GPUClusters at {out.latency_rate:.1f}/s (target "
            f"{LATENCY_RATE:.0f}/s) from create sent to the RayCluster's ADDED event: p50 "
            f"{s.p50:.3f} s, p95 {s.p95:.3f} s, p99 {s.p99:.3f} s, max {max(s.samples):.3f} s."
        )
    rep.notes += [
        f"Operator start: {out.warm_up_s:.0f} s from launch until a first GPUCluster, created "
        "as soon as the liveness probe answered, was Ready (not part of any timed phase).",
        f"Operator log over the run: {out.operator_log}",
        f"Control plane: {out.kwok_leases}. Load at the end: {load()}.",
    ]
    return rep


def paired_ratio(ours: Sequence[PhaseResult], baseline: Sequence[PhaseResult]) -> float:
    """The median of each round's gpumesh / KubeRay-alone ratio (the verdict).

    Each round's two phases run minutes apart on the same cluster, so their ratio cancels
    the slower drift of a shared machine; the median drops one round a burst of other
    work swung.
    """
    return statistics.median(o.total_s / b.total_s for o, b in zip(ours, baseline, strict=True))


def _totals(runs: Sequence[PhaseResult]) -> Stats:
    """Each round's all-Ready time: p50 is the median round, p99 the worst."""
    return Stats(tuple(r.total_s for r in runs))


def _pooled(runs: Sequence[PhaseResult]) -> Stats:
    samples = tuple(x for r in runs for x in r.per_cluster.samples if x == x)  # no NaN
    return Stats(samples or (float("nan"),))


# --- profiling launcher ----------------------------------------------------------------------


def profile_main(out: str, argv: list[str]) -> None:
    """Run ``gpumesh ARGV`` with cProfile in the main thread and in every thread started
    after it (kopf's handler pool, the reconcile work queue); merged stats go to ``out``."""
    import cProfile
    import pstats

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    original = threading.Thread.run

    def run_profiled(self: threading.Thread) -> None:
        prof = cProfile.Profile()
        with lock:
            profiles.append(prof)
        prof.runcall(original, self)

    threading.Thread.run = run_profiled  # type: ignore[method-assign]
    main = cProfile.Profile()
    sys.argv = ["gpumesh", *argv]
    from gpumesh.cli import app

    try:
        main.runcall(app)
    except SystemExit:
        pass
    finally:
        stats = pstats.Stats(main)
        with lock:
            for prof in profiles:
                with contextlib.suppress(TypeError):  # a profiler that never ran
                    stats.add(prof)
        stats.dump_stats(out)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "profile":
        profile_main(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(
            f"usage: {sys.argv[0]} profile OUT GPUMESH-ARGS... (or: python -m bench reconcile)"
        )
