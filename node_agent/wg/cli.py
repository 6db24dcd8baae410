"""The mesh agent's command line: ``python -m gpumesh.node_agent.wg run ...``.

Signals: SIGTERM/SIGINT stop the loop (the device and its sessions stay up), SIGHUP forces
a sync now, SIGUSR1 rotates the key pair.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Literal

import typer

from gpumesh.api.gpunode import MAX_RTT_PEERS
from gpumesh.api.mesh import CATALOGUE_NAME, valid_endpoint
from gpumesh.node_agent.kube import RestKubeApi
from gpumesh.node_agent.wg.agent import MeshAgent, MeshAgentConfig
from gpumesh.node_agent.wg.device import NetlinkBackend, UapiBackend, WgBackend
from gpumesh.node_agent.wg.echo import MeshEcho
from gpumesh.node_agent.wg.keys import KeyStore
from gpumesh.node_agent.wg.links import LinkManager, host_addresses
from gpumesh.node_agent.wg.metrics import MeshCollector, registry_with
from gpumesh.node_agent.wg.peers import DEFAULT_KEEPALIVE_S
from gpumesh.node_agent.wg.rtt import DEFAULT_RTT_PORT, RttPolicy
from gpumesh.node_agent.wg.sync import DEFAULT_LISTEN_PORT, DEFAULT_MTU, MeshSyncer

app = typer.Typer(
    name="mesh",
    help="The gpumesh WireGuard mesh agent for one node.",
    no_args_is_help=True,
    add_completion=False,
)
log = logging.getLogger("gpumesh.node_agent.wg")


@app.callback()
def main() -> None:
    """The gpumesh WireGuard mesh agent."""


@app.command()
def run(
    node: Annotated[str, typer.Option(envvar="NODE_NAME", help="This node's GPUNode name.")],
    interface: Annotated[str, typer.Option(help="WireGuard interface name.")] = "gpumesh0",
    backend: Annotated[
        str, typer.Option(help="uapi (wireguard-go) or netlink (kernel module).")
    ] = "uapi",
    key_dir: Annotated[Path, typer.Option(help="Host path holding the private key (0600).")] = Path(
        "/var/lib/gpumesh/wireguard"
    ),
    listen_port: Annotated[int, typer.Option(help="UDP port WireGuard listens on.")] = (
        DEFAULT_LISTEN_PORT
    ),
    mtu: Annotated[int, typer.Option(help="1420 in a data centre, 1280 across the internet.")] = (
        DEFAULT_MTU
    ),
    keepalive: Annotated[int, typer.Option(help="Persistent keepalive for NAT'd paths, s.")] = (
        DEFAULT_KEEPALIVE_S
    ),
    endpoint: Annotated[
        list[str] | None,
        typer.Option(help="Endpoint candidate host:port to publish (repeat; best first)."),
    ] = None,
    advertise_host_addresses: Annotated[
        bool, typer.Option(help="Also publish this host's addresses as candidates.")
    ] = False,
    kubeconfig: Annotated[
        str | None, typer.Option(envvar="KUBECONFIG", help="Else the in-cluster account.")
    ] = None,
    namespace: Annotated[str, typer.Option(help="Namespace of the catalogue.")] = (
        "gpumesh-system"
    ),
    catalogue: Annotated[str, typer.Option(help="Catalogue ConfigMap name.")] = CATALOGUE_NAME,
    resync: Annotated[float, typer.Option(help="Drift-repair sync period, s.")] = 30.0,
    status_check: Annotated[
        float, typer.Option(help="Re-read our GPUNode's mesh status this often, s.")
    ] = 60.0,
    rtt_interval: Annotated[
        float, typer.Option(help="Measure RTTs to mesh members this often, s (0: off).")
    ] = 10.0,
    rtt_port: Annotated[
        int, typer.Option(help="UDP port of the RTT echo on overlay addresses (mesh-wide).")
    ] = DEFAULT_RTT_PORT,
    rtt_max_peers: Annotated[
        int, typer.Option(help="Publish RTTs to at most this many (nearest) members.")
    ] = 256,
    rtt_publish_min: Annotated[
        float, typer.Option(help="Least time between status writes for RTTs alone, s.")
    ] = 60.0,
    lease_duration: Annotated[
        int, typer.Option(help="Renew our own heartbeat Lease (0: the node agent does).")
    ] = 0,
    lease_renew: Annotated[float, typer.Option(help="Lease renew period, s.")] = 10.0,
    spawn_wireguard_go: Annotated[
        bool, typer.Option(help="Start wireguard-go when its socket is missing.")
    ] = False,
    metrics_port: Annotated[int, typer.Option(help="Serve /metrics here (0: off).")] = 0,
    metrics_address: Annotated[str, typer.Option(help="Metrics bind address.")] = "0.0.0.0",
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
) -> None:
    """Run the mesh loop until SIGTERM."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    api = RestKubeApi.connect(kubeconfig)
    if api is None:
        raise typer.BadParameter("no --kubeconfig and not in a cluster", param_hint="--kubeconfig")
    agent = build_mesh_agent(
        api,
        node=node,
        interface=interface,
        backend=backend,
        key_dir=key_dir,
        listen_port=listen_port,
        mtu=mtu,
        keepalive=keepalive,
        endpoints=list(endpoint or []),
        advertise_host_addresses=advertise_host_addresses,
        namespace=namespace,
        catalogue=catalogue,
        resync=resync,
        lease_duration=lease_duration,
        lease_renew=lease_renew,
        spawn_wireguard_go=spawn_wireguard_go,
        status_check=status_check,
        rtt_interval=rtt_interval,
        rtt_port=rtt_port,
        rtt_max_peers=rtt_max_peers,
        rtt_publish_min=rtt_publish_min,
    )
    if metrics_port and agent.collector is not None:
        from gpumesh.serve import HttpServer, registry_route

        metrics = registry_route(registry_with(agent.collector))
        HttpServer(metrics_address, metrics_port, {"/metrics": metrics}).start("metrics-http")
    stop = threading.Event()

    def on_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda *_: agent.request_resync())
    signal.signal(signal.SIGUSR1, lambda *_: agent.request_rotation())
    try:
        agent.run(stop)
    finally:
        api.close()
    sys.exit(0)


def build_mesh_agent(
    api: RestKubeApi,
    *,
    node: str,
    interface: str = "gpumesh0",
    backend: str = "uapi",
    key_dir: Path = Path("/var/lib/gpumesh/wireguard"),
    listen_port: int = DEFAULT_LISTEN_PORT,
    mtu: int = DEFAULT_MTU,
    keepalive: int = DEFAULT_KEEPALIVE_S,
    endpoints: list[str] | None = None,
    advertise_host_addresses: bool = False,
    namespace: str = "gpumesh-system",
    catalogue: str = CATALOGUE_NAME,
    resync: float = 30.0,
    lease_duration: int = 0,
    lease_renew: float = 10.0,
    spawn_wireguard_go: bool = False,
    status_check: float = 60.0,
    rtt_interval: float = 10.0,
    rtt_port: int = DEFAULT_RTT_PORT,
    rtt_max_peers: int = 256,
    rtt_publish_min: float = 60.0,
) -> MeshAgent:
    """The mesh loop for one node, from command-line values (``gpumesh agent run --mesh``
    builds it the same way). Raises typer.BadParameter for unusable values."""
    kind = _backend_kind(backend)
    if not 0 <= rtt_max_peers <= MAX_RTT_PEERS:
        raise typer.BadParameter(
            f"0 to {MAX_RTT_PEERS} (the API's bound)", param_hint="--rtt-max-peers"
        )
    candidates = list(endpoints or [])
    for e in candidates:
        if not valid_endpoint(e):
            raise typer.BadParameter(f"{e!r} is not host:port", param_hint="--endpoint")
    if advertise_host_addresses:
        candidates += [f"{a}:{listen_port}" for a in host_addresses(exclude=[interface])]
    links = LinkManager(interface)
    device: WgBackend
    if kind == "netlink":
        device = NetlinkBackend(interface, create_link=links.create_wireguard)
    else:
        device = UapiBackend(interface, spawn=spawn_wireguard_go)
    syncer = MeshSyncer(
        node,
        device,
        KeyStore(key_dir),
        links,
        listen_port=listen_port,
        mtu=mtu,
        keepalive_s=keepalive,
    )
    config = MeshAgentConfig(
        node=node,
        namespace=namespace,
        catalogue=catalogue,
        endpoints=tuple(dict.fromkeys(candidates)),
        resync_s=resync,
        status_check_s=status_check,
        rtt_publish_min_s=rtt_publish_min,
        rtt_policy=RttPolicy(max_peers=rtt_max_peers),
        lease_duration_s=lease_duration or None,
        lease_renew_s=lease_renew,
    )
    agent = MeshAgent(config, api, syncer, MeshCollector(node))
    if rtt_interval > 0:
        agent.rtt = MeshEcho(port=rtt_port, interval_s=rtt_interval, on_round=agent.wake.set)
    return agent


def _backend_kind(text: str) -> Literal["uapi", "netlink"]:
    if text == "uapi":
        return "uapi"
    if text == "netlink":
        return "netlink"
    raise typer.BadParameter("choose uapi or netlink", param_hint="--backend")
