"""``python -m gpumesh.node_agent``: the agent's command line without the main CLI."""

from gpumesh.node_agent.cli import app

app(prog_name="gpumesh-agent")
