"""Issue 17 items 2 and 3: with per-principal HTTP tokens, images and tags are scoped per principal.

A principal sees its own images (results of its operations) and the shared ones (tagged by the operator
or published); anything else answers exactly like an image that does not exist. Tags a principal sets
live in its own namespace and never move a shared tag or another principal's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocol.errors import ResourceNotFound
from tests.fake_backend import new_id
from tests.netutil import free_port
from tests.tools.conftest import http_server
from tests.tools.fakes import FakeBackend, FakeContext, call, make_registry
from tools.state import ServerState

ALICE, BOB = FakeContext("alice"), FakeContext("bob")


class Scoped:
    """A scoped server (what --http-tokens-file sets up) on the in-memory backend."""

    def __init__(self, tmp_path: Path) -> None:
        self.backend = FakeBackend()
        self.registry, self.state = make_registry(self.backend, tmp_path, scoped_operations=True)

    async def call(self, name: str, args: dict[str, Any], ctx: FakeContext) -> Any:
        return await call(self.registry, name, args, ctx)

    async def ok(self, name: str, args: dict[str, Any], ctx: FakeContext) -> Any:
        out = await self.call(name, args, ctx)
        assert not out.get("isError"), out
        return out["structuredContent"]

    async def image_of(self, ctx: FakeContext, files: dict[str, bytes]) -> str:
        """A disposable=false run of `ctx` whose result image holds `files`."""
        args = {"command": "make", "image": "busybox:latest", "disposable": False, "wait": False}
        op = (await self.ok("run", args, ctx))["result"]["operation_id"]
        image = self.backend.add_image(None, files)
        self.backend.finish(op, result_image=image)
        await self.ok("get_operation", {"operation_id": op}, ctx)
        return image

    async def listed(self, ctx: FakeContext, **args: Any) -> list[str]:
        return [i["uuid"] for i in (await self.ok("list_images", args, ctx))["images"]]


def error_text(out: dict[str, Any]) -> str:
    assert out.get("isError"), out
    return str(out["content"][0]["text"])


@pytest.fixture
async def scoped(tmp_path: Path) -> Any:
    server = Scoped(tmp_path)
    yield server
    await server.state.close()


async def test_another_principals_result_image_is_not_listed(scoped: Scoped) -> None:
    secret = await scoped.image_of(ALICE, {"/secret": b"s3cret"})
    assert secret in await scoped.listed(ALICE)
    theirs = await scoped.listed(BOB)
    assert secret not in theirs and scoped.backend.busybox in theirs


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("get_image", {"image": "{image}"}),
        ("read_file", {"image": "{image}", "path": "/secret"}),
        ("list_files", {"image": "{image}", "path": "/"}),
        ("grep", {"image": "{image}", "pattern": "s3cret"}),
        ("download", {"image": "{image}", "path": "/secret", "destination": "{dest}"}),
        ("run", {"image": "{image}", "command": "cat /secret", "wait": False}),
        ("set_tag", {"image_uuid": "{image}", "tag": "stolen"}),
        ("set_tag", {"image_uuid": "{image}", "tag": None}),
    ],
)
async def test_another_principals_image_reads_as_missing(
    scoped: Scoped, tmp_path: Path, tool: str, args: dict[str, Any]
) -> None:
    secret = await scoped.image_of(ALICE, {"/secret": b"s3cret"})
    missing = new_id()

    def fill(image: str) -> dict[str, Any]:
        dest = str(tmp_path / f"out-{image}")
        return {k: v.format(image=image, dest=dest) if isinstance(v, str) else v for k, v in args.items()}

    hidden = error_text(await scoped.call(tool, fill(secret), BOB))
    absent = error_text(await scoped.call(tool, fill(missing), BOB))
    # same words for a hidden image and one that does not exist: existence is not revealed
    assert "s3cret" not in hidden and hidden.replace(secret, missing) == absent
    assert "not found" in hidden
    assert not (tmp_path / f"out-{secret}").exists()
    assert all(r.image != secret for r in scoped.backend.spawned)
    assert scoped.backend.images[secret].tag is None
    # the owner still can (run and set_tag change state: the owner's side is tested elsewhere)
    if tool not in ("run", "set_tag"):
        assert not (await scoped.call(tool, fill(secret), ALICE)).get("isError")


@pytest.mark.parametrize("kind", ["read", "ls", "lineage"])
async def test_image_resources_hide_another_principals_image(scoped: Scoped, kind: str) -> None:
    secret = await scoped.image_of(ALICE, {"/secret": b"s3cret"})
    suffix = {"read": "/read/secret", "ls": "/ls/", "lineage": "/lineage"}[kind]
    with pytest.raises(ResourceNotFound) as hidden:
        await scoped.registry.read_resource(f"contree://image/{secret}{suffix}", BOB)  # type: ignore[arg-type]
    missing = new_id()
    with pytest.raises(ResourceNotFound) as absent:
        await scoped.registry.read_resource(f"contree://image/{missing}{suffix}", BOB)  # type: ignore[arg-type]
    assert str(hidden.value.message).replace(secret, missing) == str(absent.value.message)
    if kind == "read":
        mine = await scoped.registry.read_resource(f"contree://image/{secret}{suffix}", ALICE)  # type: ignore[arg-type]
        assert mine[0].text == "s3cret"


async def test_an_image_made_by_the_principals_operation_is_its_own_without_being_observed(
    scoped: Scoped,
) -> None:
    # e.g. a wait=false run that ended while nobody asked: the image names its creating operation
    args = {"command": "make", "image": "busybox:latest", "disposable": False, "wait": False}
    op = (await scoped.ok("run", args, ALICE))["result"]["operation_id"]
    image = scoped.backend.add_image(None)
    scoped.backend.images[image] = msgspec.structs.replace(scoped.backend.images[image], operation_uuid=op)
    assert image in await scoped.listed(ALICE)
    assert (await scoped.ok("get_image", {"image": image}, ALICE))["operation_uuid"] == op
    assert image not in await scoped.listed(BOB)
    assert (await scoped.call("get_image", {"image": image}, BOB)).get("isError")


async def test_a_principal_cannot_hijack_a_shared_tag(scoped: Scoped) -> None:
    busybox = scoped.backend.busybox
    trojan = await scoped.image_of(BOB, {"/bin/sh": b"evil"})
    tagged = await scoped.ok("set_tag", {"image_uuid": trojan, "tag": "busybox:latest"}, BOB)
    assert tagged["tag"] == "busybox:latest"
    # the shared tag did not move on the backend; Alice's runs still start from the real busybox
    assert (
        scoped.backend.images[busybox].tag == "busybox:latest" and scoped.backend.images[trojan].tag is None
    )
    await scoped.ok("run", {"command": "true", "image": "tag:busybox:latest", "wait": False}, ALICE)
    await scoped.ok("run", {"command": "true", "image": "busybox:latest", "wait": False}, BOB)
    assert [r.image for r in scoped.backend.spawned[-2:]] == [busybox, trojan]
    assert (await scoped.ok("get_image", {"image": "busybox:latest"}, ALICE))["uuid"] == busybox


async def test_a_principal_cannot_remove_a_shared_tag(scoped: Scoped) -> None:
    busybox = scoped.backend.busybox
    refused = await scoped.call("set_tag", {"image_uuid": busybox, "remove_tag": "busybox:latest"}, BOB)
    assert "shared tag" in error_text(refused)
    cleared = await scoped.ok("set_tag", {"image_uuid": busybox, "tag": None}, BOB)
    assert cleared["tag"] == "busybox:latest"  # only its own tags went; the shared one stays
    assert scoped.backend.images[busybox].tag == "busybox:latest"


async def test_tags_live_in_the_principals_namespace(scoped: Scoped) -> None:
    mine = await scoped.image_of(ALICE, {})
    await scoped.ok("set_tag", {"image_uuid": mine, "tag": "proj/dev:1"}, ALICE)
    assert (await scoped.ok("get_image", {"image": "tag:proj/dev:1"}, ALICE))["uuid"] == mine
    assert "not found" in error_text(await scoped.call("get_image", {"image": "proj/dev:1"}, BOB))
    # Bob's own tag of the same name names Bob's image, and Alice's stays hers
    bobs = await scoped.image_of(BOB, {})
    await scoped.ok("set_tag", {"image_uuid": bobs, "tag": "proj/dev:1"}, BOB)
    assert (await scoped.ok("get_image", {"image": "proj/dev:1"}, BOB))["uuid"] == bobs
    assert (await scoped.ok("get_image", {"image": "proj/dev:1"}, ALICE))["uuid"] == mine
    assert all(scoped.backend.images[i].tag is None for i in (mine, bobs))
    # a tag moves within the namespace, and an image holds one tag per namespace
    second = await scoped.image_of(ALICE, {})
    await scoped.ok("set_tag", {"image_uuid": second, "tag": "proj/dev:1"}, ALICE)
    assert (await scoped.ok("get_image", {"image": mine}, ALICE))["tag"] is None
    await scoped.ok("set_tag", {"image_uuid": second, "tag": "proj/dev:2"}, ALICE)
    assert "not found" in error_text(await scoped.call("get_image", {"image": "proj/dev:1"}, ALICE))
    listed = await scoped.ok("list_images", {"tag_prefix": "proj/"}, ALICE)
    assert [(i["uuid"], i["tag"]) for i in listed["images"]] == [(second, "proj/dev:2")]
    removed = await scoped.ok("set_tag", {"image_uuid": second, "remove_tag": "proj/dev:2"}, ALICE)
    assert removed["tag"] is None


async def test_a_principals_import_tag_is_its_own(scoped: Scoped) -> None:
    args = {
        "registry_url": "alpine:3",
        "tag": "busybox:latest",
        "i_accept_that_anonymous_access_might_be_rate_limited": True,
    }
    out = (await scoped.ok("import_image", args, BOB))["result"]
    assert scoped.backend.imports[-1].tag is None  # never a backend (shared) tag
    assert out["result"]["tag"] == "busybox:latest"
    image = out["result_image_uuid"]
    assert (await scoped.ok("get_image", {"image": "busybox:latest"}, BOB))["uuid"] == image
    assert (await scoped.ok("get_image", {"image": "busybox:latest"}, ALICE))[
        "uuid"
    ] == scoped.backend.busybox
    assert image not in await scoped.listed(ALICE)


async def test_a_wait_false_import_is_tagged_when_it_is_seen_finished(scoped: Scoped) -> None:
    args = {
        "registry_url": "alpine:3",
        "tag": "alpine:3",
        "wait": False,
        "i_accept_that_anonymous_access_might_be_rate_limited": True,
    }
    op = (await scoped.ok("import_image", args, ALICE))["result"]["operation_id"]
    await scoped.ok("wait_operations", {"operation_ids": [op]}, ALICE)
    image = scoped.backend.ops[op].result_image_uuid
    assert (await scoped.ok("get_image", {"image": "alpine:3"}, ALICE))["uuid"] == image
    assert "not found" in error_text(await scoped.call("get_image", {"image": "alpine:3"}, BOB))


async def test_a_wait_false_import_nobody_looked_at_is_tagged_when_its_tag_is_used(scoped: Scoped) -> None:
    args = {
        "registry_url": "alpine:3",
        "tag": "alpine:3",
        "wait": False,
        "i_accept_that_anonymous_access_might_be_rate_limited": True,
    }
    op = (await scoped.ok("import_image", args, ALICE))["result"]["operation_id"]
    image = scoped.backend.ops[op].result_image_uuid  # the fake's import has already ended
    out = await scoped.ok("run", {"command": "true", "image": "alpine:3", "wait": False}, ALICE)
    assert out["result"]["operation_id"] and scoped.backend.spawned[-1].image == image
    assert "not found" in error_text(await scoped.call("get_image", {"image": "alpine:3"}, BOB))


async def test_images_tagged_by_the_operator_and_published_ones_are_shared(scoped: Scoped) -> None:
    operator_tagged = scoped.backend.add_image("common/python:3.12")
    untagged = scoped.backend.add_image(None)
    assert operator_tagged in await scoped.listed(BOB)
    assert untagged not in await scoped.listed(BOB)
    scoped.state.images.published.add(untagged)
    assert untagged in await scoped.listed(BOB)
    assert (await scoped.ok("get_image", {"image": untagged}, BOB))["uuid"] == untagged
    scoped.state.images.published.remove(untagged)
    assert (await scoped.call("get_image", {"image": untagged}, BOB)).get("isError")


async def test_list_images_pages_count_visible_images_only(scoped: Scoped) -> None:
    for _ in range(3):
        await scoped.image_of(BOB, {})
    mine = [await scoped.image_of(ALICE, {}) for _ in range(3)]
    everything = await scoped.listed(ALICE)
    assert set(mine) <= set(everything) and len(everything) == 4  # + busybox
    assert await scoped.listed(ALICE, offset=1, limit=2) == everything[1:3]


async def test_completion_offers_own_and_shared_tags_only(scoped: Scoped) -> None:
    mine = await scoped.image_of(ALICE, {})
    await scoped.ok("set_tag", {"image_uuid": mine, "tag": "bx/alice"}, ALICE)
    complete = scoped.registry.completions[("ref/resource", "contree://image/{image}/read/{path}", "image")]
    assert await complete(ALICE, "b", {}) == ["busybox:latest", "bx/alice"]  # type: ignore[arg-type]
    assert await complete(BOB, "b", {}) == ["busybox:latest"]  # type: ignore[arg-type]


async def test_an_unscoped_server_shares_images_and_tags(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    image = backend.add_image(None)
    out = await call(reg, "set_tag", {"image_uuid": image, "tag": "busybox:latest"}, BOB)
    assert not out.get("isError") and backend.images[image].tag == "busybox:latest"
    assert image in [
        i["uuid"] for i in (await call(reg, "list_images", {}, ALICE))["structuredContent"]["images"]
    ]
    await state.close()


def test_scoping_survives_a_restart(tmp_path: Path) -> None:
    import asyncio

    async def scenario() -> None:
        backend = FakeBackend()
        reg, state = make_registry(backend, tmp_path, scoped_operations=True)
        server = Scoped.__new__(Scoped)
        server.backend, server.registry, server.state = backend, reg, state
        image = await server.image_of(ALICE, {})
        await server.ok("set_tag", {"image_uuid": image, "tag": "keep"}, ALICE)
        await state.close()
        reg, state = make_registry(backend, tmp_path, scoped_operations=True)
        out = await call(reg, "get_image", {"image": "keep"}, ALICE)
        assert out["structuredContent"]["uuid"] == image
        assert (await call(reg, "get_image", {"image": image}, BOB)).get("isError")
        await state.close()

    asyncio.run(scenario())


def test_state_exposes_the_image_scope(tmp_path: Path) -> None:
    _, state = make_registry(FakeBackend(), tmp_path, scoped_operations=True)
    assert isinstance(state, ServerState) and state.images.scoped


# --- the operator's publish command --------------------------------------------------------------------


def cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools", *argv], capture_output=True, text=True, timeout=120, env=env
    )


def test_images_publish_records_the_uuid_the_server_reads(tmp_path: Path) -> None:
    from contree.engine.storage.store import Store
    from tools.stores.image_scope import ImageScope
    from tools.stores.owners import OperationOwners

    home = tmp_path / "engine"
    store = Store(home)
    layer = store.staging_dir()
    (layer / "f").write_text("x")
    image = store.create_image_from_layer_dir(layer, tag="common/tool:1").uuid
    untagged = store.create_image_from_layer_dir(store.staging_dir()).uuid
    store.close()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = cli("images", "publish", "--home", str(home), "tag:common/tool:1", untagged, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"published\t{image}\ttag:common/tool:1",
        f"published\t{untagged}\t{untagged}",
    ]
    listed = cli("images", "published", "--home", str(home), env=env)
    assert listed.stdout.split() == [image, untagged]
    scope = ImageScope(FakeBackend(), home / "mcp" / "operations.db", OperationOwners(None), scoped=True)
    assert scope.published.contains(untagged)
    scope.close()
    missing = new_id()
    refused = cli("images", "publish", "--home", str(home), missing, env=env)
    assert refused.returncode == 1 and f"image {missing} not found" in refused.stderr
    out = cli("images", "unpublish", "--home", str(home), untagged, env=env)
    assert out.stdout.strip() == f"unpublished\t{untagged}\t{untagged}"
    assert cli("images", "published", "--home", str(home), env=env).stdout.split() == [image]


# --- end to end: two principals through the official SDK over HTTP --------------------------------------


@pytest.mark.slow
async def test_two_http_principals_cannot_read_or_retag_each_others_images(
    engine_home: Path, workdir: Path, tmp_path: Path
) -> None:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client
    from mcp.shared.exceptions import McpError

    tokens = tmp_path / "tokens"
    tokens.write_text("alice tok-alice-0123456789\nbob tok-bob-0123456789\n")
    os.chmod(tokens, 0o600)
    alice, bob = "tok-alice-0123456789", "tok-bob-0123456789"

    async def call_as(base: str, token: str, name: str, args: dict[str, Any]) -> Any:
        headers = {"Authorization": f"Bearer {token}"}
        async with streamablehttp_client(f"{base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await session.call_tool(name, args)

    async def read_as(base: str, token: str, uri: str) -> Any:
        headers = {"Authorization": f"Bearer {token}"}
        async with streamablehttp_client(f"{base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                try:
                    return await session.read_resource(uri)  # type: ignore[arg-type]
                except McpError as exc:
                    return exc

    def text(result: Any) -> str:
        return str(result.content[0].text)

    port = free_port()
    async with http_server(engine_home, workdir, port, "--http-tokens-file", str(tokens)) as base:
        made = await call_as(
            base,
            alice,
            "run",
            {"command": "echo s3cret-of-alice > /secret", "image": "busybox:latest", "disposable": False},
        )
        assert not made.isError, text(made)
        secret = made.structuredContent["result"]["result_image_uuid"]
        # item 2: Bob neither lists nor reads Alice's image
        listed = await call_as(base, bob, "list_images", {})
        assert secret not in json.dumps(listed.structuredContent)
        read = await call_as(base, bob, "read_file", {"image": secret, "path": "/secret"})
        assert read.isError and "s3cret" not in text(read)
        missing = "00000000-0000-4000-8000-000000000000"
        absent = await call_as(base, bob, "read_file", {"image": missing, "path": "/secret"})
        assert text(read).replace(secret, missing) == text(absent)
        refused = await read_as(base, bob, f"contree://image/{secret}/read/secret")
        assert isinstance(refused, McpError) and "not found" in str(refused)
        mine = await read_as(base, alice, f"contree://image/{secret}/read/secret")
        assert mine.contents[0].text == "s3cret-of-alice\n"
        # item 3: Bob tags his own image busybox:latest; Alice's runs still use the real one
        trojan = await call_as(
            base,
            bob,
            "run",
            {"command": "echo trojan > /marker", "image": "busybox:latest", "disposable": False},
        )
        bobs = trojan.structuredContent["result"]["result_image_uuid"]
        tagged = await call_as(base, bob, "set_tag", {"image_uuid": bobs, "tag": "busybox:latest"})
        assert not tagged.isError, text(tagged)
        victim = await call_as(
            base, alice, "run", {"command": "cat /marker || echo clean", "image": "tag:busybox:latest"}
        )
        assert victim.structuredContent["result"]["stdout"].strip() == "clean"
        own = await call_as(base, bob, "run", {"command": "cat /marker", "image": "tag:busybox:latest"})
        assert own.structuredContent["result"]["stdout"].strip() == "trojan"
        stolen = await call_as(base, bob, "set_tag", {"image_uuid": secret, "tag": "mine"})
        assert stolen.isError and "not found" in text(stolen)
