"""`gpumesh operator ...`: run the operator process."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    help="The gpumesh operator (GPUCluster, Job, mesh planning).", no_args_is_help=True
)


@app.command()
def run(
    liveness: Annotated[
        str, typer.Option(help="Health endpoint (/healthz), as http://0.0.0.0:8080/healthz.")
    ] = "http://127.0.0.1:8080/healthz",
    json_logs: Annotated[bool, typer.Option("--json-logs/--text-logs", help="Log format.")] = True,
    verbose: Annotated[bool, typer.Option(help="Debug logging.")] = False,
    metrics_port: Annotated[
        int,
        typer.Option(help="Port of the Prometheus /metrics endpoint (GPU time, cost); 0 is off."),
    ] = 9090,
    metrics_host: Annotated[
        str, typer.Option(help="Address the metrics endpoint listens on.")
    ] = "0.0.0.0",
) -> None:
    """Stand for leader, then watch the whole cluster and reconcile gpumesh objects.

    Every replica serves /healthz and /metrics at once; only the one that holds the
    leader Lease reconciles. The others wait, and take over when the leader stops.
    """
    import asyncio
    import logging
    import os
    import signal
    import socket
    import threading
    import uuid
    from urllib.parse import urlsplit

    import kopf
    import uvloop
    from prometheus_client import REGISTRY

    import gpumesh.operator.handlers  # noqa: F401  (registers the handlers)
    from gpumesh.operator import heap, kube, leader
    from gpumesh.operator.handlers import lifecycle
    from gpumesh.operator.settings import SETTINGS
    from gpumesh.serve import HttpServer, health_route, registry_route

    heap.tune()
    kopf.configure(
        verbose=verbose, log_format=kopf.LogFormat.JSON if json_logs else kopf.LogFormat.FULL
    )
    log = logging.getLogger("gpumesh.operator")
    if not verbose:
        # "Handler X succeeded" for every watch event: hundreds of lines a second on a
        # busy mesh, and CPU spent writing them. Failures are warnings and still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    # client-go's identity: the pod's name and something unique to this process, so a
    # restarted container never mistakes its predecessor's Lease for its own.
    me = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    terms = leader.Terms(
        SETTINGS.leader_lease_seconds,
        SETTINGS.leader_renew_deadline_seconds,
        SETTINGS.leader_retry_seconds,
    )
    elector = leader.Elector(
        kube.LeaseStore(kube.shared(), SETTINGS.namespace, lifecycle.LEADER_LEASE),
        name=lifecycle.LEADER_LEASE,
        namespace=SETTINGS.namespace,
        me=me,
        terms=terms,
    )
    leading = threading.Event()

    def health() -> tuple[bool, str]:
        if leading.is_set():
            return lifecycle.watch_health()
        return True, f"standby; {elector.leader or 'nobody yet'} leads"

    address = urlsplit(liveness)
    routes = {address.path or "/healthz": health_route(health)}
    metrics = {"/metrics": registry_route(REGISTRY)}
    if metrics_port and metrics_port == address.port:
        routes.update(metrics)
    elif metrics_port:
        HttpServer(metrics_host, metrics_port, metrics).start("metrics-http")
        log.info("metrics served on http://%s:%d/metrics", metrics_host, metrics_port)
    HttpServer(address.hostname or "127.0.0.1", address.port or 8080, routes).start("health")

    standing = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: standing.set())
    last_said: list[str | None] = [None]

    def waiting(step: leader.Step) -> None:
        if step.holder != last_said[0]:
            last_said[0] = step.holder
            log.info(
                "standby as %s: %s leads (lease lapses in <= %.0f s)", me, step.holder, step.for_s
            )

    log.info("standing for leader as %s", me)
    if not elector.acquire(standing, waiting):
        log.info("stopped while standing by")
        return
    log.info("leading as %s", me)
    leading.set()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)  # kopf installs its own once it runs

    def lost(reason: str) -> None:
        # Another replica may take over once the Lease lapses: stop acting at once, before
        # it does. The kubelet restarts this container, which stands again as a standby.
        log.critical("leadership lost (%s): exiting", reason)
        logging.shutdown()
        os._exit(70)

    done = threading.Event()
    holder = threading.Thread(target=elector.hold, args=(done, lost), name="leader", daemon=True)
    holder.start()
    # uvloop, as kopf's own CLI uses when installed: the event loop decodes and
    # dispatches every watch event, and uvloop's costs the operator a little less CPU
    # under a burst of GPUClusters (docs/architecture.md).
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            kopf.run(loop=runner.get_loop(), standalone=True, clusterwide=True)
    finally:
        done.set()  # a clean stop releases the Lease: a standby takes over at its next try
        holder.join(5)
