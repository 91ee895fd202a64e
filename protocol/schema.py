"""JSON Schemas derived from Python types with msgspec (the Struct is the schema)."""

from __future__ import annotations

import types
import typing
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
    members = _union_members(tp)
    schemas, defs = msgspec.json.schema_components(members, ref_template=_REF)
    # msgspec refuses untagged unions of Structs, so a union is described member by member.
    inner = schemas[0] if len(schemas) == 1 else {"anyOf": list(schemas)}
    out: dict[str, Any] = {"type": "object", "properties": {"result": inner}, "required": ["result"]}
    if defs:
        out["$defs"] = defs
    return out


def type_key(tp: Any) -> str:
    """A name of the type that is the same in every process: `module.Qualname` for a class, the typing
    repr (module-qualified) for a union or a generic."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return f"{tp.__module__}.{tp.__qualname__}"
    return repr(tp)


def _union_members(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(typing.get_args(tp))
    return [tp]


def _refers_to(defs: dict[str, Any], ref: str) -> bool:
    """True if any definition still points at `ref` (a recursive Struct must stay in $defs)."""
    needle = f'"{ref}"'.encode()
    return needle in msgspec.json.encode(defs)
