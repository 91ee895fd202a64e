"""JSON Schemas derived from Python types with msgspec (the Struct is the schema)."""

from __future__ import annotations

from typing import Any

import msgspec

_REF = "#/$defs/{name}"


def input_schema(tp: Any) -> dict[str, Any]:
    """An object schema for a params Struct: the Struct's own schema at the top, other Structs in $defs."""
    (top,), defs = msgspec.json.schema_components([tp], ref_template=_REF)
    ref = top.get("$ref")
    if isinstance(ref, str) and len(top) == 1:
        name = ref.rsplit("/", 1)[1]
        top = dict(defs[name])
        if not _refers_to(defs, ref):
            del defs[name]
    top.pop("title", None)
    if top.get("type") != "object":
        raise TypeError(f"tool parameters must be an object type, got {tp!r}")
    top.setdefault("properties", {})
    if defs:
        top["$defs"] = defs
    return top


def output_schema(tp: Any, *, wrap: bool) -> dict[str, Any]:
    """The structuredContent schema: a Struct's own schema, or {"result": <schema>} for anything else."""
    if not wrap:
        return input_schema(tp)
    (inner,), defs = msgspec.json.schema_components([tp], ref_template=_REF)
    out: dict[str, Any] = {"type": "object", "properties": {"result": inner}, "required": ["result"]}
    if defs:
        out["$defs"] = defs
    return out


def _refers_to(defs: dict[str, Any], ref: str) -> bool:
    """True if any definition still points at `ref` (a recursive Struct must stay in $defs)."""
    needle = f'"{ref}"'.encode()
    return needle in msgspec.json.encode(defs)
