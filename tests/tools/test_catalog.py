"""What the guidance says an image contains is read from the image itself, never from its name."""

from __future__ import annotations

from pathlib import Path

from contree.engine.local import LocalEngine
from contree.engine.storage.store import ImageConfig, Store
from tools.guides.catalog import describe_images
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
