"""The layout keeps its promises: `import operator` stays the standard library, and the
folders at the top of the repository are reached only as gpumesh's subpackages.

Which module may import which is import-linter's job (`lint-imports`, in `make lint`),
with the contracts in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from corpus import ROOT


def test_import_operator_from_the_repository_root_gives_the_standard_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import operator, collections; print(operator.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT / "operator") not in out
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "node_agent" / "__init__.py").exists()


def test_the_repository_holds_no_symlinks() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    links = [line.split("\t", 1)[1] for line in tracked if line.startswith("120000 ")]
    assert links == []


def test_operator_and_agent_are_imported_from_their_top_level_folders() -> None:
    import gpumesh.node_agent.cli
    import gpumesh.operator.cli

    # The editable install links each file from its folder at the top of the repository.
    for module, folder in (
        (gpumesh.operator.cli, "operator"),
        (gpumesh.node_agent.cli, "node_agent"),
    ):
        assert module.__file__ is not None
        assert Path(module.__file__).resolve() == ROOT / folder / "cli.py"
