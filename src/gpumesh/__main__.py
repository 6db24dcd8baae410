"""`python -m gpumesh` is the `gpumesh` command."""

from gpumesh.cli import main

main()
