"""The wheel is what the image installs: gpumesh with its operator and agent, no dev code.

Packaging maps the top-level operator/ and node_agent/ folders into gpumesh (pyproject.toml
lists the packages); a folder missing from the list would be missing from the image.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from corpus import ROOT

TREES = {"gpumesh": ROOT / "src" / "gpumesh", "gpumesh.operator": ROOT / "operator"}
TREES["gpumesh.node_agent"] = ROOT / "node_agent"


def packaged() -> set[str]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools["packages"])


def folders_with_code() -> set[str]:
    found: set[str] = set()
    for package, top in TREES.items():
        for source in top.rglob("*.py"):
            relative = source.parent.relative_to(top)
            found.add(".".join([package, *relative.parts]))
    return found


def test_the_package_list_names_every_folder_of_the_three_trees() -> None:
    assert packaged() == folders_with_code()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the tracked files: setuptools builds in the source tree, and a
    stale build/lib there could slip a deleted module into the wheel."""
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(
        ["git", "ls-files", "pyproject.toml", "README.md", "src", "operator", "node_agent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("gpumesh-*.whl")
    return built


def test_the_wheel_holds_the_operator_and_agent_and_no_dev_code(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpumesh/operator/handlers/job.py" in names
    assert "gpumesh/node_agent/wg/agent.py" in names
    assert "gpumesh/api/mesh.py" in names
    assert "gpumesh/py.typed" in names
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {
        "gpumesh",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    assert not [n for n in names if "testbed" in n or "devcluster" in n or n.startswith("bench")]


def test_the_wheel_installed_in_a_clean_venv_runs_operator_and_agent(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    # The dependencies come from this venv's site-packages, added as a plain path: its .pth
    # files (the editable install of this checkout among them) are not processed.
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = (
        "import gpumesh.operator.cli, gpumesh.node_agent.cli, gpumesh.cli\n"
        "print(gpumesh.operator.cli.__file__)\n"
        "print(gpumesh.node_agent.cli.__file__)\n"
        "import importlib.util\n"
        "print(importlib.util.find_spec('testbed'))\n"
    )
    out = subprocess.run(
        [str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].startswith(str(site)) and out[0].endswith("gpumesh/operator/cli.py")
    assert out[1].startswith(str(site)) and out[1].endswith("gpumesh/node_agent/cli.py")
    assert out[2] == "None"
    usage = subprocess.run(
        [str(venv / "bin" / "gpumesh"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "operator" in usage and "agent" in usage
