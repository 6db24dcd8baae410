"""Reading manifests into API models, with errors a renter can act on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gpumesh.api.base import API_VERSION, ApiModel
from gpumesh.api.kinds import kind_info


@dataclass(frozen=True)
class FieldError:
    """One problem: the field's path as kubectl prints it, and why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


class ManifestError(ValueError):
    """A manifest that no gpumesh kind accepts; lists every problem found."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


def field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's location as kubectl prints it: ``spec.workerGroups[0].replicas``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith(("function-", "[")):
            path += f".{part}" if path else part
    return path


def field_problems(err: ValidationError, prefix: str = "") -> str:
    """Validation errors as one line naming each field (under ``prefix``) and its reason."""
    return "; ".join(f"{prefix}{field_path(e['loc'])}: {_reason(e['msg'])}" for e in err.errors())


def spec_problems(err: ValidationError) -> str:
    """A stored spec's validation errors, one line naming each field and its reason."""
    return field_problems(err, "spec.")


def parse_manifest(doc: Any) -> ApiModel:
    """Validate one decoded YAML document as the gpumesh kind it names."""
    if not isinstance(doc, dict):
        raise ManifestError([FieldError("", "a manifest must be a mapping")])
    if doc.get("apiVersion") != API_VERSION:
        raise ManifestError(
            [FieldError("apiVersion", f"must be {API_VERSION}, got {doc.get('apiVersion')!r}")]
        )
    try:
        info = kind_info(str(doc.get("kind")))
    except KeyError as err:
        raise ManifestError([FieldError("kind", str(err.args[0]))]) from None
    try:
        return info.model.model_validate(doc)
    except ValidationError as err:
        raise ManifestError(
            [FieldError(field_path(e["loc"]), _reason(e["msg"])) for e in err.errors()]
        ) from None


def _reason(message: str) -> str:
    return message.removeprefix("Value error, ")
