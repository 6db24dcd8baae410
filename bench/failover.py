"""The operator's leader SIGKILLed at random while GPUClusters and Jobs pour in.

An ephemeral local control plane (etcd, kube-apiserver, controller-manager, scheduler,
kwok, KubeRay) with kwok GPU nodes whose GPUNodes are written as agents would (see
bench/reconcile.py), and two operator replicas electing a leader, as the chart runs them.
The benchmark creates 500 GPUClusters and 100 Jobs at a steady pace; meanwhile it SIGKILLs
whichever replica leads, 10 times, each a random 2 to 8 s after the previous takeover, and
restarts the killed one at once as a standby (what the kubelet does). Then it waits for the
end state and checks it from the API:

- every GPUCluster Ready at its generation, with exactly one RayCluster, its own;
- every Job admitted to a RayJob (KubeRay's submission is interactive here: kwok pods run
  no Ray), then, once the benchmark writes each RayJob's verdict as KubeRay would, every
  Job Succeeded and its RayCluster gone;
- no RayCluster, RayJob or pod that nothing owns; no node with more GPUs placed on it (by
  the GPUClusters' and Jobs' own status) than it has.

Figures: SIGKILL -> Lease taken by the standby, SIGKILL -> the new leader's first write
(a GPUCluster created right after the kill becomes Ready), and the time to the end state
against the same load with no kill, measured first on the same cluster.

Knobs: ``BENCH_FAILOVER_CLUSTERS`` (500), ``BENCH_FAILOVER_JOBS`` (100),
``BENCH_FAILOVER_KILLS`` (10), ``BENCH_FAILOVER_KEEP=1`` keeps the state directory.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from bench.harness import Report, Row, Stats, api_client, log, stop_process, wait_until
from bench.reconcile import (
    MODELS,
    create_fleet,
    delete_namespace,
    fleet,
    settle_kwok,
    warm_up_kuberay,
)
from gpumesh.api.base import GROUP, VERSION
from testbed import mesh
from testbed.cluster import LocalCluster
from testbed.ports import free_port

COMMAND = "python -m bench failover"
CLUSTERS = int(os.environ.get("BENCH_FAILOVER_CLUSTERS", 500))
JOBS = int(os.environ.get("BENCH_FAILOVER_JOBS", 100))
KILLS = int(os.environ.get("BENCH_FAILOVER_KILLS", 10))
GPU_NODES = 120
"""960 GPUs for 600 one-GPU workloads: capacity never decides the end state."""
CREATE_PER_SECOND = 4.0
LEASE = "gpumesh-operator"
SYSTEM = "gpumesh-system"
RAY = ("ray.io", "v1")
LOOPBACK_DASHBOARD = "http://127.0.0.1:9/"
"""A closed loopback port: whatever KubeRay asks a dashboard fails at once, on this machine."""
OPERATOR_ENV = {"GPUMESH_RAYJOB_SUBMISSION_MODE": "InteractiveMode", "GPUMESH_RESYNC_SECONDS": "60"}


# --- the replicas ---------------------------------------------------------------------------


class Replicas:
    """Two operator processes; a killed one is started again at once, as a standby."""

    def __init__(self, kubeconfig: Path, logs: Path) -> None:
        self.kubeconfig, self.logs = kubeconfig, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = Counter[str]()

    def start(self, name: str) -> None:
        self.starts[name] += 1
        argv = mesh.operator_argv(free_port())
        env = {"KUBECONFIG": str(self.kubeconfig), **OPERATOR_ENV}
        self.procs[name] = mesh.spawn(f"{name}-{self.starts[name]}", argv, self.logs, env)[0]

    def leader(self, identity: str) -> str | None:
        """The replica whose current process leads as ``identity`` (its log says so)."""
        for name in self.procs:
            text = (self.logs / f"{name}-{self.starts[name]}.log").read_text(errors="replace")
            if f"leading as {identity}" in text:
                return name
        return None

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc, grace=20)


def holder(coordination: Any) -> str:
    try:
        lease = coordination.read_namespaced_lease(LEASE, SYSTEM)
    except ApiException:
        return ""
    return str(lease.spec.holder_identity or "")


# --- the load -------------------------------------------------------------------------------


def cluster_body(i: int) -> dict[str, Any]:
    model = MODELS[i % len(MODELS)]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GPUCluster",
        "metadata": {"name": f"c{i:04d}"},
        "spec": {"workers": {"gpu": {"models": [model.selector]}, "replicas": 1}},
    }


def job_body(i: int) -> dict[str, Any]:
    model = MODELS[i % len(MODELS)]
    template = {"workers": {"gpu": {"models": [model.selector]}, "replicas": 1}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Job",
        "metadata": {"name": f"j{i:04d}"},
        "spec": {"entrypoint": "python train.py", "clusterTemplate": template},
    }


def paced_bodies(clusters: int, jobs: int) -> list[tuple[str, dict[str, Any]]]:
    """Clusters and Jobs interleaved, so both kinds arrive throughout the kills."""
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("gpuclusters", cluster_body(i)) for i in range(clusters)
    ]
    step = max(1, clusters // max(1, jobs))
    for j in range(jobs):
        bodies.insert(min(len(bodies), j * (step + 1) + step), ("jobs", job_body(j)))
    return bodies


def create_paced(
    api: client.ApiClient, ns: str, bodies: Sequence[tuple[str, dict[str, Any]]]
) -> None:
    custom = client.CustomObjectsApi(api)
    started = time.monotonic()
    for k, (plural, body) in enumerate(bodies):
        delay = started + k / CREATE_PER_SECOND - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, plural, body)


def listed(api: client.ApiClient, ns: str, group: str, version: str, plural: str) -> list[Any]:
    found: Any = client.CustomObjectsApi(api).list_namespaced_custom_object(
        group, version, ns, plural
    )
    return list(found["items"])


def finish_rayjobs(api: client.ApiClient, ns: str) -> int:
    """Write each waiting RayJob's verdict as KubeRay does once Ray answers: succeeded."""
    custom = client.CustomObjectsApi(api)
    done = 0
    for rayjob in listed(api, ns, *RAY, "rayjobs"):
        status = rayjob.get("status") or {}
        if status.get("jobDeploymentStatus") == "Complete":
            continue
        if status.get("jobDeploymentStatus") not in ("Waiting", "Running"):
            continue
        verdict = {
            "jobDeploymentStatus": "Complete",
            "jobStatus": "SUCCEEDED",
            "dashboardURL": LOOPBACK_DASHBOARD,
            "endTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        with contextlib.suppress(ApiException):
            custom.patch_namespaced_custom_object_status(
                *RAY,
                ns,
                "rayjobs",
                rayjob["metadata"]["name"],
                {"status": verdict},
                _content_type="application/merge-patch+json",
            )
            done += 1
    return done


def phases(items: Sequence[Any]) -> Counter[str]:
    return Counter(str((i.get("status") or {}).get("phase")) for i in items)


def end_state(api: client.ApiClient, ns: str, clusters: int, jobs: int, deadline: float) -> float:
    """Wait until every GPUCluster is Ready and every Job Succeeded (driving RayJobs to
    their verdict as they wait); the seconds that took from now."""
    started = time.monotonic()
    while True:
        gcs = listed(api, ns, GROUP, VERSION, "gpuclusters")
        ready = sum(
            1
            for g in gcs
            if (g.get("status") or {}).get("phase") == "Ready"
            and (g.get("status") or {}).get("observedGeneration") == g["metadata"]["generation"]
        )
        job_phases = phases(listed(api, ns, GROUP, VERSION, "jobs"))
        if ready == clusters and job_phases.get("Succeeded", 0) == jobs:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"end state not reached: {ready}/{clusters} GPUClusters Ready, "
                f"Jobs {dict(job_phases)}"
            )
        finish_rayjobs(api, ns)
        time.sleep(2)


# --- the checks -----------------------------------------------------------------------------


@dataclass
class Audit:
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


def audit(api: client.ApiClient, ns: str, capacity: dict[str, int]) -> Audit:
    """What the API says once the end state is reached: nothing duplicated, double-booked
    or orphaned."""
    out = Audit()
    gcs = {g["metadata"]["name"]: g for g in listed(api, ns, GROUP, VERSION, "gpuclusters")}
    jobs = {j["metadata"]["name"]: j for j in listed(api, ns, GROUP, VERSION, "jobs")}
    rayclusters = listed(api, ns, *RAY, "rayclusters")
    rayjobs = listed(api, ns, *RAY, "rayjobs")
    owners = Counter[tuple[str, str]]()
    for rc in rayclusters:
        refs = [(r["kind"], r["name"]) for r in rc["metadata"].get("ownerReferences") or []]
        out.check(len(refs) == 1, f"RayCluster {rc['metadata']['name']} has owners {refs}")
        for kind, name in refs:
            owners[(kind, name)] += 1
            known = gcs if kind == "GPUCluster" else {r["metadata"]["name"]: r for r in rayjobs}
            out.check(
                name in known, f"RayCluster {rc['metadata']['name']}: owner {kind} {name} gone"
            )
    for name in gcs:
        out.check(
            owners[("GPUCluster", name)] == 1,
            f"GPUCluster {name}: {owners[('GPUCluster', name)]} RayClusters",
        )
    live_rayjob_clusters = sum(n for (kind, _), n in owners.items() if kind == "RayJob")
    out.check(
        live_rayjob_clusters == 0, f"{live_rayjob_clusters} RayClusters of finished Jobs left"
    )
    for rj in rayjobs:
        refs = [(r["kind"], r["name"]) for r in rj["metadata"].get("ownerReferences") or []]
        out.check(
            len(refs) == 1 and refs[0][0] == "Job" and refs[0][1] in jobs,
            f"RayJob {rj['metadata']['name']} owned by {refs}",
        )
    out.check(len(rayjobs) <= len(jobs), f"{len(rayjobs)} RayJobs for {len(jobs)} Jobs")
    for node, gpus in booked(api, ns).items():
        out.check(
            gpus <= capacity.get(node, 0),
            f"node {node}: {gpus} GPUs placed, has {capacity.get(node, 0)}",
        )
    out.problems += orphan_pods(api, ns, {rc["metadata"]["name"] for rc in rayclusters})
    return out


def orphan_pods(
    api: client.ApiClient, ns: str, clusters: set[str], wait_s: float = 180
) -> list[str]:
    """Pods of no RayCluster that are not going away. Kubernetes' garbage collector deletes
    a finished Job's cluster's pods a little after the cluster: only pods it has not
    deleted after ``wait_s`` count."""
    deadline = time.monotonic() + wait_s
    while True:
        pods: Any = client.CoreV1Api(api).list_namespaced_pod(ns)
        left = [
            f"pod {pod.metadata.name} of no RayCluster ({belongs})"
            for pod in pods.items
            if pod.metadata.deletion_timestamp is None
            and (belongs := (pod.metadata.labels or {}).get("ray.io/cluster")) not in clusters
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(2)


# --- the run --------------------------------------------------------------------------------


@dataclass
class Outcome:
    calm_s: float = 0.0
    stormy_s: float = 0.0
    takeovers: list[float] = field(default_factory=list)
    first_ready: list[float] = field(default_factory=list)
    audit_calm: Audit = field(default_factory=Audit)
    audit_stormy: Audit = field(default_factory=Audit)
    setup_s: float = 0.0


def killer(
    api: client.ApiClient,
    replicas: Replicas,
    ns: str,
    out: Outcome,
    stop: threading.Event,
    rng: random.Random,
) -> None:
    """Kill the leader KILLS times, each a random 2-8 s after the previous takeover."""
    coordination = client.CoordinationV1Api(api)
    custom = client.CustomObjectsApi(api)
    for k in range(KILLS):
        if stop.wait(rng.uniform(2.0, 8.0)):
            return
        identity = holder(coordination)
        name = replicas.leader(identity) if identity else None
        if name is None:
            log(f"kill {k + 1}: no leader found (Lease held by {identity!r}); trying again")
            continue
        killed = time.monotonic()
        replicas.kill(name)
        probe = f"probe{k:02d}"
        body = cluster_body(10_000 + k)
        body["metadata"]["name"] = probe
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, "gpuclusters", body)
        replicas.start(name)
        wait_until("a new leader", partial(moved_on, coordination, identity), 120, 0.2)
        took = time.monotonic() - killed
        out.takeovers.append(took)
        wait_until(f"{probe} Ready", partial(is_ready, custom, ns, probe), 300, 0.2)
        out.first_ready.append(time.monotonic() - killed)
        custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "gpuclusters", probe)
        log(
            f"kill {k + 1}/{KILLS}: {name} killed; Lease taken in {took:.1f} s, a GPUCluster "
            f"created after the kill Ready in {out.first_ready[-1]:.1f} s"
        )


def moved_on(coordination: Any, identity: str) -> bool:
    return holder(coordination) not in ("", identity)


def is_ready(custom: Any, ns: str, name: str) -> bool:
    found: Any = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "gpuclusters", name)
    return bool((found.get("status") or {}).get("phase") == "Ready")


def booked(api: client.ApiClient, ns: str) -> Counter[str]:
    """GPUs per node as the GPUClusters' and the unfinished Jobs' own status place them."""
    placed = Counter[str]()
    for plural in ("gpuclusters", "jobs"):
        for item in listed(api, ns, GROUP, VERSION, plural):
            status = item.get("status") or {}
            if status.get("phase") in ("Succeeded", "Failed"):
                continue
            for p in status.get("placements") or []:
                placed[p["node"]] += int(p.get("gpus") or 0)
    return placed


def watch_bookings(
    api: client.ApiClient, ns: str, capacity: dict[str, int], out: Audit, stop: threading.Event
) -> None:
    """Every 3 s while the load runs: a node with more GPUs placed than it has is a problem."""
    while not stop.wait(3.0):
        with contextlib.suppress(ApiException):
            for node, gpus in booked(api, ns).items():
                out.check(gpus <= capacity.get(node, 0), f"node {node}: {gpus} GPUs placed")


def one_load(
    api: client.ApiClient,
    replicas: Replicas,
    ns: str,
    capacity: dict[str, int],
    out: Outcome,
    *,
    kills: bool,
) -> tuple[float, Audit]:
    """The load to its end state (with the leader killed meanwhile if ``kills``): seconds
    from the first create, and what was found wrong on the way and at the end."""
    mesh.ensure_namespace(api, ns)
    mesh.ensure_namespace(api, f"{ns}-probe")
    found = Audit()
    stop = threading.Event()
    threads = [
        threading.Thread(target=watch_bookings, args=(api, ns, capacity, found, stop), daemon=True)
    ]
    if kills:
        args = (api, replicas, f"{ns}-probe", out, stop, random.Random(21))
        threads.append(threading.Thread(target=killer, args=args, daemon=True))
    for thread in threads:
        thread.start()
    started = time.monotonic()
    try:
        create_paced(api, ns, paced_bodies(CLUSTERS, JOBS))
        if kills:
            threads[1].join()
        end_state(api, ns, CLUSTERS, JOBS, started + 1800)
        took = time.monotonic() - started
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    found.problems += audit(api, ns, capacity).problems
    return took, found


@contextlib.contextmanager
def bench_cluster(
    state_dir: Path,
) -> Iterator[tuple[LocalCluster, client.ApiClient, dict[str, int]]]:
    cluster = LocalCluster(state_dir, ephemeral=True)
    try:
        cluster.up()
        api = api_client(cluster.kubeconfig)
        mesh.apply_crds(api)
        mesh.ensure_namespace(api, SYSTEM)
        nodes = fleet(GPU_NODES)
        log(f"creating {len(nodes)} nodes and GPUNodes")
        create_fleet(api, nodes)
        settle_kwok(api, nodes)
        warm_up_kuberay(api, nodes)
        capacity = {s.name: 8 for s in nodes if s.model is not None}
        yield cluster, api, capacity
    finally:
        cluster.down()


def measure(state_dir: Path) -> Outcome:
    out = Outcome()
    logs = state_dir / "bench-logs"
    started = time.monotonic()
    with bench_cluster(state_dir) as (cluster, api, capacity):
        out.setup_s = time.monotonic() - started
        replicas = Replicas(cluster.kubeconfig, logs)
        try:
            replicas.start("replica-a")
            replicas.start("replica-b")
            coordination = client.CoordinationV1Api(api)
            wait_until("a leader", lambda: bool(holder(coordination)), 120)
            log(f"calm: {CLUSTERS} GPUClusters and {JOBS} Jobs, no kill")
            out.calm_s, out.audit_calm = one_load(
                api, replicas, "bench-calm", capacity, out, kills=False
            )
            delete_namespace(api, "bench-calm")
            log(f"storm: the same load, the leader SIGKILLed {KILLS} times")
            out.stormy_s, out.audit_stormy = one_load(
                api, replicas, "bench-storm", capacity, out, kills=True
            )
        finally:
            replicas.stop()
    return out


def run() -> Report:
    state_dir = Path(tempfile.mkdtemp(prefix="gpumesh-bench-failover-"))
    keep = os.environ.get("BENCH_FAILOVER_KEEP") == "1"
    try:
        out = measure(state_dir)
    except BaseException:
        print(f"bench/failover: state and logs kept in {state_dir}")
        raise
    if keep:
        print(f"bench/failover: state and logs kept in {state_dir}")
    else:
        shutil.rmtree(state_dir, ignore_errors=True)
    return report(out)


def report(out: Outcome) -> Report:
    rep = Report("Operator failover: the leader SIGKILLed under load (kwok nodes)", COMMAND)
    ok = not out.audit_calm.problems and not out.audit_stormy.problems
    rep.rows.append(
        Row(
            f"{CLUSTERS} GPUClusters + {JOBS} Jobs to their end state, leader killed "
            f"{len(out.takeovers)} times",
            Stats((out.stormy_s,)),
            Stats((out.calm_s,)),
            target="all reach it; nothing duplicated, double-booked or orphaned",
            met=ok,
            ratio=out.stormy_s / out.calm_s if out.calm_s else None,
        )
    )
    if out.takeovers:
        rep.rows.append(
            Row(
                f"SIGKILL -> Lease taken by the standby ({len(out.takeovers)} kills)",
                Stats(tuple(out.takeovers)),
                target="<= 11 s (Lease 8 s + 2 tries + start)",
                met=max(out.takeovers) <= 11.0,
            )
        )
        rep.rows.append(
            Row(
                "SIGKILL -> a GPUCluster created after the kill Ready",
                Stats(tuple(out.first_ready)),
            )
        )
    problems = out.audit_calm.problems + out.audit_stormy.problems
    rep.notes += [
        "Two operator replicas (`gpumesh operator run`, the chart's leader-election defaults: "
        "Lease 8 s, renewed every 1 s, renew deadline 6 s). A killed replica is started again "
        "at once, as the kubelet would; it comes back as the standby.",
        f"Load: {CLUSTERS} GPUClusters and {JOBS} Jobs (one worker with one GPU each), created "
        f"at {CREATE_PER_SECOND:g}/s; the baseline is the same load with no kill, on the same "
        f"cluster just before. {GPU_NODES} kwok GPU nodes with 8 GPUs each (set up in "
        f"{out.setup_s:.0f} s); agents simulated by their GPUNode status writes.",
        "End state: every GPUCluster Ready at its generation; every Job Succeeded after the "
        "benchmark writes its RayJob's verdict as KubeRay would (kwok pods run no Ray). Then "
        "from the API: one RayCluster per GPUCluster and owned by it, no RayCluster of a "
        "finished Job left, every RayJob owned by its Job, no pod of no RayCluster, no node "
        "with more GPUs placed than it has. "
        + ("Found nothing wrong." if not problems else f"PROBLEMS: {'; '.join(problems[:20])}"),
        "The storm's total runs until the last kill's takeover and probe are done (kills come "
        "about 23 s apart, so they outlast the 150 s of creations): the ratio says how long the "
        "storm lasted, not how much slower each workload was.",
        "Only the benchmark runs the storm; `e2e/test_leader_election.py` (in `make test`) "
        "checks one takeover and one clean handover.",
    ]
    return rep


def main() -> None:  # `python -m bench.failover` alone, without touching BENCHMARKS.md
    print(run().markdown())


if __name__ == "__main__":
    main()
