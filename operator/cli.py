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
) -> None:
    """Watch the whole cluster and reconcile gpumesh objects until stopped."""
    import kopf

    import gpumesh.operator.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(
        verbose=verbose, log_format=kopf.LogFormat.JSON if json_logs else kopf.LogFormat.FULL
    )
    kopf.run(standalone=True, clusterwide=True, liveness_endpoint=liveness)
