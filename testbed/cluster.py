"""A real Kubernetes control plane on 127.0.0.1, run from binaries built from Go modules.

There is no Docker here, so instead of kind the harness runs the genuine components as
plain processes: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok (fake
kubelets for the simulated GPU nodes) and the KubeRay operator. Everything listens on
loopback ports chosen at start, logs to ``<state_dir>/logs/`` and is recorded in
``<state_dir>/state.json``, so ``down()`` and ``status()`` work from any process, e.g. a
later ``python -m testbed down`` after ``python -m testbed up`` exited.

Addresses: kwok's pod IPs come from 198.18.0.0/17 and Service IPs from 198.18.128.0/17.
As root the harness makes 198.18.0.0/16 a local route on ``lo``, so a stray connection to
a fake pod or Service IP ends on this machine instead of leaving it.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import functools
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml
from rich.console import Console

from testbed import certs, toolchain
from testbed.fleet import FLEET_LABEL, Fleet, node_manifests
from testbed.kubehttp import KubeApiError, KubeClient, probe
from testbed.ports import free_port

POD_CIDR: Final = "198.18.0.0/17"
SERVICE_CIDR: Final = "198.18.128.0/17"
FIRST_SERVICE_IP: Final = "198.18.128.1"
LOCAL_RANGE: Final = "198.18.0.0/16"
NEVER_TOUCH: Final = "192.0.2.0/24"
"""A real network some machines here sit on: nothing may claim or route it."""

CONTROLLERS: Final = (
    "serviceaccount-token,serviceaccount,namespace,garbagecollector,daemonset,job,"
    "nodelifecycle,root-ca-cert-publisher,replicaset,deployment,taint-eviction-controller"
)
KWOK_NODE_SELECTOR: Final = "kwok.x-k8s.io/node=fake"
STATE_VERSION: Final = 1
AUDITED_GROUP: Final = "system:serviceaccounts:gpumesh-system"
STEP_TIMEOUT_S: Final = 180.0
"""How long one start step (etcd, the API server, the controllers...) may take to answer."""
COMPONENT_ORDER: Final = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "ray-operator",
)
_STOP_TIERS: Final = (
    ("ray-operator", "kwok", "kube-scheduler", "kube-controller-manager"),
    ("kube-apiserver",),
    ("etcd",),
)
_ROUTE_HOLDERS: Final = Path("/run/gpumesh/route-holders")


class ClusterError(RuntimeError):
    """The local control plane could not be started, reached or stopped."""


@dataclass(frozen=True)
class FleetApplied:
    """The fleet's Nodes now in the cluster, and the fleet-made ones pruned as gone."""

    nodes: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass
class ComponentRecord:
    """What is needed to find, probe and stop one process later, from any process."""

    name: str
    pid: int
    start_ticks: int
    argv: list[str]
    log: str
    health: str


@dataclass(frozen=True)
class ComponentStatus:
    """One component as seen now."""

    name: str
    pid: int
    running: bool
    healthy: bool
    log: Path


@dataclass(frozen=True)
class ClusterStatus:
    """The whole cluster as seen now; ``healthy`` means usable by tests right away."""

    state_dir: Path
    kubeconfig: Path
    server: str | None
    components: tuple[ComponentStatus, ...]
    route_added: bool

    @property
    def running(self) -> bool:
        """Every component process is alive."""
        names = {c.name for c in self.components if c.running}
        return names.issuperset(COMPONENT_ORDER)

    @property
    def healthy(self) -> bool:
        """Every component is alive and answers its health endpoint."""
        return self.running and all(c.healthy for c in self.components)


@dataclass
class _State:
    version: int = STATE_VERSION
    server: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    components: list[ComponentRecord] = field(default_factory=list)
    route_added: bool = False

    @classmethod
    def load(cls, path: Path) -> _State:
        try:
            raw = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return cls()
        if raw.get("version") != STATE_VERSION:
            return cls()
        return cls(
            server=raw.get("server"),
            ports={str(k): int(v) for k, v in raw.get("ports", {}).items()},
            components=[ComponentRecord(**c) for c in raw.get("components", [])],
            route_added=bool(raw.get("route_added", False)),
        )

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)


# --- processes --------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a live pid, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces
    return fields[0], int(fields[19])


def _alive(rec: ComponentRecord) -> bool:
    """Alive and still the process we started (a recycled pid has another start time)."""
    st = _proc_stat(rec.pid)
    return st is not None and st[0] not in ("Z", "X") and st[1] == rec.start_ticks


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec hook: SIGKILL the child when ``parent`` dies (Linux PR_SET_PDEATHSIG).

    A test session killed by a timeout never runs its fixture teardown; without this its
    cluster would keep running. SIGKILL, not SIGTERM: an apiserver whose etcd got SIGTERM
    at the same moment can hang in its graceful shutdown.
    """

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: no dlopen after
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _free_ports(names: Sequence[str], preferred: dict[str, int]) -> dict[str, int]:
    """Loopback ports: the previous run's where still free (keeps etcd's peer URL stable)."""
    ports: dict[str, int] = {}
    for name in names:
        ports[name] = free_port(preferred.get(name, 0), taken=ports.values())
    return ports


# --- the local route --------------------------------------------------------------------


def _routes() -> list[dict[str, Any]]:
    ip = shutil.which("ip")
    if ip is None:
        return []
    out = subprocess.run(
        [ip, "-j", "route", "show", "table", "all"], capture_output=True, text=True, check=False
    )
    if out.returncode != 0 or not out.stdout.strip():
        return []
    routes = json.loads(out.stdout)
    return routes if isinstance(routes, list) else []


def _is_our_route(r: dict[str, Any]) -> bool:
    return r.get("type") == "local" and r.get("dst") == LOCAL_RANGE and r.get("dev") == "lo"


def check_ranges() -> None:
    """Fail clearly if any route overlaps the ranges the fake cluster claims."""
    ours = ipaddress.ip_network(LOCAL_RANGE)
    never = ipaddress.ip_network(NEVER_TOUCH)
    assert not ours.overlaps(never)
    clashes: list[str] = []
    for r in _routes():
        dst = r.get("dst", "")
        if dst in ("default", "") or _is_our_route(r):
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.version == 4 and net.prefixlen > 0 and net.overlaps(ours):
            where = f"dev {r.get('dev', '?')} table {r.get('table', 'main')}"
            clashes.append(f"{r.get('type', 'unicast')} {dst} {where}")
    if clashes:
        raise ClusterError(
            f"the dev cluster uses {LOCAL_RANGE} for fake pod and Service IPs, but this machine "
            f"already routes part of it: {'; '.join(clashes)}. Refusing to start."
        )


def _holder_file(state_dir: Path) -> Path:
    return _ROUTE_HOLDERS / hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _route_lock() -> Iterator[None]:
    """Clusters starting and stopping at once must not race on the shared route."""
    _ROUTE_HOLDERS.mkdir(parents=True, exist_ok=True)
    with (_ROUTE_HOLDERS.parent / "route.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _holder_alive(holder: Path) -> bool:
    """A holder counts while the process that took it, or any of its components, lives."""
    try:
        raw = json.loads(holder.read_text())
        owner = ComponentRecord("owner", int(raw["pid"]), int(raw["start_ticks"]), [], "", "")
        state_dir = Path(raw["state_dir"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False
    if _alive(owner):
        return True
    return any(_alive(r) for r in _State.load(state_dir / "state.json").components)


def _add_local_route(state_dir: Path) -> bool:
    """As root, route the fake ranges to ``lo``; returns whether this cluster holds it."""
    ip = shutil.which("ip")
    me = _proc_stat(os.getpid())
    if os.geteuid() != 0 or ip is None or me is None:
        return False
    with _route_lock():
        if not any(_is_our_route(r) for r in _routes()):
            subprocess.run([ip, "route", "add", "local", LOCAL_RANGE, "dev", "lo"], check=True)
        holder = {"state_dir": str(state_dir), "pid": os.getpid(), "start_ticks": me[1]}
        _holder_file(state_dir).write_text(json.dumps(holder))
    return True


def _remove_local_route(state_dir: Path) -> None:
    """Drop our hold on the route; delete the route when no other live cluster holds it."""
    with _route_lock():
        _holder_file(state_dir).unlink(missing_ok=True)
        others = False
        for holder in _ROUTE_HOLDERS.iterdir():
            if _holder_alive(holder):
                others = True
            else:
                holder.unlink(missing_ok=True)
        ip = shutil.which("ip")
        if not others and ip and any(_is_our_route(r) for r in _routes()):
            subprocess.run([ip, "route", "del", "local", LOCAL_RANGE, "dev", "lo"], check=False)


# --- the cluster ------------------------------------------------------------------------


class LocalCluster:
    """etcd + kube-apiserver + controller-manager + scheduler + kwok + KubeRay on loopback."""

    def __init__(
        self,
        state_dir: Path | str,
        *,
        console: Console | None = None,
        ephemeral: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``ephemeral``: components die with this process even if it is killed (tests).

        A dev cluster (the default) outlives the process that started it, by design.
        """
        self.ephemeral = ephemeral
        self._clock = clock
        self._sleep = sleep
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.console = console or Console(stderr=True)
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # paths
    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (self-contained: certificates are embedded)."""
        return self.state_dir / "kubeconfig"

    @property
    def logs_dir(self) -> Path:
        """One log file per component."""
        return self.state_dir / "logs"

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def _pki_dir(self) -> Path:
        return self.state_dir / "pki"

    def client(self) -> KubeClient:
        """Admin client for the running cluster."""
        server = _State.load(self._state_file).server
        if server is None:
            raise ClusterError(f"no cluster recorded in {self.state_dir}")
        pki = self._pki_dir
        return KubeClient(server, ca=pki / "ca.crt", cert=pki / "admin.crt", key=pki / "admin.key")

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / ".lock").open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _step(self, text: str) -> Iterator[None]:
        started = self._clock()
        with self.console.status(text + " ..."):
            yield
        self.console.print(f"[green]✓[/] {text} [dim]({self._clock() - started:.1f}s)[/]")

    # status
    def status(self) -> ClusterStatus:
        """What runs now, with a quick health probe of each component."""
        state = _State.load(self._state_file)
        comps: list[ComponentStatus] = []
        client: KubeClient | None = None
        for rec in state.components:
            running = _alive(rec)
            healthy = False
            if running and rec.name == "kube-apiserver":
                with contextlib.suppress(OSError, ClusterError, ValueError):
                    client = client or self.client()
                    healthy = client.ok("/readyz")
            elif running:
                healthy = probe(rec.health)
            comps.append(ComponentStatus(rec.name, rec.pid, running, healthy, Path(rec.log)))
        return ClusterStatus(
            self.state_dir, self.kubeconfig, state.server, tuple(comps), state.route_added
        )

    # up
    def up(self, *, timeout: float = STEP_TIMEOUT_S) -> ClusterStatus:
        """Start the cluster, or reuse it if it already runs and is healthy.

        ``timeout`` bounds each start step's wait, counted from when that step begins: a
        cold toolchain build (many minutes, with its own progress) is never charged to it.
        """
        with self._lock():
            current = self.status()
            if current.healthy:
                self.console.print(f"[green]✓[/] reusing running dev cluster at {current.server}")
                return current
            if any(c.running for c in current.components):
                self.console.print("[yellow]partial cluster found: restarting it[/]")
                self._stop()
            try:
                self._start(timeout)
            except BaseException:
                self.console.print("[red]start failed; stopping what was started[/]")
                self._stop()
                raise
            return self.status()

    def _start(self, timeout: float) -> None:
        tc = toolchain.ensure(toolchain.CLUSTER_BINARIES, console=self.console)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        check_ranges()
        previous = _State.load(self._state_file)
        state = _State()
        state.route_added = _add_local_route(self.state_dir)
        state.save(self._state_file)
        if state.route_added:
            self.console.print(f"[green]✓[/] local route {LOCAL_RANGE} dev lo")

        with self._step("certificates"):
            pki = certs.ensure_pki(self._pki_dir, service_ip=FIRST_SERVICE_IP)
        state.ports = _free_ports(
            (
                "etcd",
                "etcd-peer",
                "apiserver",
                "kcm",
                "scheduler",
                "kwok",
                "kuberay-metrics",
                "kuberay-health",
            ),
            previous.ports,
        )
        p = state.ports
        state.server = f"https://127.0.0.1:{p['apiserver']}"
        kubeconfigs = self._write_kubeconfigs(pki, state.server)
        state.save(self._state_file)

        def start(
            name: str, argv: list[str], health: str, env: dict[str, str] | None = None
        ) -> None:
            state.components.append(self._spawn(name, argv, health, env))
            state.save(self._state_file)

        with self._step("etcd"):
            start("etcd", self._etcd_argv(tc, p), f"http://127.0.0.1:{p['etcd']}/health")
            self._wait("etcd", lambda: probe(f"http://127.0.0.1:{p['etcd']}/health"), timeout)
        with self._step("kube-apiserver"):
            start("kube-apiserver", self._apiserver_argv(tc, pki, p), state.server + "/readyz")
            client = self.client()
            self._wait("kube-apiserver", lambda: client.ok("/readyz"), timeout)
        with self._step(f"KubeRay CRDs (server-side apply, {len(tc.kuberay_crds)})"):
            self._apply_crds(client, tc.kuberay_crds, timeout)
        with self._step("controller-manager, scheduler, kwok, KubeRay operator"):
            start(
                "kube-controller-manager",
                self._kcm_argv(tc, pki, kubeconfigs, p),
                f"https://127.0.0.1:{p['kcm']}/healthz",
            )
            start(
                "kube-scheduler",
                self._scheduler_argv(tc, kubeconfigs, p),
                f"https://127.0.0.1:{p['scheduler']}/healthz",
            )
            start(
                "kwok", self._kwok_argv(tc, kubeconfigs, p), f"http://127.0.0.1:{p['kwok']}/healthz"
            )
            start(
                "ray-operator",
                [
                    str(tc.path("ray-operator")),
                    f"--metrics-addr=127.0.0.1:{p['kuberay-metrics']}",
                    f"--health-probe-bind-address=127.0.0.1:{p['kuberay-health']}",
                    "--enable-leader-election=false",
                    "--log-stdout-encoder=console",
                ],
                f"http://127.0.0.1:{p['kuberay-health']}/healthz",
                {"KUBECONFIG": str(kubeconfigs["kuberay"])},
            )
            ready = self._clock() + timeout  # one deadline for the four started together
            for rec in state.components[2:]:
                left = max(0.0, ready - self._clock())
                self._wait(rec.name, functools.partial(probe, rec.health), left)
        with self._step("default ServiceAccount (token controllers working)"):
            self._wait(
                "default ServiceAccount",
                lambda: (
                    client.get("/api/v1/namespaces/default/serviceaccounts/default") is not None
                ),
                timeout,
            )
        self.console.print(
            f"[bold green]dev cluster up[/] at {state.server}; KUBECONFIG={self.kubeconfig}"
        )

    def _spawn(
        self, name: str, argv: list[str], health: str, env: dict[str, str] | None
    ) -> ComponentRecord:
        """Start one component in its own session (own process group), logging to a file."""
        log = self.logs_dir / f"{name}.log"
        full_env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        full_env.update(env or {})
        with log.open("ab") as fh:
            fh.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.state_dir,
                env=full_env,
                preexec_fn=_die_with(os.getpid()) if self.ephemeral else None,
            )
        self._children[proc.pid] = proc
        st = _proc_stat(proc.pid)
        if st is None:
            raise ClusterError(f"{name} exited at once; see {log}")
        return ComponentRecord(name, proc.pid, st[1], argv, str(log), health)

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        """Poll until ready for up to ``timeout`` seconds from now; fail fast (with the log
        tail) if a component process died."""
        deadline = self._clock() + timeout
        while True:
            if ready():
                return
            state = _State.load(self._state_file)
            for rec in state.components:
                if not _alive(rec):
                    raise ClusterError(
                        f"{rec.name} exited while waiting for {what}; log {rec.log}:\n"
                        + tail(Path(rec.log), 30)
                    )
            if self._clock() > deadline:
                raise ClusterError(f"timed out waiting for {what} ({timeout:.0f}s)")
            self._sleep(0.2)

    # argv builders
    def _etcd_argv(self, tc: toolchain.Toolchain, p: dict[str, int]) -> list[str]:
        client_url, peer_url = f"http://127.0.0.1:{p['etcd']}", f"http://127.0.0.1:{p['etcd-peer']}"
        return [
            str(tc.path("etcd")),
            "--name=gpumesh-dev",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=gpumesh-dev={peer_url}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_argv(
        self, tc: toolchain.Toolchain, pki: certs.Pki, p: dict[str, int]
    ) -> list[str]:
        return [
            str(tc.path("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={p['apiserver']}",
            f"--cert-dir={self.state_dir / 'run' / 'apiserver'}",
            f"--tls-cert-file={pki.apiserver.cert}",
            f"--tls-private-key-file={pki.apiserver.key}",
            f"--client-ca-file={pki.ca.cert}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--profiling=false",
            f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
            f"--proxy-client-key-file={pki.front_proxy_client.key}",
            # The default reconciler publishes the advertise address as the `kubernetes`
            # Endpoints, and Endpoints may not hold loopback IPs: it would log an error
            # every 10 s. Nothing in the fake cluster dials that Service anyway.
            "--endpoint-reconciler-type=none",
            *self._audit_args(),
        ]

    @property
    def audit_log(self) -> Path:
        """What gpumesh's ServiceAccounts asked the API server for (JSON lines)."""
        return self.logs_dir / "audit.log"

    def _audit_args(self) -> list[str]:
        """Record, at the Metadata level, every request of the ServiceAccounts in gpumesh's
        namespace (the operator and the agents), so tests can hold what the code does
        against what the charts grant. Nothing else is recorded."""
        policy = self.state_dir / "audit-policy.yaml"
        policy.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": [
                        {"level": "Metadata", "userGroups": [AUDITED_GROUP]},
                        {"level": "None"},
                    ],
                }
            )
        )
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=200",
            "--audit-log-maxbackup=1",
        ]

    def _kcm_argv(
        self, tc: toolchain.Toolchain, pki: certs.Pki, kc: dict[str, Path], p: dict[str, int]
    ) -> list[str]:
        own = str(kc["kube-controller-manager"])
        return [
            str(tc.path("kube-controller-manager")),
            f"--kubeconfig={own}",
            f"--authentication-kubeconfig={own}",
            f"--authorization-kubeconfig={own}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p['kcm']}",
            f"--cert-dir={self.state_dir / 'run' / 'kcm'}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca.cert}",
            f"--controllers={CONTROLLERS}",
            "--cluster-name=gpumesh-dev",
        ]

    def _scheduler_argv(
        self, tc: toolchain.Toolchain, kc: dict[str, Path], p: dict[str, int]
    ) -> list[str]:
        own = str(kc["kube-scheduler"])
        config = self.state_dir / "kube-scheduler.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubescheduler.config.k8s.io/v1",
                    "kind": "KubeSchedulerConfiguration",
                    "clientConnection": {"kubeconfig": own, "qps": 100, "burst": 200},
                    "leaderElection": {"leaderElect": False},
                }
            )
        )
        return [
            str(tc.path("kube-scheduler")),
            f"--config={config}",
            f"--authentication-kubeconfig={own}",
            f"--authorization-kubeconfig={own}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p['scheduler']}",
            f"--cert-dir={self.state_dir / 'run' / 'scheduler'}",
        ]

    def _kwok_argv(
        self, tc: toolchain.Toolchain, kc: dict[str, Path], p: dict[str, int]
    ) -> list[str]:
        """kwok with the stages passed in its config file (the binary has none built in)."""
        config = self.state_dir / "kwok.yaml"
        docs: list[str] = [
            yaml.safe_dump(
                {
                    "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
                    "kind": "KwokConfiguration",
                    # The bare binary does not default these when a config file is given.
                    "options": {
                        "nodeLeaseDurationSeconds": 40,
                        "nodeLeaseParallelism": 4,
                        "nodePlayStageParallelism": 4,
                        "podPlayStageParallelism": 4,
                        "podsOnNodeSyncParallelism": 1,
                    },
                }
            )
        ]
        docs += [stage.read_text() for stage in tc.kwok_stages]
        config.write_text("\n---\n".join(d.strip() for d in docs) + "\n")
        return [
            str(tc.path("kwok")),
            f"--kubeconfig={kc['kwok']}",
            f"--config={config}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_SELECTOR}",
            f"--cidr={POD_CIDR}",
            "--node-ip=127.0.0.1",
            f"--server-address=127.0.0.1:{p['kwok']}",
        ]

    def _write_kubeconfigs(self, pki: certs.Pki, server: str) -> dict[str, Path]:
        """Admin kubeconfig (embedded, portable) plus one per component (file paths)."""

        def doc(user: str, cert: Path, key: Path, embed: bool) -> dict[str, Any]:
            def b64(path: Path) -> str:
                return base64.b64encode(path.read_bytes()).decode()

            cluster: dict[str, str] = {"server": server}
            creds: dict[str, str]
            if embed:
                cluster["certificate-authority-data"] = b64(pki.ca.cert)
                creds = {"client-certificate-data": b64(cert), "client-key-data": b64(key)}
            else:
                cluster["certificate-authority"] = str(pki.ca.cert)
                creds = {"client-certificate": str(cert), "client-key": str(key)}
            return {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "gpumesh-dev", "cluster": cluster}],
                "users": [{"name": user, "user": creds}],
                "contexts": [
                    {"name": "gpumesh-dev", "context": {"cluster": "gpumesh-dev", "user": user}}
                ],
                "current-context": "gpumesh-dev",
            }

        out: dict[str, Path] = {}
        kdir = self.state_dir / "kubeconfigs"
        kdir.mkdir(exist_ok=True)
        for name, pair in pki.clients.items():
            path = kdir / f"{name}.yaml"
            write_private(path, yaml.safe_dump(doc(name, pair.cert, pair.key, False)))
            out[name] = path
        admin = pki.clients["admin"]
        write_private(self.kubeconfig, yaml.safe_dump(doc("admin", admin.cert, admin.key, True)))
        return out

    def _apply_crds(self, client: KubeClient, files: Sequence[Path], timeout: float) -> None:
        """Server-side apply (client-side would overflow the last-applied annotation).

        The CRDs are applied concurrently: each is ~1 MB and takes the server about a second.
        """
        crds = [crd for path in files for crd in _load_manifests(path)]

        def apply(crd: dict[str, Any]) -> None:
            name = crd["metadata"]["name"]
            client.apply(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}", crd)

        with ThreadPoolExecutor(max_workers=len(crds) or 1) as pool:
            list(pool.map(apply, crds))
        deadline = self._clock() + timeout
        for crd in crds:
            name = crd["metadata"]["name"]
            self._wait(
                f"CRD {name} Established",
                functools.partial(_crd_established, client, name),
                max(0.0, deadline - self._clock()),
            )

    # fleet
    def apply_fleet(
        self, fleet: Fleet, *, prune: bool = True, timeout: float = 90.0
    ) -> FleetApplied:
        """Apply the fleet's Nodes server-side, wait until kwok reports them Ready.

        ``prune`` deletes fleet-made Nodes no longer in the file, so the cluster matches it.
        """
        client = self.client()
        manifests = node_manifests(fleet)
        names = [m["metadata"]["name"] for m in manifests]
        with self._step(f"fleet: {len(names)} nodes applied and Ready"):
            for m in manifests:
                path = f"/api/v1/nodes/{m['metadata']['name']}"
                client.apply(path, m)
                # Status on the main resource is honoured only at create; /status updates it.
                client.apply(
                    path + "/status",
                    {
                        "apiVersion": "v1",
                        "kind": "Node",
                        "metadata": {"name": m["metadata"]["name"]},
                        "status": m["status"],
                    },
                )
            removed: list[str] = []
            if prune:
                listed = client.request("GET", f"/api/v1/nodes?labelSelector={FLEET_LABEL}%3Dtrue")
                for item in listed.get("items", []):
                    if item["metadata"]["name"] not in names:
                        client.delete(f"/api/v1/nodes/{item['metadata']['name']}")
                        removed.append(item["metadata"]["name"])
            self._wait("fleet nodes Ready", lambda: _nodes_ready(client, names), timeout)
        return FleetApplied(tuple(names), tuple(sorted(removed)))

    # down
    def down(self, *, purge: bool = False) -> None:
        """Stop every recorded process (SIGTERM, then SIGKILL); ``purge`` deletes all state."""
        if not self._state_file.exists():
            if purge:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            return
        with self._lock():
            self._stop()
        if purge:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _stop(self) -> None:
        """Stop in tiers, clients first: an apiserver whose etcd is gone hangs on SIGTERM."""
        state = _State.load(self._state_file)
        stopped: list[str] = []
        left: list[str] = []
        for tier in _STOP_TIERS:
            recs = [r for r in state.components if r.name in tier and _alive(r)]
            left += self._terminate(recs)
            stopped += [r.name for r in recs if r.name not in left]
        # Anything recorded under an unexpected name still gets stopped.
        extra = [r for r in state.components if not any(r.name in t for t in _STOP_TIERS)]
        left += self._terminate([r for r in extra if _alive(r)])
        if state.route_added:
            _remove_local_route(self.state_dir)
        state.components = [r for r in state.components if r.name in left]
        state.route_added = False
        state.save(self._state_file)
        if left:
            raise ClusterError(f"could not stop: {', '.join(left)}")
        if stopped:
            self.console.print(f"[green]✓[/] stopped {', '.join(stopped)}")

    def _terminate(self, recs: Sequence[ComponentRecord]) -> list[str]:
        """SIGTERM each process group, SIGKILL after a grace period; names still alive."""
        for rec in recs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rec.pid, signal.SIGTERM)
        self._reap(recs, 10.0)
        for rec in recs:
            if _alive(rec):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(rec.pid, signal.SIGKILL)
        self._reap(recs, 5.0)
        return [r.name for r in recs if _alive(r)]

    def _reap(self, recs: Sequence[ComponentRecord], seconds: float) -> None:
        """Wait for exits; reap our own children so they do not linger as zombies."""
        deadline = time.monotonic() + seconds
        while any(_alive(r) for r in recs) and time.monotonic() < deadline:
            time.sleep(0.1)
        for rec in recs:
            child = self._children.get(rec.pid)
            if child is None or _alive(rec):
                continue
            # A multi-threaded leader shows as a zombie before its other threads are gone,
            # and only then can it be reaped: wait for that, briefly.
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
            if child.returncode is not None:
                del self._children[rec.pid]


def _load_manifests(path: Path) -> list[dict[str, Any]]:
    """YAML documents of a file, via a JSON copy beside it: parsing ~3 MB of YAML takes ~2 s."""
    cached = path.with_name(path.name + ".json")
    if cached.exists() and cached.stat().st_mtime >= path.stat().st_mtime:
        docs: list[dict[str, Any]] = json.loads(cached.read_text())
        return docs
    loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open() as fh:
        docs = [d for d in yaml.load_all(fh, Loader=loader) if d]
    with contextlib.suppress(OSError):  # a read-only cache just stays slow
        tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(docs))
        os.replace(tmp, cached)
    return docs


def _crd_established(client: KubeClient, name: str) -> bool:
    crd = client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    conds = ((crd or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conds)


def _nodes_ready(client: KubeClient, names: Sequence[str]) -> bool:
    try:
        items = client.request("GET", "/api/v1/nodes").get("items", [])
    except (KubeApiError, OSError):
        return False
    ready = {
        n["metadata"]["name"]
        for n in items
        if any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (n.get("status") or {}).get("conditions") or []
        )
    }
    return ready.issuperset(names)


def write_private(path: Path, text: str) -> None:
    """Kubeconfigs hold keys: owner-only, replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, for failure reports."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
