"""``python -m gpumesh.node_agent.wg``: the mesh agent alone (see :mod:`.cli`)."""

from gpumesh.node_agent.wg.cli import app

app(prog_name="python -m gpumesh.node_agent.wg")
