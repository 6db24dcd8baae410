"""kube-scheduler as a reference for the placement engine: GPU pods bound per second.

Issue #5 asks how many GPU pods per second kube-scheduler binds for the work that
bench/placement.py times the engine on. Both sides get the same requests against the same
inventory in one run:

1. Inventory: operator/placement/synthetic.py at 1,000 nodes (seed 7), the placement
   benchmark's model, region, supplier, price and health mix. Requests: drawn as that
   benchmark draws them (``random_spec``); the engine places them one after another
   against one ledger, each decision taking its GPUs, CPU and memory, and the requests it
   places are kept until they make about 1,000 pods (workers plus heads). Requests it
   cannot place are left out on both sides: a pod nobody can bind measures nothing.
2. Engine: that sequence timed in memory, per decision, on one core.
3. kube-scheduler: an ephemeral local control plane (testbed.cluster), one kwok
   Node per offer (free GPUs as allocatable ``nvidia.com/gpu``, free CPU and memory as
   allocatable; labels for GPU product, region, supplier, verification, reputation, price
   and health; cordons and taints as Kubernetes has them), and one pod per worker and head
   whose required node affinity states the request's hard constraints. A self-check
   proves, node by node, that each pod's affinity and tolerations admit exactly the nodes
   the engine's filters admit.

Rounds, each in the same namespace, the pods force-deleted afterwards to free the GPUs:

- stream: the dev cluster's own scheduler (its configuration untouched) while this process
  creates the pods from 8 threads; first create sent -> last binding seen, and each pod's
  create -> bound (the issue's figure);
- backlog: the pods created first for a scheduler that is not running yet, then a second
  kube-scheduler (same binary and configuration, its own ``schedulerName``) started to
  drain them: its binding rate, free of this process's creation pace; once at the dev
  cluster's client QPS and once with QPS raised;
- pinned: the engine's own decisions as gpumesh renders them (each pod pinned to its node
  by hostname), drained the same way at the dev cluster's QPS: what kube-scheduler still
  costs on gpumesh's path, where the search is already done.

Bindings are timed by a pod watch in this process; the scheduler's own ``Scheduled``
events (microsecond ``eventTime``) cross-check each round's rate.

Knobs (environment): ``BENCH_SCHEDULER_NODES`` (default 1000), ``BENCH_SCHEDULER_PODS``
(default 1000), ``BENCH_SCHEDULER_RAISED_QPS`` (default 1000; burst is twice that),
``BENCH_SCHEDULER_KEEP=1`` keeps the state directory (component logs).
"""

from __future__ import annotations

import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from bench.harness import (
    ListWatch,
    Report,
    Row,
    Stats,
    api_client,
    consume,
    load,
    log,
    parallel,
    raw_json,
    stop_process,
    untyped,
    wait_until,
)
from bench.placement import random_spec
from gpumesh.api.gpucluster import GPUClusterSpec
from gpumesh.api.gpunode import ACCEPTING_HEALTH
from gpumesh.api.nodes import (
    LABEL_HEAD_CAPABLE,
    LABEL_PRODUCT,
    LABEL_REGION,
    LABEL_SUPPLIER,
    LABEL_VERIFIED,
    TAINT_KEY,
)
from gpumesh.operator.placement import Decision, InventoryIndex, Ledger, NodeOffer, plan_cluster
from gpumesh.operator.placement.matching import GroupConstraints, group_constraints
from gpumesh.operator.placement.quantity import cpu_millicores, memory_bytes
from gpumesh.operator.placement.synthetic import synthetic_inventory
from gpumesh.operator.render import labels as names
from testbed import mesh, toolchain
from testbed.cluster import LocalCluster, _die_with
from testbed.fleet import FleetNode, Supplier, gfd_product_label, node_manifest
from testbed.ports import free_port

COMMAND = "python -m bench scheduler"
NODES = int(os.environ.get("BENCH_SCHEDULER_NODES", 1000))
TARGET_PODS = int(os.environ.get("BENCH_SCHEDULER_PODS", 1000))
RAISED_QPS = float(os.environ.get("BENCH_SCHEDULER_RAISED_QPS", 1000))
SEED = 7
REQUEST_SEED = 11
ENGINE_PASSES = 20
CREATE_THREADS = 8
NAMESPACE = "bench-scheduler"
#: A round ends when every pod is bound; or, once every pod is bound or marked
#: Unschedulable, after QUIET_S without a new binding; or after STALL_S without one.
QUIET_S = 5.0
STALL_S = 30.0
ROUND_CAP_S = 300.0

# Node labels for the constraints GFD and gpumesh's own labels do not carry yet. The node
# agent would write them from the GPUNode; here they mirror the offers directly.
LABEL_HEALTH = "gpumesh.io/health"
LABEL_REPUTATION = "gpumesh.io/reputation-percent"
LABEL_PRICE = "gpumesh.io/price-cents-per-gpu-hour"
ROUND_LABEL = "bench.gpumesh.io/round"
UNHEALTHY_TAINT = TAINT_KEY  # what the node agent sets (Unhealthy, Lost)
FOREIGN_TAINT = "bench.gpumesh.io/foreign"  # stands in for a taint nobody tolerates
TAINTED_HEALTH = frozenset({"Unhealthy", "Lost"})

Obj = dict[str, Any]


# --- requests and the engine -------------------------------------------------------------


@dataclass(frozen=True)
class Placed:
    """A request the engine placed, and the decision it made for it."""

    name: str
    spec: GPUClusterSpec
    decision: Decision

    @property
    def pods(self) -> int:
        return self.decision.workers + 1


def select_requests(index: InventoryIndex, target_pods: int) -> tuple[list[Placed], Counter[str]]:
    """Requests the engine places in sequence, until they make ``target_pods`` pods; with
    how many drawn requests it turned down, by reason."""
    rng = random.Random(REQUEST_SEED)
    ledger = Ledger()
    placed: list[Placed] = []
    refused: Counter[str] = Counter()
    pods = 0
    for i in range(100 * target_pods):
        if pods >= target_pods:
            break
        spec = random_spec(rng)
        decision = plan_cluster(spec, index, ledger, explain=False)
        if not decision.ok:
            refused[decision.reason] += 1
            continue
        commit(ledger, decision)
        placed.append(Placed(f"r{i:04d}", spec, decision))
        pods += placed[-1].pods
    return placed, refused


def commit(ledger: Ledger, decision: Decision) -> None:
    """Take what a decision holds, as the admission pass does."""
    for held in decision.usage:
        ledger.take(held.node, held.gpus, held.cpu_millicores, held.memory_bytes)


@dataclass(frozen=True)
class EngineResult:
    per_decision: Stats
    per_pod: Stats  # each pod: the decision time of its request
    pass_s: float  # mean time of one pass over every request
    passes: int


def time_engine(index: InventoryIndex, requests: Sequence[Placed]) -> EngineResult:
    """The same sequence of decisions, each committed, timed; ``ENGINE_PASSES`` passes after
    two untimed ones, each from an empty ledger. Every pass must decide as the first did."""
    per_decision: list[float] = []
    per_pod: list[float] = []
    totals: list[float] = []
    for n in range(ENGINE_PASSES + 2):
        ledger = Ledger()
        times = []
        for req in requests:
            started = time.perf_counter()
            decision = plan_cluster(req.spec, index, ledger)
            commit(ledger, decision)
            times.append(time.perf_counter() - started)
            same = (decision.assignments, decision.head_node) == (
                req.decision.assignments,
                req.decision.head_node,
            )
            if not same:
                raise RuntimeError(f"engine decided {req.name} differently on pass {n}")
        if n >= 2:
            per_decision += times
            per_pod += [t for t, req in zip(times, requests, strict=True) for _ in range(req.pods)]
            totals.append(sum(times))
    return EngineResult(
        Stats(tuple(per_decision)), Stats(tuple(per_pod)), sum(totals) / len(totals), len(totals)
    )


# --- the same inventory as kwok Nodes ----------------------------------------------------


def price_cents(price: Decimal) -> int:
    return int((price * 100).to_integral_value(ROUND_FLOOR))


def reputation_percent(reputation: float) -> int:
    return round(reputation * 100)


def node_body(offer: NodeOffer) -> Obj:
    """The offer as a kwok Node: the fleet's labels plus what the constraints need."""
    major, minor = offer.compute_capability
    node = FleetNode.model_validate(
        {
            "name": offer.name,
            "gpuModel": offer.gpu_model,
            "gpuCount": offer.gpus_total,
            "gpuMemoryMiB": offer.gpu_memory_mib,
            "computeCapability": f"{major}.{minor}",
            "cpu": f"{offer.cpu_free_millicores}m",
            "memory": str(offer.memory_free_bytes),
        }
    )
    supplier = Supplier.model_validate(
        {
            "name": offer.supplier,
            "region": offer.region,
            "pricePerGpuHour": str(offer.price_per_gpu_hour),
            "verified": offer.verified,
            "headCapable": offer.head_capable,
            "nodes": (node,),
        }
    )
    body = node_manifest(supplier, node)
    body["metadata"]["labels"] |= {
        LABEL_HEALTH: offer.health,
        LABEL_REPUTATION: str(reputation_percent(offer.reputation)),
        LABEL_PRICE: str(price_cents(offer.price_per_gpu_hour)),
    }
    # The synthetic offer's free GPUs are what other pods left: allocatable says the same.
    body["status"]["allocatable"][names.GPU_RESOURCE] = str(offer.gpus_free)
    taints = []
    if offer.health in TAINTED_HEALTH:
        taints.append({"key": UNHEALTHY_TAINT, "value": "true", "effect": "NoSchedule"})
    if offer.tainted:
        taints.append({"key": FOREIGN_TAINT, "value": "true", "effect": "NoSchedule"})
    body["spec"] = {"unschedulable": offer.cordoned, "taints": taints}
    return body


# --- the same requests as pods -----------------------------------------------------------


def requirement(key: str, operator: str, values: Iterable[str]) -> Obj:
    return {"key": key, "operator": operator, "values": sorted(values)}


def worker_affinity(cons: GroupConstraints, products: Iterable[str]) -> list[Obj]:
    """A worker group's hard constraints as required node affinity, as gpumesh would write
    them if kube-scheduler did the search (the GPU selector becomes the inventory's
    products it accepts)."""
    exprs = [
        requirement(LABEL_HEALTH, "In", ACCEPTING_HEALTH),
        requirement(LABEL_PRODUCT, "In", products),
    ]
    if cons.regions is not None:
        exprs.append(requirement(LABEL_REGION, "In", cons.regions))
    if cons.suppliers is not None:
        exprs.append(requirement(LABEL_SUPPLIER, "In", cons.suppliers))
    if cons.verified_only:
        exprs.append(requirement(LABEL_VERIFIED, "In", ["true"]))
    if cons.min_reputation is not None:
        least = math.ceil(round(cons.min_reputation * 100, 6))
        exprs.append(requirement(LABEL_REPUTATION, "Gt", [str(least - 1)]))
    if cons.max_price is not None:
        exprs.append(requirement(LABEL_PRICE, "Lt", [str(price_cents(cons.max_price) + 1)]))
    return exprs


def head_affinity(spec: GPUClusterSpec) -> list[Obj]:
    exprs = [
        requirement(LABEL_HEALTH, "In", ACCEPTING_HEALTH),
        requirement(LABEL_HEAD_CAPABLE, "In", ["true"]),
        requirement(LABEL_VERIFIED, "In", ["true"]),
    ]
    return exprs + [requirement(k, "In", [v]) for k, v in spec.head.node_selector.items()]


def pod_body(
    name: str,
    round_name: str,
    scheduler: str,
    resources: Mapping[str, str],
    *,
    affinity: list[Obj] | None = None,
    node: str | None = None,
) -> Obj:
    """A worker or head pod; constrained by ``affinity`` or pinned to ``node``."""
    spec: Obj = {
        "schedulerName": scheduler,
        "terminationGracePeriodSeconds": 0,
        "automountServiceAccountToken": False,
        "tolerations": [
            {"key": key, "operator": "Exists", "effect": "NoSchedule"}
            for key in names.TOLERATED_TAINTS
        ],
        "containers": [
            {
                "name": "ray",
                "image": "registry.invalid/ray",
                "resources": {"requests": dict(resources), "limits": dict(resources)},
            }
        ],
    }
    if affinity is not None:
        terms = [{"matchExpressions": affinity}]
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
            }
        }
    if node is not None:
        spec["nodeSelector"] = {names.HOSTNAME: node}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {ROUND_LABEL: round_name}},
        "spec": spec,
    }


def worker_resources(cons: GroupConstraints) -> dict[str, str]:
    return {
        "cpu": f"{cons.cpu_per_worker}m",
        "memory": str(cons.memory_per_worker),
        names.GPU_RESOURCE: str(cons.gpus_per_worker),
    }


def head_resources(spec: GPUClusterSpec) -> dict[str, str]:
    return {
        "cpu": f"{cpu_millicores(spec.head.cpu)}m",
        "memory": str(memory_bytes(spec.head.memory)),
    }


def searching_pods(
    requests: Sequence[Placed], index: InventoryIndex, round_name: str, scheduler: str
) -> list[Obj]:
    """Every worker and head as a pod kube-scheduler must place by the constraints."""
    pods = []
    for req in requests:
        prefix = f"{round_name}-{req.name}"
        for group_name, group in req.spec.worker_groups():
            pods += [
                worker_pod(
                    f"{prefix}-{group_name}-{i}", round_name, scheduler, req, group_name, index
                )
                for i in range(group.replicas)
            ]
        pods.append(head_pod(f"{prefix}-head", round_name, scheduler, req))
    return pods


def worker_pod(
    name: str, round_name: str, scheduler: str, req: Placed, group_name: str, index: InventoryIndex
) -> Obj:
    group = dict(req.spec.worker_groups())[group_name]
    cons = group_constraints(req.spec, group_name, group)
    products = {gfd_product_label(kind[0]) for kind in index.kinds_for(group.gpu)}
    return pod_body(
        name,
        round_name,
        scheduler,
        worker_resources(cons),
        affinity=worker_affinity(cons, products),
    )


def head_pod(name: str, round_name: str, scheduler: str, req: Placed) -> Obj:
    return pod_body(
        name, round_name, scheduler, head_resources(req.spec), affinity=head_affinity(req.spec)
    )


def pinned_pods(requests: Sequence[Placed], round_name: str, scheduler: str) -> list[Obj]:
    """The engine's decisions as gpumesh renders them: every pod pinned to its node."""
    pods = []
    for req in requests:
        prefix = f"{round_name}-{req.name}"
        groups = dict(req.spec.worker_groups())
        for a in req.decision.assignments:
            cons = group_constraints(req.spec, a.group, groups[a.group])
            pods += [
                pod_body(
                    f"{prefix}-{a.group}-{a.node}-{i}",
                    round_name,
                    scheduler,
                    worker_resources(cons),
                    node=a.node,
                )
                for i in range(a.workers)
            ]
        assert req.decision.head_node is not None
        pods.append(
            pod_body(
                f"{prefix}-head",
                round_name,
                scheduler,
                head_resources(req.spec),
                node=req.decision.head_node,
            )
        )
    return pods


# --- the self-check: the pods admit exactly what the engine admits ------------------------


def _matches(expr: Obj, labels: Mapping[str, str]) -> bool:
    value = labels.get(expr["key"])
    if value is None:
        return False
    if expr["operator"] == "In":
        return value in expr["values"]
    if expr["operator"] == "Gt":
        return int(value) > int(expr["values"][0])
    if expr["operator"] == "Lt":
        return int(value) < int(expr["values"][0])
    raise ValueError(f"unexpected operator {expr['operator']}")


def kube_admits(pod: Obj, node: Obj) -> bool:
    """Node affinity, taints and cordons as kube-scheduler checks them (capacity apart)."""
    spec, labels = pod["spec"], node["metadata"]["labels"]
    if node["spec"].get("unschedulable"):
        return False
    tolerated = {t["key"] for t in spec["tolerations"]}
    if any(t["key"] not in tolerated for t in node["spec"].get("taints", [])):
        return False
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    exprs = terms["nodeSelectorTerms"][0]["matchExpressions"]
    return all(_matches(e, labels) for e in exprs)


def check_translation(
    requests: Sequence[Placed], index: InventoryIndex, bodies: Mapping[str, Obj]
) -> int:
    """Raise unless every group's pod admits exactly the nodes the engine's filters admit
    (health, cordons, taints, hardware, policy); the number of (group, node) pairs checked."""
    checked = 0
    for req in requests:
        for group_name, group in req.spec.worker_groups():
            pod = worker_pod("check", "check", "check", req, group_name, index)
            cons = group_constraints(req.spec, group_name, group)
            kinds = set(index.kinds_for(group.gpu))
            for offer in index:
                engine = (
                    offer.accepts_work
                    and (offer.gpu_model, offer.gpu_memory_mib, offer.compute_capability) in kinds
                    and cons.admits(offer)
                )
                if engine != kube_admits(pod, bodies[offer.name]):
                    raise RuntimeError(
                        f"translation differs for {req.name}/{group_name} on {offer.name}: "
                        f"engine admits it: {engine}, the pod's affinity: {not engine}"
                    )
                checked += 1
        head = head_pod("check", "check", "check", req)
        for offer in index:
            engine = offer.head_capable and offer.verified and offer.accepts_work
            if engine != kube_admits(head, bodies[offer.name]):
                raise RuntimeError(f"head translation differs for {req.name} on {offer.name}")
            checked += 1
    return checked


# --- the cluster ---------------------------------------------------------------------------


def create_nodes(api: client.ApiClient, bodies: Sequence[Obj]) -> str:
    """Create the Nodes, then wait until kwok has taken every one over (its Lease exists)
    and every one is Ready without a not-ready taint, so no round pays for the takeover;
    how long each step took."""
    core = client.CoreV1Api(api)
    coord = client.CoordinationV1Api(api)
    started = time.monotonic()
    parallel(lambda b: consume(core.create_node(b, _preload_content=False)), bodies, CREATE_THREADS)
    created = time.monotonic()
    wanted = {b["metadata"]["name"] for b in bodies}

    def leases() -> bool:
        items = raw_json(coord.list_namespaced_lease("kube-node-lease", _preload_content=False))
        return wanted <= {i["metadata"]["name"] for i in items["items"]}

    def ready() -> bool:
        ok = set()
        for n in raw_json(core.list_node(_preload_content=False))["items"]:
            conds = n.get("status", {}).get("conditions") or []
            taints = n.get("spec", {}).get("taints") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conds) and not any(
                t["key"].startswith("node.kubernetes.io/not-ready") for t in taints
            ):
                ok.add(n["metadata"]["name"])
        return wanted <= ok

    wait_until("kwok to hold a Lease for every node", leases, 600, every=2.0)
    leased = time.monotonic()
    wait_until("every node Ready", ready, 600, every=2.0)
    return (
        f"nodes created in {created - started:.0f} s, kwok held every Lease "
        f"{leased - created:.0f} s later, all Ready {time.monotonic() - leased:.0f} s after that"
    )


def wait_for_service_account(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)

    def present() -> bool:
        try:
            core.read_namespaced_service_account("default", namespace, _preload_content=False)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    wait_until(f"the default ServiceAccount in {namespace}", present, 120, every=0.5)


# --- watching bindings ----------------------------------------------------------------------


class PodWatch(ListWatch):
    """One round's pods as a watch sees them: when each was first seen, when it was first
    seen bound (``spec.nodeName``) and where, and which the scheduler marked Unschedulable.
    Times are ``time.monotonic()`` in this process."""

    def __init__(self, api: client.ApiClient, namespace: str, round_name: str) -> None:
        core = client.CoreV1Api(api)
        selector = f"{ROUND_LABEL}={round_name}"
        super().__init__(core.list_namespaced_pod, namespace, name="pods", label_selector=selector)
        self.seen: dict[str, float] = {}
        self.bound: dict[str, tuple[float, str]] = {}
        self.unschedulable: set[str] = set()
        self.why: dict[str, str] = {}  # the last PodScheduled=False reason and message

    def observe(self, pod: Mapping[str, Any], now: float) -> None:
        name = pod["metadata"]["name"]
        node = pod["spec"].get("nodeName")
        conds = (pod.get("status") or {}).get("conditions") or []
        self.seen.setdefault(name, now)
        if node and name not in self.bound:
            self.bound[name] = (now, node)
        for c in conds:
            if c["type"] == "PodScheduled" and c["status"] == "False":
                self.why[name] = f"{c.get('reason')}: {c.get('message')}"
                if c.get("reason") == "Unschedulable":
                    self.unschedulable.add(name)

    def wait_seen(self, names: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not names <= self.seen.keys():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(names & self.seen.keys())}/{len(names)} seen")
                self._cond.wait(1.0)

    def wait_settled(self, names: set[str], cap_s: float = ROUND_CAP_S) -> None:
        """Until every pod is bound, or the rest are Unschedulable and nothing bound for
        QUIET_S, or nothing bound for STALL_S, or ``cap_s`` is over. Logs progress."""
        started = time.monotonic()
        last_count, last_change, next_log = -1, started, started + 15
        with self._cond:
            while True:
                now = time.monotonic()
                bound = len(names & self.bound.keys())
                if bound != last_count:
                    last_count, last_change = bound, now
                if bound == len(names):
                    return
                quiet = now - last_change
                settled = names <= self.bound.keys() | self.unschedulable
                if (settled and quiet >= QUIET_S) or quiet >= STALL_S or now - started >= cap_s:
                    return
                if now >= next_log:
                    log(f"{bound}/{len(names)} bound")
                    next_log = now + 15
                self._cond.wait(0.5)


# --- rounds ----------------------------------------------------------------------------------


@dataclass
class RoundResult:
    """What one round measured."""

    name: str
    what: str
    pods: int
    bound: int = 0
    unschedulable: int = 0
    why_unbound: str = ""  # the most common reason left on unbound pods
    window_s: float = 0.0  # the window the rate is over (see ``rate``)
    create_s: float = 0.0  # stream: first create sent -> last create answered
    startup_s: float = 0.0  # backlog: scheduler process started -> first binding seen
    latency: Stats | None = None  # stream: per pod create sent -> bound seen
    events: str = ""  # the cross-check from the scheduler's own Scheduled events
    wrong_node: int = 0  # pinned: bound elsewhere than the engine chose (must be 0)
    load_before: str = ""
    load_after: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Stream: pods bound / (first create sent -> last binding); backlog: bindings
        after the first / (first -> last binding)."""
        return (self.bound if self.latency is not None else self.bound - 1) / self.window_s


def create_pods(api: client.ApiClient, pods: Sequence[Obj]) -> dict[str, float]:
    """Create from ``CREATE_THREADS`` threads; name -> when its create was sent."""
    core = client.CoreV1Api(api)
    sent: dict[str, float] = {}

    def create(body: Obj) -> None:
        sent[body["metadata"]["name"]] = time.monotonic()
        consume(core.create_namespaced_pod(NAMESPACE, untyped(body), _preload_content=False))

    parallel(create, pods, CREATE_THREADS)
    return sent


def stream_round(api: client.ApiClient, name: str, pods: Sequence[Obj]) -> RoundResult:
    """The dev cluster's scheduler binds while this process creates the pods."""
    result = RoundResult(name, "stream", len(pods), load_before=load())
    wanted = {p["metadata"]["name"] for p in pods}
    log(f"{name}: creating {len(pods)} pods for the dev cluster's scheduler")
    with PodWatch(api, NAMESPACE, name) as watch:
        started = time.monotonic()
        sent = create_pods(api, pods)
        result.create_s = time.monotonic() - started
        log(f"{name}: created in {result.create_s:.1f} s")
        watch.wait_settled(wanted)
        bound = dict(watch.bound)
        result.unschedulable = len(watch.unschedulable - bound.keys())
        result.why_unbound = why_unbound(watch, wanted - bound.keys())
    result.bound = len(bound)
    if not bound:
        raise RuntimeError(f"{name}: the dev cluster's scheduler bound no pod")
    first = min(sent.values())
    result.window_s = max(t for t, _ in bound.values()) - first
    result.latency = Stats(tuple(bound[n][0] - sent[n] for n in wanted if n in bound))
    result.load_after = load()
    return result


def why_unbound(watch: PodWatch, unbound: set[str]) -> str:
    """The most common PodScheduled=False reason among unbound pods, with its count."""
    if not unbound:
        return ""
    counts = Counter(watch.why.get(n, "no PodScheduled condition") for n in unbound)
    text, count = counts.most_common(1)[0]
    log(f"{len(unbound)} unbound; {count}x {text}")
    # The preemption half of the message adds nothing here: no pod has a priority.
    return f"{count}x {text.split(' no new claims')[0].split(' preemption:')[0]}"


class BenchScheduler:
    """A second kube-scheduler: the dev cluster's binary and configuration, its own
    ``schedulerName`` and client QPS, started only when its pods are waiting."""

    def __init__(self, state_dir: Path, name: str, qps: float, burst: int) -> None:
        self.state_dir = state_dir
        self.name = name
        self.qps, self.burst = qps, burst
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir / "logs" / f"{name}.log"

    def argv(self) -> list[str]:
        dev = dev_scheduler_config(self.state_dir)
        own = str(dev["clientConnection"]["kubeconfig"])
        cfg = dict(dev)
        cfg["clientConnection"] = {"kubeconfig": own, "qps": self.qps, "burst": self.burst}
        cfg["profiles"] = [{"schedulerName": self.name}]
        path = self.state_dir / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return [
            str(toolchain.binary_path("kube-scheduler")),
            f"--config={path}",
            f"--authentication-kubeconfig={own}",
            f"--authorization-kubeconfig={own}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--cert-dir={self.state_dir / 'run' / self.name}",
        ]

    def __enter__(self) -> BenchScheduler:
        argv = self.argv()
        with self.log_path.open("ab") as fh:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with(os.getpid()),  # even if this benchmark is killed
            )
        return self

    def __exit__(self, *_: object) -> None:
        stop_process(self.proc, grace=15)


def dev_scheduler_config(state_dir: Path) -> Obj:
    """The KubeSchedulerConfiguration the dev cluster's scheduler runs with."""
    path = state_dir / "kube-scheduler.yaml"
    if not path.exists():
        raise RuntimeError(f"no scheduler configuration at {path}: has LocalCluster changed?")
    cfg: Obj = yaml.safe_load(path.read_text())
    return cfg


def backlog_round(
    api: client.ApiClient,
    state_dir: Path,
    name: str,
    what: str,
    pods: Sequence[Obj],
    limits: tuple[float, int],
) -> RoundResult:
    """Pods created first, then a scheduler started to drain them."""
    result = RoundResult(name, what, len(pods), load_before=load())
    wanted = {p["metadata"]["name"] for p in pods}
    scheduler = pods[0]["spec"]["schedulerName"]
    qps, burst = limits
    log(f"{name}: creating {len(pods)} pods, then {scheduler} at QPS {qps:g}/{burst}")
    with PodWatch(api, NAMESPACE, name) as watch:
        create_pods(api, pods)
        watch.wait_seen(wanted, 120)
        result.load_before = load()
        with BenchScheduler(state_dir, scheduler, qps, burst):
            started = time.monotonic()
            watch.wait_settled(wanted)
        bound = dict(watch.bound)
        result.unschedulable = len(watch.unschedulable - bound.keys())
        result.why_unbound = why_unbound(watch, wanted - bound.keys())
    result.bound = len(bound)
    if len(bound) < 2:
        raise RuntimeError(f"{name}: the second scheduler bound {len(bound)} pods; see its log")
    times = sorted(t for t, _ in bound.values())
    result.window_s = times[-1] - times[0]
    result.startup_s = times[0] - started
    pinned = {p["metadata"]["name"]: p["spec"].get("nodeSelector", {}) for p in pods}
    result.wrong_node = sum(
        1
        for n, (_, node) in bound.items()
        if names.HOSTNAME in pinned[n] and pinned[n][names.HOSTNAME] != node
    )
    result.load_after = load()
    return result


def scheduled_events(api: client.ApiClient, wanted: set[str], bound: int) -> str:
    """The rate from the scheduler's own Scheduled events (eventTime, microseconds), once
    they stop arriving: they go through their own client and can trail the bindings."""
    events_api = client.EventsV1Api(api)
    stamps: list[datetime] = []
    previous = -1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        items = raw_json(events_api.list_namespaced_event(NAMESPACE, _preload_content=False))
        stamps = [
            datetime.fromisoformat(e["eventTime"])
            for e in items["items"]
            if e.get("reason") == "Scheduled"
            and e.get("eventTime")
            and (e.get("regarding") or {}).get("name") in wanted
        ]
        if len(stamps) >= bound or len(stamps) == previous:
            break
        previous = len(stamps)
        time.sleep(3)
    if len(stamps) < 2:
        return "no Scheduled events with eventTime"
    span = (max(stamps) - min(stamps)).total_seconds()
    return f"{len(stamps)} Scheduled events over {span:.1f} s: {(len(stamps) - 1) / span:.0f}/s"


def delete_round(api: client.ApiClient, name: str) -> float:
    """Force-delete a round's pods (grace 0) so their GPUs are free again; seconds taken."""
    core = client.CoreV1Api(api)
    started = time.monotonic()
    selector = f"{ROUND_LABEL}={name}"
    consume(
        core.delete_collection_namespaced_pod(
            NAMESPACE, label_selector=selector, grace_period_seconds=0, _preload_content=False
        )
    )

    def gone() -> bool:
        listed = raw_json(
            core.list_namespaced_pod(
                NAMESPACE, label_selector=selector, limit=1, _preload_content=False
            )
        )
        return not listed["items"]

    wait_until(f"{name}'s pods deleted", gone, 300, every=1.0)
    return time.monotonic() - started


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    rounds: list[RoundResult] = field(default_factory=list)
    dev_qps: float = 0.0
    dev_burst: int = 0
    setup_s: float = 0.0
    setup: str = ""
    delete_s: list[float] = field(default_factory=list)


def measure(
    state_dir: Path, requests: Sequence[Placed], index: InventoryIndex, nodes: Sequence[Obj]
) -> Outcome:
    out = Outcome()
    cluster = LocalCluster(state_dir, ephemeral=True)
    try:
        started = time.monotonic()
        cluster.up()
        dev = dev_scheduler_config(cluster.state_dir)
        out.dev_qps = float(dev["clientConnection"]["qps"])
        out.dev_burst = int(dev["clientConnection"]["burst"])
        api = api_client(cluster.kubeconfig)
        log(f"creating {len(nodes)} kwok GPU nodes")
        out.setup = create_nodes(api, nodes)
        mesh.ensure_namespace(api, NAMESPACE)
        wait_for_service_account(api, NAMESPACE)
        out.setup_s = time.monotonic() - started
        log(f"cluster and nodes ready in {out.setup_s:.0f} s")
        raised = (RAISED_QPS, int(2 * RAISED_QPS))
        dev_limits = (out.dev_qps, out.dev_burst)
        plan: list[tuple[str, str, tuple[float, int] | None]] = [
            ("stream", "stream", None),
            ("backlog", "backlog", dev_limits),
            ("raised", "backlog", raised),
            ("pinned", "pinned", dev_limits),
        ]
        for name, what, limits in plan:
            scheduler = "default-scheduler" if limits is None else f"bench-{name}"
            pods = (
                pinned_pods(requests, name, scheduler)
                if what == "pinned"
                else searching_pods(requests, index, name, scheduler)
            )
            if limits is None:
                result = stream_round(api, name, pods)
            else:
                result = backlog_round(api, cluster.state_dir, name, what, pods, limits)
            result.events = scheduled_events(
                api, {p["metadata"]["name"] for p in pods}, result.bound
            )
            log(f"{name}: {result.bound}/{result.pods} bound, {result.rate:.0f}/s; {result.events}")
            out.rounds.append(result)
            out.delete_s.append(delete_round(api, name))
        api.close()  # type: ignore[no-untyped-call]
    finally:
        cluster.down()
    return out


def run() -> Report:
    offers = synthetic_inventory(NODES, seed=SEED)
    index = InventoryIndex(offers)
    requests, refused = select_requests(index, TARGET_PODS)
    nodes = [node_body(o) for o in offers]
    checked = check_translation(requests, index, {n["metadata"]["name"]: n for n in nodes})
    log(f"{len(requests)} requests, {sum(r.pods for r in requests)} pods; {checked:,} checks")
    engine_load = load()
    engine = time_engine(index, requests)
    log(f"engine: {len(requests) / engine.pass_s:,.0f} decisions/s")
    state_dir = Path(tempfile.mkdtemp(prefix="gpumesh-bench-scheduler-"))
    keep = os.environ.get("BENCH_SCHEDULER_KEEP") == "1"
    try:
        out = measure(state_dir, requests, index, nodes)
    except BaseException:
        print(f"bench/scheduler: state and logs kept in {state_dir}", file=sys.stderr)
        raise
    if keep:
        print(f"bench/scheduler: state and logs kept in {state_dir}", file=sys.stderr)
    else:
        shutil.rmtree(state_dir, ignore_errors=True)
    return report(out, engine, requests, refused, offers, checked, engine_load)


def report(
    out: Outcome,
    engine: EngineResult,
    requests: Sequence[Placed],
    refused: Counter[str],
    offers: Sequence[NodeOffer],
    checked: int,
    engine_load: str,
) -> Report:
    rep = Report(
        f"kube-scheduler as a reference: GPU pods bound per second ({len(offers):,} kwok nodes)",
        COMMAND,
    )
    pods = sum(r.pods for r in requests)
    workers = sum(r.decision.workers for r in requests)
    engine_pod_rate = pods / engine.pass_s
    engine_row = Stats((1 / engine_pod_rate,))
    rounds = {r.name: r for r in out.rounds}
    dev = f"QPS {out.dev_qps:g}/burst {out.dev_burst}"
    raised = f"QPS {RAISED_QPS:g}/burst {int(2 * RAISED_QPS)}"
    labels = {
        "stream": f"stream, dev cluster's scheduler ({dev}), create -> bound",
        "backlog": f"backlog drained by kube-scheduler at {dev}",
        "raised": f"backlog drained by kube-scheduler at {raised} (raised)",
    }
    for name, label in labels.items():
        r = rounds.get(name)
        if r is None:
            continue
        rep.rows.append(
            Row(
                f"pods placed per second: engine {engine_pod_rate:,.0f}/s vs {label} "
                f"{r.rate:,.0f}/s ({r.bound}/{r.pods} bound): "
                f"{engine_pod_rate / r.rate:,.0f}x; ms per pod",
                engine_row,
                Stats((1 / r.rate,)),
            )
        )
    stream = rounds.get("stream")
    if stream is not None and stream.latency is not None:
        rep.rows.append(
            Row(
                "per pod: engine decision of its request vs create -> bound (stream)",
                engine.per_pod,
                stream.latency,
            )
        )
    pinned, backlog = rounds.get("pinned"), rounds.get("backlog")
    if pinned is not None and backlog is not None:
        rep.rows.append(
            Row(
                f"kube-scheduler at {dev}: pods pinned to the engine's nodes "
                f"({pinned.rate:,.0f}/s, {pinned.bound}/{pinned.pods} bound) vs searching "
                f"({backlog.rate:,.0f}/s); ms per pod",
                Stats((1 / pinned.rate,)),
                Stats((1 / backlog.rate,)),
            )
        )
    rep.rows.append(
        Row(
            f"engine decision per request ({len(requests) / engine.pass_s:,.0f}/s), "
            "sequential, each committed",
            engine.per_decision,
        )
    )
    gpus = sum(r.decision.gpus for r in requests)
    free = sum(o.gpus_free for o in offers if o.accepts_work)
    rep.notes += [
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), shared with other work. Every "
        "control-plane component (etcd, kube-apiserver, controller-manager, scheduler, kwok, "
        "KubeRay) and this benchmark run on it.",
        f"Inventory: operator/placement/synthetic.py, {len(offers):,} nodes (seed {SEED}), "
        f"{sum(o.gpus_total for o in offers):,} GPUs of which {free:,} free on nodes that "
        "accept work; the same offers in memory for the engine and as kwok Nodes for "
        "kube-scheduler (free GPUs, CPU and memory as allocatable; labels for GPU product, "
        "region, supplier, verified, head-capable, health, reputation and price; cordons as "
        "`unschedulable`, Unhealthy/Lost as the agent's `gpumesh.io/gpu-unhealthy` taint, "
        "foreign taints as an untolerated taint).",
        f"Requests: bench/placement.py's `random_spec` (seed {REQUEST_SEED}); the "
        f"{len(requests)} the engine placed in sequence before reaching {TARGET_PODS:,} pods "
        f"({workers} GPU workers + {len(requests)} heads = {pods} pods, {gpus:,} GPUs, "
        f"{gpus / free:.0%} of the free ones). Turned down on the way and left out on both "
        "sides: " + (", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or "none") + ".",
        "Translation: each worker pod requests its GPUs, CPU and memory and carries required "
        "node affinity for the products the GPU selector accepts, health Healthy/Degraded, and "
        "the request's regions, suppliers, verified-only, least reputation (`Gt`) and price "
        "ceiling (`Lt`); heads require head-capable, verified and healthy nodes. Tolerations "
        "are the renderer's. Checked before the run: for every request, the pods admit exactly "
        f"the nodes the engine's filters admit ({checked:,} node checks).",
        f"Engine: the {len(requests)} decisions in order, each committed to one ledger (as an "
        f"admission pass does), {engine.passes} passes after 2 untimed ones; mean pass "
        f"{engine.pass_s * 1e3:.1f} ms, i.e. {len(requests) / engine.pass_s:,.0f} decisions/s "
        f"and {engine_pod_rate:,.0f} pods/s on one core, with its explanations; no API call. "
        f"Load {engine_load} while it ran.",
        f"Rounds, in this order on one cluster (set up in {out.setup_s:.0f} s: {out.setup}); "
        "each round's pods force-deleted after it ("
        + ", ".join(f"{s:.0f} s" for s in out.delete_s)
        + "). Rates count bound pods only.",
    ]
    limits = {"stream": (out.dev_qps, out.dev_burst), "raised": (RAISED_QPS, 2 * RAISED_QPS)}
    for r in out.rounds:
        qps, burst = limits.get(r.name, (out.dev_qps, out.dev_burst))
        rep.notes.append(round_note(r, dev) + " " + client_ceiling(r, qps, burst))
    unbound = [r for r in out.rounds if r.what != "pinned" and r.bound < r.pods]
    if unbound:
        rep.notes.append(
            "Unbound pods: every request here is one the engine placed whole, in this order, "
            "on the same free capacity; kube-scheduler, placing pod by pod and preferring the "
            "least-allocated nodes, left "
            + ", ".join(f"{r.pods - r.bound} ({r.name})" for r in unbound)
            + " pods with no node among those their constraints allow that still had room "
            "(its messages above); it bound the other pods of those requests anyway (no gang)."
        )
    rep.notes += [
        "What differs: kube-scheduler binds through the API server: one POST of a Binding "
        "per pod, through its client's token bucket (the dev cluster sets "
        f"{dev}; Scheduled events go through a second client with the same limits), against "
        "an API server and etcd sharing these 2 cores. The engine decides in memory and writes "
        "nothing; on gpumesh's path its decisions then still reach kube-scheduler as pods "
        "pinned by hostname (the pinned round), so binding throughput bounds how fast "
        "workers start either way. kube-scheduler places pod by pod with its default plugins "
        "(least-allocated CPU/memory, spreading; percentageOfNodesToScore adaptive): no gang "
        "(a request may be half bound), no price or reputation ranking; the engine places "
        "whole requests, ranking by price, reputation, locality and packing.",
        "Anchors (design notes): kube-scheduler's perf CI accepts >= 180 pods/s for "
        "extended-resource pods on 5,000 nodes (scheduler and API server in one test process, "
        "client QPS 5,000: test/integration/scheduler_perf/util.go at v1.36.3); on a "
        "real API server with kwok nodes it has been measured near 50 pods/s (client QPS "
        "bound).",
    ]
    return rep


def client_ceiling(r: RoundResult, qps: float, burst: float) -> str:
    """What the scheduler's binding client allows for this many pods: ``burst`` at once,
    then ``qps`` a second (client-go's token bucket)."""
    if r.bound <= burst:
        return f"Its client (QPS {qps:g}, burst {burst:g}) did not limit {r.bound} bindings."
    ceiling = r.bound / ((r.bound - burst) / qps)
    return (
        f"Its client (QPS {qps:g}, burst {burst:g}) allows at most {ceiling:.0f}/s for "
        f"{r.bound} bindings: {r.rate / ceiling:.0%} of that reached."
    )


def round_note(r: RoundResult, dev: str) -> str:
    if r.what == "stream":
        how = (
            f"the dev cluster's scheduler ({dev}) bound {r.bound}/{r.pods} pods while this "
            f"process created them from {CREATE_THREADS} threads (creates took "
            f"{r.create_s:.1f} s, {r.pods / r.create_s:.0f}/s); first create sent -> last "
            f"binding seen {r.window_s:.1f} s"
        )
    else:
        kind = "pinned to the engine's nodes" if r.what == "pinned" else "searching"
        how = (
            f"{r.pods} pods ({kind}) created first, then a second kube-scheduler started; "
            f"first binding {r.startup_s:.1f} s after its start, then {r.bound - 1} more over "
            f"{r.window_s:.1f} s"
        )
        if r.what == "pinned":
            how += f"; {r.wrong_node} bound elsewhere than the engine chose"
    left = (
        f"; {r.pods - r.bound} left unbound ({r.unschedulable} marked Unschedulable; "
        f"{r.why_unbound})"
    )
    return (
        f"Round {r.name}: {how}; {r.rate:.0f} pods/s{left if r.bound < r.pods else ''}. "
        f"Cross-check: {r.events}. Load {r.load_before} -> {r.load_after}."
    )
