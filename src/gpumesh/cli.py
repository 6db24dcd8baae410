"""The `gpumesh` command line: one entry point for renters, suppliers and mesh operators.

The local dev mesh has its own, `python -m testbed`: dev-only code stays out of the wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from gpumesh import __version__, crdgen
from gpumesh import policy as agent_policy
from gpumesh.api.kinds import KINDS
from gpumesh.api.manifests import ManifestError, parse_manifest
from gpumesh.node_agent import cli as agent_cli
from gpumesh.operator import cli as operator_cli

app = typer.Typer(
    name="gpumesh",
    help="Federated GPUs from many suppliers as one Kubernetes mesh for Ray.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(operator_cli.app, name="operator")
app.add_typer(agent_cli.app, name="agent")
console = Console()
err_console = Console(stderr=True)


@app.command()
def version() -> None:
    """Print the gpumesh version."""
    console.print(f"gpumesh {__version__}")


@app.command()
def crds(
    out: Annotated[
        Path | None,
        typer.Option(help="Write one file per CRD into this folder instead of printing."),
    ] = None,
) -> None:
    """Print the CustomResourceDefinitions generated from the API models."""
    if out is None:
        typer.echo(crdgen.render_all(), nl=False)
        return
    out.mkdir(parents=True, exist_ok=True)
    for info in KINDS:
        path = out / crdgen.crd_file_name(info)
        path.write_text(crdgen.render(info))
        err_console.print(f"wrote {path}")


@app.command()
def policy(
    out: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Write to this file instead of printing.")
    ] = None,
) -> None:
    """Print the admission policies that hold each node agent to its own node."""
    if out is None:
        typer.echo(agent_policy.render(), nl=False)
        return
    out.write_text(agent_policy.render())
    err_console.print(f"wrote {out}")


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Manifests to check (YAML).", exists=True)],
) -> None:
    """Check gpumesh manifests against the API models without a cluster."""
    failed = 0
    for path in files:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is None:
                continue
            where = f"{path}" + (f" (document {index + 1})" if index else "")
            try:
                parse_manifest(doc)
            except ManifestError as err:
                failed += 1
                for problem in err.errors:
                    err_console.print(f"[red]✗[/red] {escape(where)}: {escape(str(problem))}")
            else:
                console.print(f"[green]✓[/green] {escape(where)}")
    if failed:
        raise typer.Exit(code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
