"""Tool schemas kept between starts: used only while the code they came from is the same."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocol import schema
from tools.app import build_registry, build_state
from tools.schema_cache import SchemaCache, code_fingerprint


def tool_schemas(home: Path, kind: str = "local") -> dict[str, Any]:
    state = build_state(object(), kind, cache_dir=home, allowed_roots=[home])  # type: ignore[arg-type]
    try:
        registry = build_registry(state)
    finally:
        state.lineage.close()
        state.owners.close()
        state.images.close()
    return {name: (tool.input_schema, tool.output_schema) for name, tool in registry.tools.items()}


def test_a_second_start_derives_no_schema_and_lists_the_same_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    derived = tool_schemas(tmp_path / "cloud", "contree")  # never kept: the reference
    first = tool_schemas(tmp_path / "mcp")
    assert (tmp_path / "mcp" / "tool-schemas.json").stat().st_mode & 0o777 == 0o600

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a kept schema was derived again")

    monkeypatch.setattr(schema, "input_schema", fail)
    monkeypatch.setattr(schema, "output_schema", fail)
    again = tool_schemas(tmp_path / "mcp")
    assert msgspec.json.encode(again) == msgspec.json.encode(first) == msgspec.json.encode(derived)
    assert not (tmp_path / "cloud" / "tool-schemas.json").exists()


def test_kept_schemas_of_other_code_are_derived_again(tmp_path: Path) -> None:
    path = tmp_path / "tool-schemas.json"
    source = tmp_path / "probe.py"
    source.write_text("X = 1\n")
    probe = types.ModuleType("tools._probe")
    probe.__file__ = str(source)
    sys.modules["tools._probe"] = probe
    try:
        cache = SchemaCache(path)
        cache.save({"input x": {"type": "object"}})
        assert SchemaCache(path).load() == {"input x": {"type": "object"}}
        before = code_fingerprint()
        source.write_text("X = 22\n")  # an edited module: another size and time
        os.utime(source, ns=(1, 1))
        assert code_fingerprint() != before and SchemaCache(path).load() == {}
    finally:
        del sys.modules["tools._probe"]


def test_an_unreadable_file_is_derived_again_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "mcp" / "tool-schemas.json"
    path.parent.mkdir()
    path.write_text('{"code": 3}')
    assert SchemaCache(path).load() == {}
    listed = tool_schemas(tmp_path / "mcp")
    assert "run" in listed and len(SchemaCache(path).load()) > 20
