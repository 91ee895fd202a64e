"""What the guidance says an image contains is read from the image itself, never from its name."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contree.engine.local import LocalEngine
from contree.engine.storage.store import ImageConfig, Store
from contree.errors import Unavailable
from tools.guides.catalog import CatalogCache, describe_images
from tools.guides.guidance import Guidance


def make_image(
    home: Path, tag: str, files: dict[str, str], dirs: tuple[str, ...] = (), operation: str | None = None
) -> None:
    store = Store(home)
    try:
        stage = store.staging_dir("catalog")
        for path, body in files.items():
            target = stage / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
        for path in dirs:
            (stage / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        store.create_image_from_layer_dirs([stage], config=ImageConfig(), tag=tag, operation_id=operation)
    finally:
        store.close()


async def test_images_are_described_by_what_they_contain(engine_home: Path) -> None:
    # named like a distribution it is not: the description follows the files
    make_image(
        engine_home,
        "ubuntu:noble",
        {"/bin/sh": "", "/usr/bin/apk": "", "/etc/os-release": 'NAME=x\nPRETTY_NAME="Alpine Linux v3.20"\n'},
    )
    make_image(
        engine_home,
        "tools:1",
        {"/bin/bash": "", "/usr/bin/apt-get": "", "/usr/bin/python3": "", "/usr/local/bin/pip3": ""},
        dirs=("/usr/lib/python3.9", "/usr/lib/python3.12"),
    )
    make_image(engine_home, "data:1", {"/data/x": "no shell here"})
    make_image(engine_home, "alice/own:1", {"/bin/sh": ""}, operation="2f0c2a8e-0000-4000-8000-000000000001")
    async with LocalEngine(engine_home) as engine:
        catalog = await describe_images(engine)
        shared = await describe_images(engine, shared_only=True)  # a client's own images stay its own
    assert "alice/own:1" in {i.tag for i in catalog.images} and "alice/own:1" not in {
        i.tag for i in shared.images
    }
    catalog.images = [i for i in catalog.images if i.tag != "alice/own:1"]
    by_tag = {i.tag: i for i in catalog.images}
    assert set(by_tag) == {"busybox:latest", "ubuntu:noble", "tools:1", "data:1"}
    alpine = by_tag["ubuntu:noble"]
    assert (alpine.os, alpine.shell, alpine.package_manager, alpine.python) == (
        "Alpine Linux v3.20",
        "/bin/sh",
        "apk",
        None,
    )
    tools = by_tag["tools:1"]
    assert (tools.shell, tools.package_manager, tools.python, tools.pip) == (
        "/bin/bash",
        "apt-get",
        "3.12",
        True,
    )
    assert tools.install("curl") == "apt-get update && apt-get install -y curl"
    assert by_tag["data:1"].shell is None and by_tag["busybox:latest"].busybox
    guidance = Guidance(backend_kind="local", catalog=catalog, root="/w")
    assert guidance.shell_image() == "busybox:latest" and guidance.python_image() is tools
    assert "| `tools:1` | — | /bin/bash | apt-get | 3.12 + pip |" in catalog.table()
    assert {"local", "python", "packages"} <= guidance.flags()


class Counting:
    """A Backend that counts the reads of image contents, and can fail them."""

    def __init__(self, backend: Any, fail: str | None = None) -> None:
        self.backend = backend
        self.fail = fail  # a directory whose listing fails as if the engine were unavailable
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    async def list_directory(self, uuid: str, path: str) -> Any:
        self.reads += 1
        if path == self.fail:
            raise Unavailable("the engine is restarting")
        return await self.backend.list_directory(uuid, path)

    def download(self, uuid: str, path: str) -> Any:
        self.reads += 1
        return self.backend.download(uuid, path)


async def test_what_an_image_holds_is_read_once_and_then_kept_by_uuid(engine_home: Path) -> None:
    make_image(engine_home, "tools:1", {"/bin/bash": "", "/usr/bin/apt-get": ""})
    cache = CatalogCache(engine_home / "mcp" / "image-catalog.json")
    async with LocalEngine(engine_home) as engine:
        first = Counting(engine)
        described = await describe_images(first, cache=cache)
        assert first.reads > 0 and stat.S_IMODE(cache.path.stat().st_mode) == 0o600
        again = Counting(engine)
        assert await describe_images(again, cache=cache) == described and again.reads == 0
        # an image never changes, but its tags do: the listing names it
        await engine.set_tag(await engine.resolve_tag("tools:1"), "tools:2")
        renamed = Counting(engine)
        tags = {i.tag: i.package_manager for i in (await describe_images(renamed, cache=cache)).images}
        assert tags == {"busybox:latest": None, "tools:2": "apt-get"} and renamed.reads == 0


async def test_a_description_cut_short_by_a_failing_read_is_not_kept(engine_home: Path) -> None:
    cache = CatalogCache(engine_home / "mcp" / "image-catalog.json")
    async with LocalEngine(engine_home) as engine:
        failing = Counting(engine, fail="/bin")
        shown = await describe_images(failing, cache=cache)
        assert [i.tag for i in shown.images] == ["busybox:latest"] and cache.load() == {}
        healthy = Counting(engine)
        busybox = (await describe_images(healthy, cache=cache)).images[0]
        assert healthy.reads > 0 and busybox.shell == "/bin/sh" and busybox.busybox
        assert list(cache.load()) == [busybox.uuid]


async def test_an_unreadable_cache_is_described_afresh_and_replaced(engine_home: Path) -> None:
    cache = CatalogCache(engine_home / "mcp" / "image-catalog.json")
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_bytes(msgspec.json.encode({"code": cache.code, "images": {"x": 3}}))
    async with LocalEngine(engine_home) as engine:
        counting = Counting(engine)
        busybox = (await describe_images(counting, cache=cache)).images[0]
    assert counting.reads > 0 and busybox.busybox and list(cache.load()) == [busybox.uuid]


async def test_descriptions_another_version_of_the_code_wrote_are_made_again(
    engine_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an image holds is kept for the description code that found it out: after an upgrade (or an
    edit) of that code every image is described again, and the cache is replaced."""
    from tools.guides import catalog

    cache = CatalogCache(engine_home / "mcp" / "image-catalog.json")
    async with LocalEngine(engine_home) as engine:
        await describe_images(engine, cache=cache)
        assert cache.load()
        monkeypatch.setattr(catalog, "_code", lambda: cache.code + "-edited")
        newer = CatalogCache(cache.path)
        assert newer.load() == {}
        counting = Counting(engine)
        busybox = (await describe_images(counting, cache=newer)).images[0]
        assert counting.reads > 0 and list(newer.load()) == [busybox.uuid]
        assert cache.load() == {}  # the older code's reader no longer trusts it either
