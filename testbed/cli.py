"""`python -m testbed ...`: the local mesh a newcomer plays with (`make up`, `make down`).

`up` brings the real control plane up (built from Go modules on first use), adds the
fleet's simulated supplier nodes, installs gpumesh's CRDs, starts the operator and one
node agent per node, applies a sample GPUCluster and waits until it is Ready.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config
from rich.console import Console
from rich.table import Table

import testbed
from gpumesh.api.base import GROUP, VERSION
from testbed import install, mesh, toolchain
from testbed.cluster import LocalCluster
from testbed.fleet import FleetError
from testbed.ports import free_port

app = typer.Typer(help="The local mesh: control plane, simulated suppliers, operator, agents.")
console = Console(stderr=True)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

StateDir = Annotated[
    Path | None, typer.Option(help="State directory (default: $GPUMESH_STATE/dev).")
]


@app.command()
def up(
    fleet: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="Fleet file of simulated suppliers.")
    ] = EXAMPLES / "fleet.yaml",
    sample: Annotated[
        str, typer.Option(help="GPUCluster file to apply once the mesh runs ('' for none).")
    ] = str(EXAMPLES / "gpucluster-sample.yaml"),
    state_dir: StateDir = None,
    agent_interval: Annotated[float, typer.Option(help="Agents' NVML sweep, seconds.")] = 2.0,
) -> None:
    """Start (or reuse) the local mesh and a sample GPUCluster.

    Installs the operator chart and one supplier chart release per fleet supplier, and runs
    each agent on a token bound to its node's agent pod, as the chart's user. On a running
    mesh, a changed fleet converges: agents of removed nodes stop and their Nodes,
    GPUNodes and releases go, re-scripted nodes' agents restart, new nodes get agents.
    """
    state = state_dir or testbed.default_state_dir()
    try:
        fleet_model = testbed.load_fleet(fleet)  # a bad file fails before anything starts
    except FleetError as err:
        raise typer.BadParameter(str(err), param_hint="--fleet") from None
    if sample and not Path(sample).is_file():
        raise typer.BadParameter(f"{sample} is not a file", param_hint="--sample")
    toolchain.ensure([*toolchain.CLUSTER_BINARIES, "kubectl", "helm"], console=console)
    testbed.up(None, state)
    kubeconfig = testbed.kubeconfig_path(state)
    api = new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    with _step("gpumesh CRDs and namespaces"):
        mesh.apply_crds(api)
        mesh.ensure_namespace(api, install.NAMESPACE)
    nodes = {mesh.agent_name(node.name): (supplier, node) for supplier, node in fleet_model.nodes()}
    leaving = mesh.departed(nodes, mesh.load_record(state))
    if leaving:
        with _step(f"agents of nodes that left the fleet stopped ({len(leaving)})"):
            mesh.stop(leaving)
    applied = testbed.apply_fleet(fleet, state)
    gone = sorted({*applied.removed, *(p.name.removeprefix(mesh.AGENT_PREFIX) for p in leaving)})
    if gone:
        with _step(f"GPUNodes of removed nodes deleted ({', '.join(gone)})"):
            mesh.delete_gpunodes(api, gone)
    with _step(
        f"charts: operator, and a supplier release for each of {len(fleet_model.suppliers)}"
    ):
        ids = install.Identities.install(
            api, kubeconfig, fleet_model, install.agents_home(str(state))
        )
    shared_fleet = ids.share(fleet)
    fingerprints = {
        name: mesh.agent_fingerprint(supplier, node, agent_interval, ids.pod_uid(node.name))
        for name, (supplier, node) in nodes.items()
    }
    plan = mesh.plan_agents(fingerprints, mesh.load_record(state))
    if plan.stop:
        with _step(f"agents stopped ({len(plan.stop)}: changed, or their pod was replaced)"):
            mesh.stop(plan.stop)
    logs = state / "logs"
    with _step(
        f"node agents ({len(nodes)}, fake NVML, each on its own pod's token; "
        f"{len(plan.start)} started)"
    ):
        started = []
        for name in plan.start:
            supplier, node = nodes[name]
            own = ids.kubeconfig(node.name)
            argv = mesh.agent_argv(shared_fleet, supplier, node, own, agent_interval)
            proc = mesh.spawn(
                name, install.as_agent_user(argv), logs, fingerprint=fingerprints[name]
            )
            started.append(proc[1])
        mesh.record(state, started)
    running = {p.name for p in mesh.load_record(state) if p.alive()}
    with _step("operator (on its ServiceAccount's token)"):
        if "operator" not in running:
            env = {**mesh.DEV_OPERATOR_ENV, "KUBECONFIG": str(ids.operator_kubeconfig())}
            argv = mesh.operator_argv(free_port())
            mesh.record(state, [mesh.spawn("operator", argv, logs, env)[1]])
    if sample:
        _apply_sample(api, Path(sample))
    _print_next_steps(kubeconfig, state)


@app.command()
def down(
    state_dir: StateDir = None,
    purge: Annotated[bool, typer.Option(help="Also delete the state directory.")] = False,
) -> None:
    """Stop the operator, the agents and the control plane."""
    state = state_dir or testbed.default_state_dir()
    with _step("operator and agents stopped"):
        mesh.stop_recorded(state)
    testbed.down(state, purge=purge)


@app.command()
def status(state_dir: StateDir = None) -> None:
    """Show what runs: control-plane components, gpumesh processes, GPUClusters."""
    state = state_dir or testbed.default_state_dir()
    cluster = LocalCluster(state).status()
    table = Table("component", "pid", "running", "healthy", title=f"dev cluster ({state})")
    for c in cluster.components:
        table.add_row(c.name, str(c.pid), _tick(c.running), _tick(c.healthy))
    for p in mesh.load_record(state):
        table.add_row(p.name, str(p.pid), _tick(p.alive()), "-")
    Console().print(table)
    if not cluster.healthy:
        raise typer.Exit(code=1)
    api = new_client_from_config(config_file=str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    listed: Any = client.CustomObjectsApi(api).list_cluster_custom_object(
        GROUP, VERSION, "gpuclusters"
    )
    items = listed["items"]
    clusters = Table("namespace", "name", "phase", "ready", "GPUs", "USD/h", title="GPUClusters")
    for item in items:
        s = item.get("status") or {}
        clusters.add_row(
            item["metadata"]["namespace"],
            item["metadata"]["name"],
            s.get("phase", "-"),
            f"{s.get('readyWorkers', 0)}/{s.get('desiredWorkers', 0)}",
            str(s.get("gpus", 0)),
            str(s.get("pricePerHour", "-")),
        )
    Console().print(clusters)


@app.command()
def kubeconfig(state_dir: StateDir = None) -> None:
    """Print the path of the dev cluster's admin kubeconfig."""
    typer.echo(testbed.kubeconfig_path(state_dir or testbed.default_state_dir()))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def kubectl(ctx: typer.Context, state_dir: StateDir = None) -> None:
    """Run the pinned kubectl (built with the toolchain) against the dev cluster."""
    path = toolchain.binary_path("kubectl")
    if not path.exists():
        toolchain.ensure(["kubectl"], assets=False)
    config = testbed.kubeconfig_path(state_dir or testbed.default_state_dir())
    os.execv(str(path), [str(path), f"--kubeconfig={config}", *ctx.args])


def _apply_sample(api: client.ApiClient, path: Path) -> None:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    meta = doc["metadata"]
    namespace = meta.get("namespace", "default")
    custom = client.CustomObjectsApi(api)
    with _step(f"sample GPUCluster {namespace}/{meta['name']} applied"):
        custom.patch_namespaced_custom_object(
            "gpumesh.io",
            "v1alpha1",
            namespace,
            "gpuclusters",
            meta["name"],
            doc,
            field_manager=mesh.FIELD_MANAGER,
            force=True,
            _content_type=mesh.APPLY,
        )
    deadline = time.monotonic() + 180
    with console.status("waiting for the sample GPUCluster to become Ready ...") as spinner:
        while time.monotonic() < deadline:
            obj: Any
            try:
                obj = custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, "gpuclusters", meta["name"]
                )
            except ApiException:
                obj = {}
            s = obj.get("status") or {}
            spinner.update(
                f"sample GPUCluster: {s.get('phase', 'Pending')}, "
                f"{s.get('readyWorkers', 0)}/{s.get('desiredWorkers', '?')} workers ready"
            )
            if s.get("phase") == "Ready":
                placed = ", ".join(f"{p['node']}({p['workers']})" for p in s["placements"])
                console.print(
                    f"[green]✓[/] sample GPUCluster Ready: {s['gpus']} GPUs on {placed}, "
                    f"${s.get('pricePerHour')}/h"
                )
                return
            time.sleep(1)
    console.print(
        "[yellow]the sample GPUCluster is not Ready yet; see `python -m testbed status`[/]"
    )


def _print_next_steps(kubeconfig: Path, state: Path) -> None:
    pinned = toolchain.binary_path("kubectl")
    which = (
        f"with your kubectl, or the pinned one:\n  alias kubectl={pinned}"
        if pinned.exists()
        else "with your kubectl, or `.venv/bin/python -m testbed kubectl` for each `kubectl`"
    )
    console.print(
        f"\n[bold]The local mesh is up.[/] Try ({which}):\n"
        f"  export KUBECONFIG={kubeconfig}\n"
        "  kubectl get nodes -L nvidia.com/gpu.product,gpumesh.io/supplier,gpumesh.io/region\n"
        "  kubectl get gpumesh -A                 # GPUClusters, Jobs, GPUNodes, GPUQuotas\n"
        "  kubectl describe gpucluster sample     # placements, conditions, events\n"
        "  kubectl scale gpucluster sample --replicas 4\n"
        "  kubectl apply -f examples/gpucluster-h100.yaml\n"
        "  .venv/bin/python -m testbed status\n"
        f"Logs: {state / 'logs'}   Stop: make down\n",
        soft_wrap=True,
    )


@contextlib.contextmanager
def _step(text: str) -> Iterator[None]:
    """A spinner while a step runs, then one line with its duration."""
    started = time.monotonic()
    with console.status(text + " ..."):
        yield
    console.print(f"[green]✓[/] {text} [dim]({time.monotonic() - started:.1f}s)[/]")


def _tick(value: bool) -> str:
    return "[green]yes[/]" if value else "[red]no[/]"
