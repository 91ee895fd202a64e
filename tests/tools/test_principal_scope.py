"""COMPAT §15 item 10: with per-principal HTTP tokens, operation tracking is scoped per principal (directory
states and recorded lineage already are: test_defects). Unscoped servers keep showing every operation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from contree.backend import ImageLineage
from protocol.errors import ResourceNotFound
from protocol.registry import Registry
from tests.netutil import free_port
from tests.tools.conftest import http_server
from tests.tools.fakes import FakeBackend, FakeContext, call, make_registry
from tools.http_tokens import TokensFileError, load_tokens
from tools.state import ServerState
from tools.stores.owners import OperationOwners

ALICE, MALLORY = FakeContext("alice"), FakeContext("mallory")


def scoped(tmp_path: Path, backend: FakeBackend | None = None) -> tuple[Registry, ServerState, FakeBackend]:
    backend = backend or FakeBackend()
    # what the CLI sets with --mode http --http-tokens-file
    reg, state = make_registry(backend, tmp_path, scoped_operations=True)
    return reg, state, backend


async def start(reg: Registry, ctx: FakeContext, command: str = "true") -> str:
    out = await call(reg, "run", {"command": command, "image": "busybox:latest", "wait": False}, ctx)
    return str(out["structuredContent"]["result"]["operation_id"])


def text_of(out: dict[str, Any]) -> str:
    return str(out["content"][0]["text"])


async def test_get_operation_hides_another_principals_operation(tmp_path: Path) -> None:
    reg, state, _ = scoped(tmp_path)
    op = await start(reg, ALICE)
    theirs = await call(reg, "get_operation", {"operation_id": op}, MALLORY)
    assert theirs.get("isError") and text_of(theirs).endswith(f"not found (operation {op} not found)")
    mine = await call(reg, "get_operation", {"operation_id": op}, ALICE)
    assert not mine.get("isError") and mine["structuredContent"]["uuid"] == op
    await state.close()


async def test_list_operations_shows_only_the_callers_operations(tmp_path: Path) -> None:
    reg, state, _ = scoped(tmp_path)
    alice_ops = {await start(reg, ALICE), await start(reg, ALICE)}
    mallory_op = await start(reg, MALLORY)
    listed = await call(reg, "list_operations", {}, ALICE)
    assert {o["uuid"] for o in listed["structuredContent"]["operations"]} == alice_ops
    listed = await call(reg, "list_operations", {}, MALLORY)
    assert [o["uuid"] for o in listed["structuredContent"]["operations"]] == [mallory_op]
    await state.close()


async def test_list_operations_pages_count_only_owned_operations(tmp_path: Path) -> None:
    reg, state, _ = scoped(tmp_path)
    for i in range(3):
        await start(reg, MALLORY)
        await start(reg, ALICE, f"echo {i}")
    everything = await call(reg, "list_operations", {}, ALICE)
    mine = [o["uuid"] for o in everything["structuredContent"]["operations"]]
    page = await call(reg, "list_operations", {"offset": 1, "limit": 1}, ALICE)
    assert len(mine) == 3 and [o["uuid"] for o in page["structuredContent"]["operations"]] == mine[1:2]
    await state.close()


async def test_wait_operations_reports_anothers_operation_as_not_found(tmp_path: Path) -> None:
    reg, state, backend = scoped(tmp_path)
    op = await start(reg, ALICE)
    backend.finish(op)
    out = (await call(reg, "wait_operations", {"operation_ids": [op], "timeout": 1}, MALLORY))[
        "structuredContent"
    ]
    assert out["results"] == {} and out["errors"] == {op: f"operation {op} not found"}
    await state.close()


async def test_cancel_operation_refuses_anothers_operation(tmp_path: Path) -> None:
    reg, state, backend = scoped(tmp_path)
    op = await start(reg, ALICE)
    out = await call(reg, "cancel_operation", {"operation_id": op}, MALLORY)
    assert out.get("isError") and backend.cancelled == []
    await state.close()


async def test_operation_resources_hide_anothers_operation(tmp_path: Path) -> None:
    reg, state, backend = scoped(tmp_path)
    op = await start(reg, ALICE)
    backend.finish(op)
    for uri in (f"contree://operations/instance/{op}", f"contree://operations/instance/{op}/stdout"):
        with pytest.raises(ResourceNotFound):
            await reg.read_resource(uri, MALLORY)  # type: ignore[arg-type]
    assert await reg.read_resource(f"contree://operations/instance/{op}", ALICE)  # type: ignore[arg-type]
    await state.close()


async def test_an_import_belongs_to_its_principal(tmp_path: Path) -> None:
    reg, state, _ = scoped(tmp_path)
    args = {
        "registry_url": "alpine:3",
        "wait": False,
        "i_accept_that_anonymous_access_might_be_rate_limited": True,
    }
    op = (await call(reg, "import_image", args, ALICE))["structuredContent"]["result"]["operation_id"]
    assert (await call(reg, "get_operation", {"operation_id": op}, MALLORY)).get("isError")
    assert not (await call(reg, "get_operation", {"operation_id": op}, ALICE)).get("isError")
    await state.close()


async def test_operations_started_elsewhere_are_hidden_when_scoped(tmp_path: Path) -> None:
    backend = FakeBackend()
    outside = backend.add_op("SUCCESS")  # e.g. started with contree-cli on the same account
    reg, state, _ = scoped(tmp_path, backend)
    assert (await call(reg, "get_operation", {"operation_id": outside}, ALICE)).get("isError")
    await state.close()


async def test_an_unscoped_server_shows_every_operation(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    op = await start(reg, ALICE)
    assert not (await call(reg, "get_operation", {"operation_id": op}, MALLORY)).get("isError")
    listed = await call(reg, "list_operations", {}, MALLORY)
    assert op in [o["uuid"] for o in listed["structuredContent"]["operations"]]
    await state.close()


def test_ownership_survives_a_restart(tmp_path: Path) -> None:
    owners = OperationOwners(tmp_path / "operations.db", scoped=True)
    owners.record("alice", "op-1")
    owners.close()
    again = OperationOwners(tmp_path / "operations.db", scoped=True)
    assert again.visible("alice", "op-1") and not again.visible("mallory", "op-1")
    again.close()


def test_an_operation_is_never_handed_to_a_second_principal(tmp_path: Path) -> None:
    owners = OperationOwners(None, scoped=True)
    owners.record("alice", "op-1")
    owners.record("mallory", "op-1")
    assert owners.owned("alice") == {"op-1"} and owners.owned("mallory") == set()


# --- --http-tokens-file ------------------------------------------------------------------------------


def test_tokens_file_maps_tokens_to_principals(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# team\nalice  tok-alice-1\n\nbob tok-bob-2\n")
    assert load_tokens(path) == {"tok-alice-1": "alice", "tok-bob-2": "bob"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice\n", "expected '<principal> <token>'"),
        ("alice t1\nbob t1\n", "already given to 'alice'"),
        ("alice t1\nalice t2\n", "principal 'alice' appears twice"),
        ("# nothing\n", "holds no '<principal> <token>' line"),
    ],
)
def test_a_bad_tokens_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(TokensFileError, match=message):
        load_tokens(path)


@pytest.mark.slow
async def test_http_clients_with_different_tokens_see_only_their_operations(
    engine_home: Path, workdir: Path, tmp_path: Path
) -> None:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    tokens = tmp_path / "tokens"
    tokens.write_text("alice tok-alice-0123456789\nmallory tok-mallory-0123456789\n")
    os.chmod(tokens, 0o600)

    async def call_as(base: str, token: str, name: str, args: dict[str, Any]) -> Any:
        headers = {"Authorization": f"Bearer {token}"}
        async with streamablehttp_client(f"{base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await session.call_tool(name, args)

    port = free_port()
    async with http_server(engine_home, workdir, port, "--http-tokens-file", str(tokens)) as base:
        started = await call_as(
            base, "tok-alice-0123456789", "run", {"command": "true", "image": "busybox:latest", "wait": False}
        )
        op = started.structuredContent["result"]["operation_id"]
        theirs = await call_as(base, "tok-mallory-0123456789", "get_operation", {"operation_id": op})
        assert theirs.isError and "not found" in theirs.content[0].text
        mine = await call_as(base, "tok-alice-0123456789", "get_operation", {"operation_id": op})
        assert not mine.isError and mine.structuredContent["uuid"] == op


def test_the_cli_refuses_an_unreadable_tokens_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "tools", "--mode", "http", "--http-tokens-file", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert out.returncode == 2 and "cannot read the HTTP tokens file" in out.stderr


class NativeLineageBackend(FakeBackend):
    """A backend with its own (account-wide) lineage, like the embedded engine."""

    async def image_lineage(self, image: str) -> ImageLineage:
        made = [o.result_image_uuid for o in self.ops.values() if o.image_uuid == image]
        children = [self.images[c] for c in made if c]
        root = self.images[image]
        return ImageLineage(uuid=image, parent=None, children=children, ancestors=[], root=root, depth=0)


async def test_lineage_views_are_per_principal_when_scoped(tmp_path: Path) -> None:
    import json

    backend = NativeLineageBackend()
    reg, state = make_registry(backend, tmp_path, scoped_operations=True)
    args = {"command": "x", "image": backend.busybox, "disposable": False}
    op = (await call(reg, "run", {**args, "wait": False}, ALICE))["structuredContent"]["result"][
        "operation_id"
    ]
    child = backend.add_image(None)
    backend.finish(op, result_image=child)
    await call(reg, "get_operation", {"operation_id": op}, ALICE)
    uri = f"contree://image/{backend.busybox}/lineage"
    theirs = json.loads((await reg.read_resource(uri, MALLORY))[0].text or "")  # type: ignore[arg-type]
    mine = json.loads((await reg.read_resource(uri, ALICE))[0].text or "")  # type: ignore[arg-type]
    assert theirs["children"] == [] and mine["children"] == [child]
    await state.close()
