"""A multi-host lab on one machine: network namespaces on a bridge, nothing leaves it.

Layout (all names carry a random 4-hex-digit tag, so parallel runs never collide):

- one "switch" namespace holding the bridge; every host namespace has a veth ``eth0``
  plugged into it, addressed in the underlay 198.51.100.0/24. The root namespace gets no
  address, route or interface: packets between hosts never touch it, let alone a real NIC.
- per host: wireguard-go (``-f``, its own process), a "pods" veth pair whose address is
  the first address of the host's pod range (what a CNI bridge would hold), and the mesh
  agent as its own process, as on a real node.
- NAT'd hosts get an nftables rule: nothing new comes in on ``eth0``; only replies to what
  they sent out (conntrack) pass, so they must be reached through a relay.
- Control plane: the local API server listens on 127.0.0.1 of the root namespace, which no
  host namespace can reach. :class:`ApiForwarder` binds 127.0.0.1:<same port> *inside* each
  host namespace (a socket made by a thread that briefly entered the namespace with
  setns(2)) and relays each connection to the root namespace's 127.0.0.1. The agents use
  the cluster's kubeconfig unchanged (same address, same certificate) and no address or
  route is added anywhere: 198.18.0.0/16 stays the control plane's local range.

Addresses: underlay 198.51.100.0/24 (and 203.0.113.0/24 if ever needed), overlay and pod
ranges inside 198.19.0.0/16. 192.0.2.0/24 is never used (a real network here).
:func:`check_ranges_free` fails before anything is created if the machine routes any of
them. :meth:`Lab.close` removes every namespace, veth, bridge, process, socket and
directory it created, also after a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

UNDERLAY: Final = ipaddress.IPv4Network("198.51.100.0/24")
MESH_RANGE: Final = ipaddress.IPv4Network("198.19.0.0/16")
NEVER: Final = ipaddress.IPv4Network("192.0.2.0/24")
WG_RUN_DIR: Final = Path("/var/run/wireguard")
NETNS_DIR: Final = Path("/var/run/netns")
CLONE_NEWNET: Final = 0x40000000
REPO: Final = Path(__file__).resolve().parents[1]
GPUNODES_PATH: Final = "/apis/gpumesh.io/v1alpha1/gpunodes"


class LabError(RuntimeError):
    """The lab cannot be built here (not root, tools missing, ranges in use)."""


def missing_prerequisites() -> str | None:
    """Why the lab cannot run on this machine, or None (a failure to fix, not a skip:
    `make test` installs what the lab needs)."""
    if os.geteuid() != 0:
        return "needs root (it makes network namespaces): run the tests as root"
    for tool in ("ip", "wireguard-go", "wg", "nft", "ping"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run `make system-packages` as root"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (wireguard-go needs TUN)"
    return None


def _ip_json(*argv: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-j", *argv], capture_output=True, text=True, check=True).stdout
    data = json.loads(out or "[]")
    return data if isinstance(data, list) else []


def check_ranges_free(ranges: Sequence[ipaddress.IPv4Network]) -> None:
    """Fail clearly if the root namespace routes or holds an address in any of ``ranges``."""
    for net in ranges:
        if net.overlaps(NEVER):
            raise LabError(f"{net} overlaps {NEVER}, a real network on these machines")
    clashes: list[str] = []
    for route in _ip_json("route", "show", "table", "all"):
        dst = str(route.get("dst", ""))
        if dst in ("", "default"):
            continue
        try:
            routed = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if isinstance(routed, ipaddress.IPv4Network) and routed.prefixlen > 0:
            for ours in ranges:
                if routed.overlaps(ours):
                    clashes.append(f"route {dst} dev {route.get('dev', '?')} overlaps {ours}")
    for link in _ip_json("addr", "show"):
        for info in link.get("addr_info", []) or []:  # type: ignore[attr-defined]
            local = info.get("local", "")
            try:
                address = ipaddress.ip_address(local)
            except ValueError:
                continue
            for ours in ranges:
                if address in ours:
                    clashes.append(f"address {local} on {link.get('ifname')} is in {ours}")
    if clashes:
        raise LabError("test address ranges are in use on this machine: " + "; ".join(clashes))


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 20.0) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> {done.returncode}: {done.stderr.strip()[:500]}")
    return done.stdout


def ns_run(ns: str, *argv: str, check: bool = True, timeout: float = 20.0) -> str:
    return run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout)


# --- a socket inside another namespace ----------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def listen_in_netns(ns: str, address: tuple[str, int]) -> socket.socket:
    """A listening TCP socket that lives in namespace ``ns``.

    setns(2) changes only the calling thread, so a short-lived thread enters ``ns``, makes
    the socket and leaves; the socket stays in ``ns`` for good, and this process's other
    threads never change namespace.
    """
    box: dict[str, object] = {}

    def worker() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(NETNS_DIR / ns, os.O_RDONLY)
        try:
            _setns(there)
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen(64)
                box["sock"] = sock
            finally:
                _setns(home)
        except OSError as err:
            box["error"] = err
        finally:
            os.close(home)
            os.close(there)

    thread = threading.Thread(target=worker, name=f"setns-{ns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise LabError(f"cannot listen on {address} in {ns}: {box['error']}")
    sock = box["sock"]
    assert isinstance(sock, socket.socket)
    return sock


class ApiForwarder:
    """Relays connections to 127.0.0.1:port in a namespace to 127.0.0.1:port here."""

    def __init__(self, ns: str, port: int) -> None:
        self.ns = ns
        self.port = port
        self._listener = listen_in_netns(ns, ("127.0.0.1", port))
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name=f"fwd-{ns}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                inner, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                outer = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                inner.close()
                continue
            outer.settimeout(None)
            inner.settimeout(None)
            with self._lock:
                self._conns += [inner, outer]
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.close()
        self._thread.join(timeout=2)


# --- hosts --------------------------------------------------------------------------------


@dataclass
class Host:
    """One simulated supplier node."""

    index: int
    name: str
    ns: str
    interface: str
    underlay_ip: str
    public: bool
    key_dir: Path
    log_dir: Path
    listen_port: int = 51820
    wireguard: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    forwarder: ApiForwarder | None = None
    pod_address: str | None = None
    pod_cidr: str | None = None
    overlay_ip: str | None = None
    alive: bool = True

    @property
    def endpoint(self) -> str:
        return f"{self.underlay_ip}:{self.listen_port}"

    @property
    def agent_log(self) -> Path:
        return self.log_dir / "agent.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.agent_log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


@dataclass
class Lab:
    """Builds hosts on demand; :meth:`close` undoes everything, whatever happened."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    base_dir: Path | None = None
    hosts: list[Host] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _sockets: list[Path] = field(default_factory=list)
    _forwarders: list[ApiForwarder] = field(default_factory=list)
    _open: bool = False

    @property
    def switch(self) -> str:
        return f"gm{self.tag}sw"

    def open(self) -> Lab:
        why = missing_prerequisites()
        if why:
            raise LabError(why)
        check_ranges_free([UNDERLAY, MESH_RANGE])
        if self.base_dir is None:
            import tempfile

            self.base_dir = Path(tempfile.mkdtemp(prefix=f"gpumesh-lab-{self.tag}-"))
        self._open = True
        self._add_ns(self.switch)
        ns_run(self.switch, "ip", "link", "add", "br0", "type", "bridge")
        ns_run(self.switch, "ip", "link", "set", "br0", "up")
        return self

    def __enter__(self) -> Lab:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        ns_run(ns, "ip", "link", "set", "lo", "up")

    def add_host(self, index: int, *, public: bool, name_prefix: str = "mesh") -> Host:
        assert self.base_dir is not None
        ns = f"gm{self.tag}h{index}"
        underlay = UNDERLAY.network_address + 10 + index
        host = Host(
            index=index,
            name=f"{name_prefix}-{self.tag}-h{index}",
            ns=ns,
            interface=f"gmw{self.tag}{index}",  # UAPI sockets are global: unique names
            underlay_ip=str(underlay),
            public=public,
            key_dir=self.base_dir / f"h{index}" / "keys",
            log_dir=self.base_dir / f"h{index}",
        )
        host.log_dir.mkdir(parents=True, exist_ok=True)
        self._add_ns(ns)
        veth = f"gmv{self.tag}{index}"
        peer = ("peer", "name", "eth0", "netns", ns)
        run(["ip", "link", "add", veth, "netns", self.switch, "type", "veth", *peer])
        ns_run(self.switch, "ip", "link", "set", veth, "master", "br0", "up")
        ns_run(ns, "ip", "addr", "add", f"{underlay}/{UNDERLAY.prefixlen}", "dev", "eth0")
        ns_run(ns, "ip", "link", "set", "eth0", "up")
        if not public:
            self._firewall(ns)
        self.hosts.append(host)
        return host

    @staticmethod
    def _firewall(ns: str) -> None:
        """Accept nothing new from the underlay: only replies to what the host sent."""
        rules = (
            "table inet gpumesh_nat {\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            '    iifname "eth0" ct state established,related accept\n'
            '    iifname "eth0" counter drop\n'
            "  }\n"
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"],
            input=rules.encode(),
            check=True,
            capture_output=True,
            timeout=10,
        )

    def add_pod_address(self, host: Host, pod_cidr: str) -> str:
        """Put the first address of ``pod_cidr`` on a veth pair in the host (a CNI bridge's
        role); returns that address. This kernel has no dummy interfaces."""
        net = ipaddress.IPv4Network(pod_cidr)
        address = str(net.network_address + 1)
        ns_run(host.ns, "ip", "link", "add", "pods0", "type", "veth", "peer", "name", "pods0p")
        ns_run(host.ns, "ip", "addr", "add", f"{address}/{net.prefixlen}", "dev", "pods0")
        ns_run(host.ns, "ip", "link", "set", "pods0p", "up")
        ns_run(host.ns, "ip", "link", "set", "pods0", "up")
        host.pod_address = address
        host.pod_cidr = pod_cidr
        return address

    def start_wireguard(self, host: Host) -> None:
        sock = WG_RUN_DIR / f"{host.interface}.sock"
        if sock.exists():
            raise LabError(f"{sock} already exists: another run uses {host.interface}?")
        self._sockets.append(sock)
        log = (host.log_dir / "wireguard-go.log").open("wb")
        host.wireguard = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, "wireguard-go", "-f", host.interface],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self._procs.append(host.wireguard)
        deadline = time.monotonic() + 10
        while not sock.is_socket():
            if host.wireguard.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"wireguard-go for {host.interface} did not start")
            time.sleep(0.02)

    def forward_api(self, host: Host, port: int) -> None:
        host.forwarder = ApiForwarder(host.ns, port)
        self._forwarders.append(host.forwarder)

    def start_agent(self, host: Host, args: Sequence[str]) -> None:
        log = host.agent_log.open("ab")
        host.agent = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                host.ns,
                sys.executable,
                "-m",
                "gpumesh.node_agent.wg",
                "run",
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=REPO,
        )
        log.close()
        self._procs.append(host.agent)

    def signal_agent(self, host: Host, signum: int) -> None:
        if host.agent is not None and host.agent.poll() is None:
            host.agent.send_signal(signum)

    def kill(self, host: Host) -> None:
        """The host dies: its processes are killed and its cable is pulled."""
        for proc in (host.agent, host.wireguard):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        ns_run(self.switch, "ip", "link", "set", f"gmv{self.tag}{host.index}", "down")
        host.alive = False

    def ping(self, src: Host, dst: str, source: str | None = None, wait_s: int = 1) -> bool:
        argv = ["ping", "-c", "1", "-W", str(wait_s), "-q"]
        if source:
            argv += ["-I", source]
        done = subprocess.run(
            ["ip", "netns", "exec", src.ns, *argv, dst], capture_output=True, timeout=wait_s + 10
        )
        return done.returncode == 0

    def unreachable_pairs(
        self, hosts: Sequence[Host], *, involving: Host | None = None
    ) -> list[str]:
        """Every (from, to) pair where the overlay or the pod address did not answer;
        with ``involving``, only the pairs to and from that host."""
        jobs: list[tuple[str, Host, str, str | None]] = []
        for a in hosts:
            for b in hosts:
                if a is b or (involving is not None and involving not in (a, b)):
                    continue
                assert b.overlay_ip and b.pod_address and a.pod_address
                jobs.append((f"{a.name}->{b.name} overlay", a, b.overlay_ip, None))
                jobs.append((f"{a.name}->{b.name} pods", a, b.pod_address, a.pod_address))
        # One worker per probe: a round with failures then costs one ping timeout (1 s).
        with ThreadPoolExecutor(max_workers=min(len(jobs), 96) or 1) as pool:
            answers = list(pool.map(lambda j: self.ping(j[1], j[2], j[3]), jobs))
        return [job[0] for job, ok in zip(jobs, answers, strict=True) if not ok]

    def wait_connected(
        self, hosts: Sequence[Host], timeout: float, *, involving: Host | None = None
    ) -> float:
        """Seconds until every pair answers; raises AssertionError with the failures."""
        started = time.monotonic()
        failures: list[str] = []
        while time.monotonic() - started < timeout:
            failures = self.unreachable_pairs(hosts, involving=involving)
            if not failures:
                return time.monotonic() - started
        raise AssertionError(
            f"no full connectivity after {timeout:.0f}s; {len(failures)} failing, e.g. "
            f"{failures[:6]}\n" + "\n".join(f"--- {h.name}\n{h.log_tail(12)}" for h in hosts)
        )

    def close(self) -> None:
        """Remove everything this lab made; safe to call twice and after any failure."""
        for fwd in self._forwarders:
            with contextlib.suppress(Exception):
                fwd.close()
        self._forwarders.clear()
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs.clear()
        for ns in reversed(self._namespaces):
            run(["ip", "netns", "del", ns], check=False)
        self._namespaces.clear()
        for sock in self._sockets:
            sock.unlink(missing_ok=True)
        self._sockets.clear()
        if self.base_dir is not None and self._open:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        self._open = False

    def leftovers(self) -> list[str]:
        """Anything of this lab still present (for the test's final assertion)."""
        out = [ns for ns in run(["ip", "netns", "list"]).split() if ns.startswith(f"gm{self.tag}")]
        out += [str(p) for p in WG_RUN_DIR.glob(f"gmw{self.tag}*")] if WG_RUN_DIR.exists() else []
        return out


@contextlib.contextmanager
def lab(tag: str | None = None) -> Iterator[Lab]:
    with Lab(tag=tag or secrets.token_hex(2)) as opened:
        yield opened
