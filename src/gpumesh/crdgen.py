"""Pydantic models -> structural CustomResourceDefinitions (pure).

pydantic writes JSON Schema; the API server wants OpenAPI v3 *structural* schemas: every
node typed, no ``$ref``, no type unions, nullable instead of ``null`` branches, list types
declared for server-side apply. This module does that translation and nothing else.
"""

from __future__ import annotations

from typing import Any

import yaml

from gpumesh.api.base import CEL_KEY, GROUP, LIST_TYPE_KEY, VERSION
from gpumesh.api.kinds import KINDS, KindInfo

Schema = dict[str, Any]
MAX_OBJECT_NAME = 253
"""Kubernetes' own limit on a custom object's name (a DNS subdomain)."""

_DROPPED_KEYS = {"title", "discriminator", "$defs", "examples"}


class SchemaError(ValueError):
    """The model uses a construct that has no structural-schema form."""


def structural(schema: Schema, defs: dict[str, Schema] | None = None) -> Schema:
    """Translate one pydantic JSON schema node (and below) into its structural form."""
    defs = defs if defs is not None else schema.get("$defs", {})
    node = dict(schema)
    while "$ref" in node or "anyOf" in node:
        if "$ref" in node:
            target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
            node = {**target, **node}
        else:
            node = _collapse_optional(node)

    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            out["properties"] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out["items"] = structural(value, defs)
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out["additionalProperties"] = structural(value, defs)
            # False: pruning already drops unknown fields; kubectl reports them.
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value

    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        if "properties" in out:
            out["type"] = "object"
        elif "enum" in out:
            out["type"] = _type_of(out["enum"][0])
        else:
            raise SchemaError(f"schema node has no type: {sorted(out)}")
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "array":
        out.setdefault(LIST_TYPE_KEY, "atomic")
    return _readable_order(out)


def _readable_order(node: Schema) -> Schema:
    """Type and description first, so the checked-in YAML reads top-down."""
    first: Schema = {k: node[k] for k in ("type", "description") if k in node}
    return {**first, **{k: v for k, v in node.items() if k not in first}}


def _collapse_optional(node: Schema) -> Schema:
    """``X | None`` becomes X: optional fields are left out, never sent as null."""
    branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
    if len(branches) != 1:
        raise SchemaError(f"unions have no structural form: {branches}")
    return {**branches[0], **node}


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def object_schema(info: KindInfo) -> Schema:
    """The openAPIV3Schema of one kind."""
    full = info.model.model_json_schema(by_alias=True, mode="validation")
    defs = full.get("$defs", {})
    props = full["properties"]
    schema: Schema = {
        "type": "object",
        "description": (info.model.__doc__ or info.kind).strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "gpumesh.io/v1alpha1."},
            "kind": {"type": "string", "description": f"{info.kind}."},
            "metadata": {"type": "object"},
            "spec": structural(props["spec"], defs),
            "status": structural(props["status"], defs),
        },
    }
    name_limit = info.model.model_fields["metadata"].annotation
    limit = getattr(name_limit, "name_limit", None)
    if limit is not None:
        # The only metadata a CRD schema may constrain; the bound keeps the CEL rules on
        # the name within the API server's cost budget.
        schema["properties"]["metadata"] = {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": MAX_OBJECT_NAME}},
        }
        schema[CEL_KEY] = limit.cel_rules()
    if info.unreconciled_status:
        schema["properties"]["status"]["default"] = dict(info.unreconciled_status)
    return schema


def crd(info: KindInfo) -> Schema:
    """The CustomResourceDefinition of one kind."""
    version: Schema = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": object_schema(info)},
        "subresources": {"status": {}},
        "additionalPrinterColumns": [
            {
                "name": c.name,
                "type": c.type,
                "jsonPath": c.json_path,
                "description": c.description,
                **({"priority": c.priority} if c.priority else {}),
            }
            for c in info.columns
        ],
    }
    if info.scale is not None:
        scale: Schema = {
            "specReplicasPath": info.scale.spec_replicas_path,
            "statusReplicasPath": info.scale.status_replicas_path,
        }
        if info.scale.label_selector_path:
            scale["labelSelectorPath"] = info.scale.label_selector_path
        version["subresources"]["scale"] = scale
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "gpumesh"},
        },
        "spec": {
            "group": GROUP,
            "scope": info.scope,
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": list(info.categories),
            },
            "versions": [version],
        },
    }


def all_crds() -> list[Schema]:
    """Every CRD gpumesh serves, in a stable order."""
    return [crd(info) for info in KINDS]


HEADER = "# Generated by `gpumesh crds` from gpumesh/api; do not edit by hand.\n"


def render(info: KindInfo) -> str:
    """One CRD as the YAML checked in under crds/."""
    return HEADER + yaml.safe_dump(crd(info), sort_keys=False, width=100)


def crd_file_name(info: KindInfo) -> str:
    return f"{GROUP}_{info.plural}.yaml"


def render_all() -> str:
    """All CRDs as one multi-document YAML stream."""
    return HEADER + "---\n".join(yaml.safe_dump(c, sort_keys=False, width=100) for c in all_crds())
