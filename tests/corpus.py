"""The validation corpus (tests/data/invalid) and the examples, as test data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
INVALID_DIR = ROOT / "tests" / "data" / "invalid"
EXAMPLES_DIR = ROOT / "examples"


@dataclass(frozen=True)
class InvalidCase:
    """A manifest from tests/data/invalid/ and the error a user must see for it."""

    path: Path
    doc: dict[str, Any]
    field: str
    expect: str
    expect_apiserver: str

    @property
    def name(self) -> str:
        return self.path.stem


def load_invalid_cases() -> list[InvalidCase]:
    cases = []
    for path in sorted(INVALID_DIR.glob("*.yaml")):
        text = path.read_text()
        headers = dict(
            line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("# expect")
        )
        cases.append(
            InvalidCase(
                path=path,
                doc=yaml.safe_load(text),
                field=headers["expect-field"],
                expect=headers["expect"],
                expect_apiserver=headers.get("expect-apiserver", headers["expect"]),
            )
        )
    return cases


def load_examples() -> list[tuple[Path, dict[str, Any]]]:
    """Every gpumesh.io/v1alpha1 document under examples/."""
    found = []
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("apiVersion") == "gpumesh.io/v1alpha1":
                found.append((path, doc))
    return found
