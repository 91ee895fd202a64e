"""rsync / upload / download: excludes, immutable directory states, allowed roots, atomic writes
(COMPAT §12 and §15.5-7, 27-35)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contree.errors import NotFound
from contree.sync.excludes import Excludes
from tests.tools.fakes import FakeBackend, call, make_registry


@pytest.mark.parametrize(
    ("rel", "is_dir", "excluded"),
    [
        ("web/node_modules", True, True),
        (".git", True, True),
        (".github", True, False),
        (".gitignore", False, False),
        ("pkg/mod.pyc", False, True),
        ("notes.pyc_old", False, False),
        ("src/__pycache__", True, True),
        ("Build", True, False),  # case-sensitive
    ],
)
def test_builtin_excludes_match_per_component(rel: str, is_dir: bool, excluded: bool) -> None:
    assert Excludes().excluded(rel, is_dir) is excluded


def test_user_patterns_anchor_dironly_doublestar_and_negation() -> None:
    ex = Excludes(["/top.txt", "logs/", "a/**/z.txt", "!dist", "*.tmp"])
    assert ex.excluded("top.txt", False) and not ex.excluded("sub/top.txt", False)
    assert ex.excluded("x/logs", True) and not ex.excluded("x/logs", False)
    assert ex.excluded("a/b/c/z.txt", False) and ex.excluded("a/z.txt", False)
    assert not ex.excluded("dist", True)
    assert ex.excluded("deep/er/f.tmp", False)
    assert not Excludes(["a.c"]).excluded("abc", False)  # '.' is literal, never a regex


def tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


async def test_rsync_ids_are_immutable_content_snapshots(tmp_path: Path) -> None:
    backend = FakeBackend()
    src = tmp_path / "proj"
    tree(src, {"main.py": "print(1)\n", "web/node_modules/x.js": "junk", ".git/HEAD": "ref", "a.pyc": "bin"})
    reg, state = make_registry(backend, tmp_path)
    first = (await call(reg, "rsync", {"source": str(src), "destination": "/app/"}))["structuredContent"][
        "result"
    ]
    again = (await call(reg, "rsync", {"source": str(src), "destination": "/app"}))["structuredContent"][
        "result"
    ]
    assert isinstance(first, int) and 0 < first < 2**53 and first == again
    files = await state.dirstates.injected_files(None, first)
    assert sorted(files) == ["/app/main.py"]
    assert files["/app/main.py"].mode == "0644"
    (src / "main.py").write_text("print(2)\n")
    (src / "run.sh").write_text("echo\n")
    os.chmod(src / "run.sh", 0o755)
    second = (await call(reg, "rsync", {"source": str(src), "destination": "/app"}))["structuredContent"][
        "result"
    ]
    assert second != first
    assert sorted(await state.dirstates.injected_files(None, first)) == ["/app/main.py"]  # old id unchanged
    assert (await state.dirstates.injected_files(None, second))["/app/run.sh"].mode == "0755"
    # numeric strings are accepted in run
    await call(
        reg,
        "run",
        {"command": "ls", "image": "busybox:latest", "directory_state_id": str(second), "wait": False},
    )
    assert set(backend.spawned[-1].files or {}) == {"/app/main.py", "/app/run.sh"}
    await state.close()


async def test_rsync_single_file_source(tmp_path: Path) -> None:
    reg, state = make_registry(FakeBackend(), tmp_path)
    (tmp_path / "one.txt").write_text("x")
    sid = (await call(reg, "rsync", {"source": str(tmp_path / "one.txt"), "destination": "/d"}))[
        "structuredContent"
    ]["result"]
    assert list(await state.dirstates.injected_files(None, sid)) == ["/d/one.txt"]


async def test_rsync_refuses_outside_roots_and_skips_escaping_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    tree(outside, {"secret.txt": "s3cr3t"})
    tree(root, {"ok.txt": "ok"})
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    (root / "leakdir").symlink_to(outside)
    (root / "alias.txt").symlink_to(root / "ok.txt")
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path, roots=[root])
    refused = await call(reg, "rsync", {"source": str(outside), "destination": "/x"})
    assert refused["isError"] and "outside the allowed roots" in refused["content"][0]["text"]
    via_link = await call(reg, "rsync", {"source": str(root / "leakdir"), "destination": "/x"})
    assert via_link["isError"]
    sid = (await call(reg, "rsync", {"source": str(root), "destination": "/x"}))["structuredContent"][
        "result"
    ]
    assert sorted(await state.dirstates.injected_files(None, sid)) == ["/x/alias.txt", "/x/ok.txt"]
    assert all(b != b"s3cr3t" for b in backend.blobs.values())
    rel = await call(reg, "rsync", {"source": "relative/dir", "destination": "/x"})
    assert rel["content"][0]["text"].endswith("source must be an absolute path, got: relative/dir")


async def test_upload_modes(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, _ = make_registry(backend, tmp_path, roots=[tmp_path / "in"])
    empty = (await call(reg, "upload", {"content": ""}))["structuredContent"]
    assert empty["size"] == 0 and backend.blobs[empty["sha256"]] == b""
    b64 = (await call(reg, "upload", {"content_base64": "AAEC"}))["structuredContent"]
    assert backend.blobs[b64["sha256"]] == b"\x00\x01\x02"
    none = await call(reg, "upload", {})
    assert none["content"][0]["text"].endswith("One of 'path', 'content', or 'content_base64' is required")
    rel = await call(reg, "upload", {"path": "x.txt"})
    assert "must be an absolute path" in rel["content"][0]["text"]
    (tmp_path / "secret").write_text("s")
    out = await call(reg, "upload", {"path": str(tmp_path / "secret")})
    assert out["isError"] and "outside the allowed roots" in out["content"][0]["text"]


async def test_download_is_atomic_confined_and_respects_overwrite(tmp_path: Path) -> None:
    backend = FakeBackend()
    image = backend.add_image("art:1", {"/out/tool": b"#!/bin/sh\necho hi\n" * 100})
    root = tmp_path / "root"
    root.mkdir()
    reg, _ = make_registry(backend, tmp_path, roots=[root])
    dest = root / "sub" / "tool"
    out = (
        await call(
            reg,
            "download",
            {"image": "art:1", "path": "/out/tool", "destination": str(dest), "executable": True},
        )
    )["structuredContent"]
    assert out["success"] and out["size"] == dest.stat().st_size and out["source"]["image"] == image
    assert dest.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in dest.parent.iterdir()] == ["tool"]  # no temp file left
    refused = await call(
        reg, "download", {"image": "art:1", "path": "/out/tool", "destination": str(dest), "overwrite": False}
    )
    assert refused["isError"] and "exists" in refused["content"][0]["text"]
    outside = await call(
        reg, "download", {"image": "art:1", "path": "/out/tool", "destination": str(tmp_path / "elsewhere")}
    )
    assert outside["isError"] and not (tmp_path / "elsewhere").exists()
    # a symlinked directory pointing out of the root is refused; a symlink at the destination is replaced,
    # never written through
    (root / "escape").symlink_to(tmp_path)
    esc = await call(
        reg, "download", {"image": "art:1", "path": "/out/tool", "destination": str(root / "escape" / "x")}
    )
    assert esc["isError"] and not (tmp_path / "x").exists()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (root / "link").symlink_to(victim)
    await call(
        reg,
        "download",
        {"image": "art:1", "path": "/out/tool", "destination": str(root / "link"), "overwrite": True},
    )
    assert victim.read_text() == "keep" and not (root / "link").is_symlink()
    missing = await call(reg, "download", {"image": "art:1", "path": "/nope", "destination": str(root / "n")})
    assert missing["isError"] and [p.name for p in root.iterdir() if p.name.startswith(".")] == []


async def test_download_overwrites_by_default_and_refuses_only_when_asked(tmp_path: Path) -> None:
    """0.5.0 replaces an existing file (agents download the same artifact again); overwrite=false refuses,
    also when the file appears while the download is being written."""
    backend = FakeBackend()
    backend.add_image("art:1", {"/a": b"first version\n"})
    backend.add_image("art:2", {"/a": b"second version\n"})
    reg, _ = make_registry(backend, tmp_path)
    dest = tmp_path / "artifact"
    for tag in ("art:1", "art:2"):
        out = await call(reg, "download", {"image": tag, "path": "/a", "destination": str(dest)})
        assert not out.get("isError"), out
    assert dest.read_bytes() == b"second version\n" and sorted(os.listdir(tmp_path)) == ["artifact", "cache"]
    refused = await call(
        reg, "download", {"image": "art:1", "path": "/a", "destination": str(dest), "overwrite": False}
    )
    assert refused["isError"] and "exists" in refused["content"][0]["text"]
    assert dest.read_bytes() == b"second version\n"

    class Racing(FakeBackend):
        def download(self, image_uuid: str, path: str) -> AsyncIterator[bytes]:
            async def gen() -> AsyncIterator[bytes]:
                yield b"from the image"
                (tmp_path / "late").write_text("written meanwhile")  # appears after the existence check

            return gen()

    racing = Racing()
    racing.add_image("art:1", {"/a": b"x"})
    reg2, _ = make_registry(racing, tmp_path)
    late = await call(
        reg2,
        "download",
        {"image": "art:1", "path": "/a", "destination": str(tmp_path / "late"), "overwrite": False},
    )
    assert late["isError"] and (tmp_path / "late").read_text() == "written meanwhile"
    assert [n for n in os.listdir(tmp_path) if n.endswith(".part")] == []


async def test_run_restores_blobs_that_vanished_from_the_backend(tmp_path: Path) -> None:
    backend = FakeBackend()
    src = tmp_path / "proj"
    tree(src, {"a/b.txt": "bee", "c.txt": "sea", "build/out.txt": "dee"})
    (src / "alias.txt").symlink_to("build/out.txt")  # synced as its (excluded) target's content
    reg, state = make_registry(backend, tmp_path)
    sid = (await call(reg, "rsync", {"source": str(src), "destination": "/w"}))["structuredContent"]["result"]
    backend.files.clear()  # the server garbage-collected every blob
    backend.blobs.clear()

    original_spawn = backend.spawn

    async def strict_spawn(request: Any) -> Any:
        for injected in (request.files or {}).values():
            if not any(f.uuid == injected.uuid for f in backend.files.values()):
                raise NotFound(f"file {injected.uuid} not found")
        return await original_spawn(request)

    backend.spawn = strict_spawn  # type: ignore[method-assign]
    out = await call(
        reg, "run", {"command": "ls", "image": "busybox:latest", "directory_state_id": sid, "wait": False}
    )
    assert not out.get("isError"), out
    assert sorted(backend.blobs.values()) == [b"bee", b"dee", b"sea"]
    (src / "c.txt").write_text("changed")
    backend.files.clear()
    changed = await call(
        reg, "run", {"command": "ls", "image": "busybox:latest", "directory_state_id": sid, "wait": False}
    )
    assert changed["isError"] and "run rsync again" in changed["content"][0]["text"]
    await state.close()


async def test_directory_states_are_pruned_by_last_use(tmp_path: Path) -> None:
    reg, state = make_registry(FakeBackend(), tmp_path)
    (tmp_path / "f.txt").write_text("x")
    sid = (await call(reg, "rsync", {"source": str(tmp_path / "f.txt"), "destination": "/d"}))[
        "structuredContent"
    ]["result"]
    state.dirstates.prune(1)  # used just now: kept
    assert await state.dirstates.injected_files(None, sid)
    state.dirstates.prune(-1)  # everything counts as unused
    out = await call(reg, "run", {"command": "ls", "image": "busybox:latest", "directory_state_id": sid})
    assert out["isError"] and "Directory state not found" in out["content"][0]["text"]
    await state.close()
