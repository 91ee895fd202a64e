"""The surface matches fixtures/compat/reference_surface.json (written from COMPAT.md): drift fails loudly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.tools.fakes import FakeBackend, make_registry

SURFACE = json.loads(
    (Path(__file__).parents[2] / "fixtures" / "compat" / "reference_surface.json").read_text()
)


def schema_types(prop: dict[str, Any]) -> set[str]:
    if "anyOf" in prop:
        return set().union(*(schema_types(p) for p in prop["anyOf"]))
    if "enum" in prop:
        return {type_name(v) for v in prop["enum"]}
    t = prop.get("type")
    if t is None and "$ref" in prop:
        return {"object"}
    return set(t) if isinstance(t, list) else {str(t)}


def type_name(value: Any) -> str:
    return {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}[type(value)]


@pytest.fixture
def registry(tmp_path: Path) -> Any:
    reg, _ = make_registry(FakeBackend(), tmp_path)
    return reg


def test_tool_names_and_order(registry: Any) -> None:
    """The reference's 19 tools, name for name and in its order; tools of our own only after them."""
    names = list(registry.tools)
    assert names[:19] == [t["name"] for t in SURFACE["tools"]]
    assert names[19:] == [
        "delete_image", "start_sandbox", "exec", "write_stdin", "signal_process", "get_process",
        "expose_port", "snapshot_sandbox", "stop_sandbox", "list_sandboxes",
    ]


@pytest.mark.parametrize("spec", SURFACE["tools"], ids=lambda s: s["name"])
def test_tool_parameters_defaults_and_required(registry: Any, spec: dict[str, Any]) -> None:
    schema = registry.tools[spec["name"]].input_schema
    assert schema["type"] == "object"
    props = schema.get("properties", {})
    required = set(schema.get("required", []))
    for param in spec["params"]:
        name = param["name"]
        assert name in props, f"{spec['name']}: parameter {name} missing"
        expected = set(param["type"].split("|"))
        assert expected <= schema_types(props[name]), f"{spec['name']}.{name}: {props[name]}"
        if param["required"]:
            assert name in required, f"{spec['name']}.{name} must be required"
        else:
            assert name not in required, f"{spec['name']}.{name} must be optional"
            assert props[name].get("default") == param["default"], f"{spec['name']}.{name} default"
    # superset parameters are allowed, but never required
    extra_required = required - {p["name"] for p in spec["params"]}
    assert not extra_required


@pytest.mark.parametrize("spec", SURFACE["tools"], ids=lambda s: s["name"])
def test_output_schemas_keep_reference_fields(registry: Any, spec: dict[str, Any]) -> None:
    out = registry.tools[spec["name"]].output_schema
    assert out is not None and out["type"] == "object"
    if spec["wrapped_result"]:
        assert out["required"] == ["result"]
        return
    props = out.get("properties") or {}
    if not props and "$ref" in out:
        pytest.fail("output schema must not be a bare $ref")
    for field in spec["result_fields"]:
        assert field in props, f"{spec['name']}: result field {field} missing"


def test_resource_templates(registry: Any) -> None:
    got = {t.uri_template: t.name for t in registry.templates.values()}
    for t in SURFACE["resource_templates"]:
        assert got.get(t["uriTemplate"]) == t["name"]


def test_guide_resources(registry: Any) -> None:
    for r in SURFACE["resources"]:
        res = registry.resources[r["uri"]]
        assert (res.name, res.title, res.mime_type, res.description) == (
            r["name"],
            r["title"],
            r["mimeType"],
            r["description"],
        )


def test_prompts_and_arguments(registry: Any) -> None:
    assert list(registry.prompts) == [p["name"] for p in SURFACE["prompts"]] + ["serve-and-test"]
    for p in SURFACE["prompts"]:
        args = [{"name": a.name, "required": a.required} for a in registry.prompts[p["name"]].arguments]
        assert args == p["arguments"], p["name"]
        assert registry.prompts[p["name"]].description


def test_cost_labels(registry: Any) -> None:
    for name, tool in registry.tools.items():
        first = tool.description.split("\n", 1)[0]
        if name in ("run", "import_image", "start_sandbox"):
            assert first.endswith("Spawns microVM.")  # the fake is a remote backend
        elif name not in ("registry_token_obtain", "registry_auth"):
            assert first.endswith("Free (no VM)."), name
        for marker in ("TL;DR:", "USAGE:", "RETURNS:", "GUIDES:"):
            assert marker in tool.description, (name, marker)
