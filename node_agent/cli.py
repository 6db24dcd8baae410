"""``gpumesh agent``: the node agent's command line (a typer sub-app).

Mounted by the main CLI as ``gpumesh agent``; also runnable alone as
``python -m gpumesh.node_agent run ...``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gpumesh.api.mesh import valid_endpoint
from gpumesh.node_agent.agent import Agent, AgentConfig
from gpumesh.node_agent.health import DEFAULT_APP_XIDS, DEFAULT_RESET_XIDS, HealthPolicy
from gpumesh.node_agent.nvml.types import NvmlBackend
from gpumesh.node_agent.wg import cli as mesh_cli
from gpumesh.node_agent.wg.agent import MeshAgent

if TYPE_CHECKING:
    from gpumesh.node_agent.nvml.fake import FleetNodeScript

app = typer.Typer(
    name="agent",
    help="The gpumesh node agent: GPU health, metrics and reports for one node.",
    no_args_is_help=True,
    add_completion=False,
)

app.add_typer(mesh_cli.app, name="mesh")

log = logging.getLogger("gpumesh.node_agent")


def _xids(text: str | None, default: frozenset[int], flag: str) -> frozenset[int]:
    if text is None:
        return default
    try:
        return frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{flag} takes comma-separated XID numbers, as 48,79") from None


def setup_logging(level: str) -> None:
    """The agent's one logging setup: one line per record on stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


NodeOption = Annotated[
    str | None,
    typer.Option(envvar="NODE_NAME", help="Kubernetes node name (default: host name)."),
]
FakeNvmlOption = Annotated[
    Path | None,
    typer.Option(
        "--fake-nvml",
        exists=True,
        dir_okay=False,
        help="Fleet file: play this node's GPUs and scripted faults instead of NVML.",
    ),
]
FakeNodeOption = Annotated[str | None, typer.Option(help="Fleet node to play (default: --node).")]
LogLevelOption = Annotated[str, typer.Option(help="debug, info, warning or error.")]


@app.callback()
def main() -> None:
    """The gpumesh node agent."""


@app.command()
def run(
    node: NodeOption = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            envvar="KUBECONFIG",
            help="Kubeconfig; in a pod the service account is used. Neither: metrics only.",
        ),
    ] = None,
    fake_nvml: FakeNvmlOption = None,
    fake_node: FakeNodeOption = None,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between sweeps.")] = 5.0,
    metrics_host: Annotated[str, typer.Option(help="Address for /metrics.")] = "0.0.0.0",
    metrics_port: Annotated[int, typer.Option(min=0, max=65535, help="0: any free port.")] = 9440,
    dcgm_names: Annotated[
        bool, typer.Option(help="Also emit dcgm-exporter metric names (DCGM_FI_DEV_*).")
    ] = False,
    supplier: Annotated[
        str | None, typer.Option(help="Supplier, to create a missing GPUNode.")
    ] = None,
    region: Annotated[str | None, typer.Option(help="Region, to create a missing GPUNode.")] = None,
    price: Annotated[
        str | None, typer.Option(help='Price per GPU-hour, as "2.10", to create a GPUNode.')
    ] = None,
    head_capable: Annotated[
        bool, typer.Option(help="Mark a GPUNode the agent creates as able to host Ray heads.")
    ] = False,
    public_endpoint: Annotated[
        str | None,
        typer.Option(
            help="host:port where this node's WireGuard is reachable from anywhere (sets "
            "spec.publicEndpoint of a GPUNode the agent creates; first mesh endpoint)."
        ),
    ] = None,
    namespace: Annotated[
        str, typer.Option(help="Namespace of the heartbeat Lease and the mesh catalogue.")
    ] = "gpumesh-system",
    lease_renew: Annotated[float, typer.Option(min=1, help="Seconds between renewals.")] = 10.0,
    lease_duration: Annotated[
        int,
        typer.Option(
            min=2,
            help="Seconds the heartbeat Lease lasts unrenewed; once it lapses the operator "
            "marks this node Lost. Longer than --lease-renew.",
        ),
    ] = 40,
    heartbeat: Annotated[
        float, typer.Option(min=1, help="Most seconds between GPUNode status writes.")
    ] = 30.0,
    reset_xids: Annotated[
        str | None, typer.Option(help="XIDs that need a GPU reset (comma-separated).")
    ] = None,
    app_xids: Annotated[
        str | None,
        typer.Option(help="Application XIDs, escalated only on repetition (comma-separated)."),
    ] = None,
    log_level: LogLevelOption = "info",
    mesh: Annotated[
        bool, typer.Option("--mesh/--no-mesh", help="Also run the WireGuard mesh agent.")
    ] = False,
    mesh_interface: Annotated[str, typer.Option(help="WireGuard interface name.")] = "gpumesh0",
    mesh_backend: Annotated[
        str, typer.Option(help="uapi (wireguard-go) or netlink (kernel module).")
    ] = "uapi",
    mesh_key_dir: Annotated[
        Path,
        typer.Option(envvar="GPUMESH_KEY_DIR", help="Host path holding the private key (0600)."),
    ] = Path("/var/lib/gpumesh/wireguard"),
    mesh_listen_port: Annotated[int, typer.Option(help="UDP port WireGuard listens on.")] = 51820,
    mesh_mtu: Annotated[
        int, typer.Option(help="1420 in a data centre, 1280 across the internet.")
    ] = 1420,
    mesh_endpoint: Annotated[
        list[str] | None,
        typer.Option(help="More endpoint candidates host:port to publish (repeat; best first)."),
    ] = None,
    mesh_advertise_host_addresses: Annotated[
        bool, typer.Option(help="Also publish this host's addresses as candidates.")
    ] = False,
    mesh_spawn_wireguard_go: Annotated[
        bool, typer.Option(help="Start wireguard-go when its socket is missing.")
    ] = False,
    mesh_metrics_port: Annotated[
        int, typer.Option(help="Serve the mesh's /metrics here (0: off).")
    ] = 0,
) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    from gpumesh.node_agent.kube import RestKubeApi
    from gpumesh.node_agent.report import ReportConfig

    setup_logging(log_level)
    node_name = node or socket.gethostname()
    if lease_duration <= lease_renew:
        raise typer.BadParameter(
            f"{lease_duration} s would lapse before the next renewal ({lease_renew} s)",
            param_hint="--lease-duration",
        )
    try:
        policy = HealthPolicy(
            reset_xids=_xids(reset_xids, DEFAULT_RESET_XIDS, "--reset-xids"),
            app_xids=_xids(app_xids, DEFAULT_APP_XIDS, "--app-xids"),
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    backend, script = _backend(fake_nvml, fake_node or node_name)
    if script is not None:
        supplier = supplier or script.supplier
        region = region or script.region
        price = price or script.price_per_gpu_hour
    api = RestKubeApi.connect(str(kubeconfig) if kubeconfig else None)
    if api is None:
        log.warning("no kubeconfig and not in a pod: serving metrics only, reporting nothing")
    config = AgentConfig(
        node=node_name,
        interval_s=interval,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        dcgm_names=dcgm_names,
        policy=policy,
    )
    report = ReportConfig(
        node=node_name,
        supplier=supplier,
        region=region,
        price_per_gpu_hour=price,
        head_capable=head_capable,
        public_endpoint=public_endpoint,
        namespace=namespace,
        lease_renew_s=lease_renew,
        lease_duration_s=lease_duration,
        heartbeat_s=heartbeat,
    )
    mesh_agent: MeshAgent | None = None
    if mesh:
        if api is None:
            raise typer.BadParameter("--mesh needs the Kubernetes API", param_hint="--kubeconfig")
        if public_endpoint is not None and not valid_endpoint(public_endpoint):
            raise typer.BadParameter(f"{public_endpoint!r} is not host:port")
        mesh_agent = mesh_cli.build_mesh_agent(
            api,
            node=node_name,
            interface=mesh_interface,
            backend=mesh_backend,
            key_dir=mesh_key_dir,
            listen_port=mesh_listen_port,
            mtu=mesh_mtu,
            endpoints=[*([public_endpoint] if public_endpoint else []), *(mesh_endpoint or [])],
            advertise_host_addresses=mesh_advertise_host_addresses,
            namespace=namespace,
            spawn_wireguard_go=mesh_spawn_wireguard_go,
        )
        if mesh_metrics_port and mesh_agent.collector is not None:
            from prometheus_client import start_http_server

            from gpumesh.node_agent.wg.metrics import registry_with

            registry = registry_with(mesh_agent.collector)
            start_http_server(mesh_metrics_port, metrics_host, registry=registry)
    agent = Agent(config, backend, api=api, report=report)
    asyncio.run(_serve(agent, mesh_agent))


def _backend(fake_nvml: Path | None, fake_node: str) -> tuple[NvmlBackend, FleetNodeScript | None]:
    """Real NVML, or the fake playing ``fake_node`` of a fleet file (and that node's script)."""
    if fake_nvml is None:
        from gpumesh.node_agent.nvml.real import PynvmlBackend

        return PynvmlBackend(), None
    from gpumesh.node_agent.nvml.fake import fake_from_fleet, load_fleet_node

    try:
        script = load_fleet_node(fake_nvml, fake_node)
    except (KeyError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="--fake-nvml") from None
    log.info("fake NVML: %d GPUs, %d scripted faults", len(script.gpus), len(script.faults))
    return fake_from_fleet(script), script


@app.command()
def probe(
    node: NodeOption = None,
    proof: Annotated[
        bool,
        typer.Option("--proof/--no-proof", help="Also answer and check a proof-of-GPU challenge."),
    ] = False,
    fake_nvml: FakeNvmlOption = None,
    fake_node: FakeNodeOption = None,
    log_level: LogLevelOption = "warning",
) -> None:
    """Print what the agent sees on this host as JSON, once: NVML, each GPU's identity,
    readings and health, and with --proof a challenge answered and checked here, as the
    operator would. Exits 1 unless the node is fit to join (NVML answers, every GPU Healthy
    or Degraded, the proof right when asked for)."""
    from gpumesh.clock import SystemClock
    from gpumesh.node_agent.probe import probe as probe_node

    setup_logging(log_level)
    node_name = node or socket.gethostname()
    backend, _script = _backend(fake_nvml, fake_node or node_name)
    report, fit = probe_node(backend, node_name, SystemClock(), proof=proof)
    typer.echo(json.dumps(report, indent=2, default=str))
    raise typer.Exit(0 if fit else 1)


async def _serve(agent: Agent, mesh: MeshAgent | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("agent for node %s starting (pid %d)", agent.config.node, os.getpid())
    mesh_stop = threading.Event()
    mesh_thread: threading.Thread | None = None
    if mesh is not None:
        # The mesh loop blocks (device I/O, its own catalogue watch): its own thread. The
        # heartbeat Lease stays the reporter's; the mesh loop renews none of its own.
        mesh_thread = threading.Thread(
            target=_run_mesh, args=(mesh, mesh_stop, stop, loop), name="mesh", daemon=True
        )
        mesh_thread.start()
        loop.add_signal_handler(signal.SIGHUP, mesh.request_resync)
        loop.add_signal_handler(signal.SIGUSR1, mesh.request_rotation)
    try:
        await agent.run(stop)
    finally:
        mesh_stop.set()
        if mesh is not None and mesh_thread is not None:
            mesh.wake.set()
            await loop.run_in_executor(None, mesh_thread.join, 10.0)
    log.info("agent stopped")


def _run_mesh(
    mesh: MeshAgent,
    mesh_stop: threading.Event,
    stop: asyncio.Event,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """The mesh loop; if it dies, the whole agent stops (and Kubernetes restarts it)."""
    try:
        mesh.run(mesh_stop)
    except Exception:
        log.exception("mesh agent failed: stopping the node agent")
        loop.call_soon_threadsafe(stop.set)
