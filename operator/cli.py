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
        str, typer.Option(help="Liveness endpoint, as http://0.0.0.0:8080/healthz.")
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
    """Watch the whole cluster and reconcile gpumesh objects until stopped."""
    import asyncio
    import logging

    import kopf
    import uvloop

    import gpumesh.operator.handlers  # noqa: F401  (registers the handlers)
    from gpumesh.operator import heap
    from gpumesh.operator.jobs import metrics

    heap.tune()

    # Served by a kopf startup handler, once the operator really starts.
    metrics.ENDPOINT.host, metrics.ENDPOINT.port = metrics_host, metrics_port

    kopf.configure(
        verbose=verbose, log_format=kopf.LogFormat.JSON if json_logs else kopf.LogFormat.FULL
    )
    if not verbose:
        # "Handler X succeeded" for every watch event: hundreds of lines a second on a
        # busy mesh, and CPU spent writing them. Failures are warnings and still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # uvloop, as kopf's own CLI uses when installed: the event loop decodes and
    # dispatches every watch event, and uvloop's costs the operator a little less CPU
    # under a burst of GPUClusters (docs/architecture.md).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        kopf.run(
            loop=runner.get_loop(),
            standalone=True,
            clusterwide=True,
            liveness_endpoint=liveness,
        )
