"""Every tool schema — the real server's tools and the conformance fixtures — is a valid JSON Schema
2020-12 document (the default dialect of 2025-11-25 and 2026-07-28) with an object at its root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest

from protocol.registry import Registry
from protocol.testing.conformance import build_registry
from tests.tools.fakes import FakeBackend, make_registry


def _real(tmp: Path) -> Registry:
    registry, _state = make_registry(FakeBackend(), tmp)
    return registry


def _schemas(registry: Registry) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for tool in registry.tools.values():
        out.append((f"{tool.name}.inputSchema", tool.input_schema))
        if tool.output_schema is not None:
            out.append((f"{tool.name}.outputSchema", tool.output_schema))
    return out


@pytest.mark.parametrize("which", ["real", "conformance"])
def test_tool_schemas_are_json_schema_2020_12(which: str, tmp_path: Path) -> None:
    registry = _real(tmp_path) if which == "real" else build_registry("1")
    schemas = _schemas(registry)
    assert len(schemas) >= (19 if which == "real" else 30)
    for where, schema in schemas:
        dialect = schema.get("$schema", "https://json-schema.org/draft/2020-12/schema")
        assert dialect == "https://json-schema.org/draft/2020-12/schema", where
        jsonschema.Draft202012Validator.check_schema(schema)
        if where.endswith("inputSchema"):
            assert schema["type"] == "object", where


def test_real_schemas_accept_what_the_tools_accept(tmp_path: Path) -> None:
    schema = _real(tmp_path).tools["run"].input_schema
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"command": "echo hi", "image": "tag:busybox", "env": {"A": "1"}})
    assert not validator.is_valid({"image": "tag:busybox"})  # command is required
