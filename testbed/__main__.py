"""`python -m testbed` (from the repository root): the local mesh, `make up` and `make down`."""

from testbed.cli import app

app(prog_name="python -m testbed")
