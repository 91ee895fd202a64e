"""Issue 17 item 9 at the MCP surface: NUL bytes in what becomes a command line, numbers beyond any range,
and directories too large for one result, each answered with a clear, typed error or a page.

The in-memory backend proves the rules for every tool; the official SDK client on the embedded engine
proves the reproductions end to end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contree import api
from contree.backend import GrepQuery
from tests.tools.conftest import mcp_session
from tests.tools.fakes import FakeBackend, call, make_registry

HUGE = 2**80


def error_text(out: dict[str, Any]) -> str:
    assert out.get("isError"), out
    return str(out["content"][0]["text"])


# --- NUL ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "where"),
    [
        ({"command": "echo a\u0000b; echo after"}, "command"),
        ({"command": "/bin/echo", "shell": False, "args": ["a\u0000b"]}, "args[0]"),
        ({"command": "env", "env": {"TOKEN": "hunter2\u0000"}}, "env['TOKEN']"),
        ({"command": "env", "env": {"A\u0000B": "x"}}, "an env name"),
        ({"command": "pwd", "cwd": "/tmp\u0000/x"}, "cwd"),
        ({"command": "hostname", "hostname": "a\u0000b"}, "hostname"),
    ],
)
async def test_a_nul_byte_in_a_command_line_is_refused_not_truncated(
    tmp_path: Path, args: dict[str, Any], where: str
) -> None:
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    out = await call(reg, "run", {"image": "busybox:latest", "wait": False, **args})
    text = error_text(out)
    assert f"{where} contains a NUL byte" in text and "hunter2" not in text
    assert backend.spawned == []
    await state.close()


def test_the_engine_refuses_nul_bytes_too() -> None:
    from contree.engine.spawn import validate_exec, validate_request
    from contree.errors import BadRequest

    base = {"command": "true", "image": "tag:busybox:latest"}
    for extra in (
        {"command": "echo a\u0000b"},
        {"args": ["x\u0000"]},
        {"env": {"A": "b\u0000c"}},
        {"env": {"A\u0000": "b"}},
        {"cwd": "/\u0000"},
    ):
        with pytest.raises(BadRequest, match="NUL byte"):
            validate_request(msgspec.convert({**base, **extra}, api.InstanceSpawnRequest))
        with pytest.raises(BadRequest, match="NUL byte"):
            validate_exec(msgspec.convert({"command": "true", **extra}, api.ExecSpec))


# --- numbers ---------------------------------------------------------------------------------------------


def numeric_parameters(schema: dict[str, Any]) -> list[str]:
    def numeric(prop: dict[str, Any]) -> bool:
        kinds = [prop.get("type")] + [p.get("type") for p in prop.get("anyOf", [])]
        return "integer" in kinds or "number" in kinds

    return [name for name, prop in schema.get("properties", {}).items() if numeric(prop)]


def minimal_arguments(schema: dict[str, Any]) -> dict[str, Any]:
    """Valid values for the required parameters (strings, lists of strings, bounded integers)."""
    out: dict[str, Any] = {}
    for name in schema.get("required", []):
        prop = schema["properties"][name]
        if prop.get("type") == "integer":
            out[name] = prop.get("minimum", 0)
            continue
        out[name] = ["x"] if prop.get("type") == "array" else "/x" if "path" in name else "x"
    return out


def every_numeric_parameter() -> list[tuple[str, str]]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        reg, _ = make_registry(FakeBackend(), Path(tmp))
        return [
            (name, param)
            for name, tool in reg.tools.items()
            for param in numeric_parameters(tool.input_schema)
        ]


def test_the_numeric_parameters_are_found() -> None:
    found = every_numeric_parameter()
    assert ("run", "timeout") in found and ("list_images", "offset") in found
    assert ("read_file", "offset") in found and ("wait_operations", "timeout") in found
    assert len(found) >= 15


@pytest.mark.parametrize(("tool", "param"), every_numeric_parameter())
@pytest.mark.parametrize("value", [HUGE, -HUGE])
async def test_every_numeric_parameter_is_range_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tool: str, param: str, value: int
) -> None:
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    schema = reg.tools[tool].input_schema
    caplog.set_level(logging.DEBUG)
    out = await call(reg, tool, {**minimal_arguments(schema), param: value})
    text = error_text(out)
    assert f"$.{param}" in text and ("<=" in text or ">=" in text), text
    assert "SQLite" not in text and not [r for r in caplog.records if r.exc_info], "no traceback is logged"
    assert backend.spawned == [] and backend.imports == []
    await state.close()


@pytest.mark.parametrize("state_id", [HUGE, str(HUGE), 0, "-5"])
async def test_a_directory_state_id_out_of_range_is_a_typed_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, state_id: int | str
) -> None:
    reg, state = make_registry(FakeBackend(), tmp_path)
    out = await call(
        reg, "run", {"command": "true", "image": "busybox:latest", "directory_state_id": state_id}
    )
    text = error_text(out)
    assert "directory_state_id" in text and "SQLite" not in text
    assert not [r for r in caplog.records if r.exc_info]
    await state.close()


# --- list_files pages --------------------------------------------------------------------------------------


class BigDirectoryBackend(FakeBackend):
    """An image whose /big holds `count` entries with long names full of characters JSON must escape."""

    def __init__(self, count: int) -> None:
        super().__init__()
        name = 'q"uo\\te-é-' + "n" * 200
        item = dict(
            size=1, owner=0, group=0, mode=0o100644, mtime=0, nlink=1, uid=0, gid=0, is_dir=False,
            is_regular=True, is_symlink=False, is_socket=False, is_fifo=False, symlink_to="",
        )  # fmt: skip
        self.items = [api.FileItem(path=f"{name}-{i:06d}", **item) for i in range(count)]

    async def list_directory(self, image_uuid: str, path: str) -> api.DirectoryList:
        return api.DirectoryList(path=path, files=self.items)

    async def grep(self, image_uuid: str, query: GrepQuery) -> api.GrepResult:
        raise NotImplementedError


async def test_a_huge_directory_is_paged_within_64_kib(tmp_path: Path) -> None:
    backend = BigDirectoryBackend(100_000)
    reg, state = make_registry(backend, tmp_path)
    args = {"image": "busybox:latest", "path": "/big"}
    first = await call(reg, "list_files", args)
    assert len(msgspec.json.encode({"jsonrpc": "2.0", "id": 1, "result": first})) <= 64 * 1024
    page = first["structuredContent"]
    assert page["total"] == 100_000 and page["count"] == len(page["files"]) > 20
    assert page["next_cursor"] == str(page["count"]) and "cursor=" in page["hint"]
    seen = [f["name"] for f in page["files"]]
    second = (await call(reg, "list_files", {**args, "cursor": page["next_cursor"]}))["structuredContent"]
    assert second["files"][0]["name"] == backend.items[len(seen)].path
    last = (await call(reg, "list_files", {**args, "cursor": "99990"}))["structuredContent"]
    assert last["count"] == 10 and last["next_cursor"] is None and last["hint"] is None
    limited = (await call(reg, "list_files", {**args, "limit": 5}))["structuredContent"]
    assert limited["count"] == 5 and limited["next_cursor"] == "5"
    for bad in ("x", "-1", "100001"):
        assert "invalid cursor" in error_text(await call(reg, "list_files", {**args, "cursor": bad}))
    await state.close()


def test_the_page_budget_leaves_room_for_the_envelope() -> None:
    from tools.inspect_tools import LIST_PAGE_BYTES

    assert LIST_PAGE_BYTES <= 60 * 1024


# --- end to end through the official SDK on the embedded engine -----------------------------------------


async def test_sdk_nul_and_range_errors_on_the_engine(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as session:
        nul = await session.call_tool(  # type: ignore[attr-defined]
            "run", {"command": "echo a\u0000b; echo after", "image": "busybox:latest"}
        )
        assert nul.isError and "command contains a NUL byte" in nul.content[0].text
        huge = await session.call_tool(  # type: ignore[attr-defined]
            "run", {"command": "true", "image": "busybox:latest", "directory_state_id": HUGE}
        )
        assert huge.isError and "$.directory_state_id" in huge.content[0].text
        ops = await session.call_tool("list_operations", {})  # type: ignore[attr-defined]
        assert ops.structuredContent["operations"] == []  # nothing ran
    log = (workdir.parent / "server-stderr.log").read_text()
    assert "Traceback" not in log and "SQLite" not in log


async def test_sdk_list_files_pages_a_directory_of_100000_entries(engine_home: Path, workdir: Path) -> None:
    from contree.engine.storage.store import Store

    store = Store(engine_home)
    try:
        layer = store.staging_dir()
        (layer / "big").mkdir()
        for i in range(100_000):
            (layer / "big" / f"entry-{i:06d}").touch()
        busybox = store.resolve_tag("busybox:latest")
        store.create_image_from_layer_dir(layer, tag="tests/big:1", parent=store.get(busybox))
    finally:
        store.close()
    async with mcp_session(engine_home, workdir) as session:
        result = await session.call_tool(  # type: ignore[attr-defined]
            "list_files", {"image": "tests/big:1", "path": "/big"}
        )
        assert not result.isError
        assert len(result.model_dump_json(by_alias=True, exclude_none=True)) <= 64 * 1024
        page = result.structuredContent
        assert page["total"] == 100_000 and page["next_cursor"] == str(page["count"])
        tail = await session.call_tool(  # type: ignore[attr-defined]
            "list_files", {"image": "tests/big:1", "path": "/big", "cursor": "99999"}
        )
        assert tail.structuredContent["count"] == 1 and tail.structuredContent["next_cursor"] is None
