"""One test per COMPAT §15 defect that concerns tools, resources, prompts or configuration; each would
fail on contree-mcp 0.5.0's behaviour. (Transport-level ones are tested through the SDK elsewhere.)"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import webbrowser
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import ResourceNotFound
from tests.tools.fakes import FakeBackend, FakeContext, call, make_registry
from tools import prompts
from tools.inspect_tools import file_type


def text_of(out: dict[str, Any]) -> str:
    return str(out["content"][0]["text"])


# --- packaging and startup -------------------------------------------------------------------------


def test_04_help_names_only_real_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tools", "--help"], capture_output=True, text=True, check=True
    )
    assert "--http-port" in out.stdout and "--port " not in out.stdout
    version = subprocess.run(
        [sys.executable, "-m", "tools", "-V"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip().startswith("contree-mcp/")


# --- security --------------------------------------------------------------------------------------


def test_08_http_beyond_loopback_requires_a_token() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools",
            "--mode",
            "http",
            "--http-listen",
            "0.0.0.0",
            "--backend",
            "contree",
            "--url",
            "http://127.0.0.1:9",
            "--token",
            "t",
            "--auth-type",
            "jwt",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
    )
    assert out.returncode == 2 and "--http-token" in out.stderr and out.stdout == ""


async def test_10_directory_states_are_scoped_per_principal(tmp_path: Path) -> None:
    reg, state = make_registry(FakeBackend(), tmp_path)
    (tmp_path / "f.txt").write_text("x")
    sid = (
        await call(
            reg, "rsync", {"source": str(tmp_path / "f.txt"), "destination": "/d"}, FakeContext("alice")
        )
    )["structuredContent"]["result"]
    run = await call(
        reg,
        "run",
        {"command": "ls", "image": "busybox:latest", "directory_state_id": sid, "wait": False},
        FakeContext("mallory"),
    )
    assert run["isError"] and text_of(run).endswith(f"Directory state not found: {sid}")
    await state.close()


async def test_12_token_obtain_never_opens_a_browser_in_http_mode(tmp_path: Path, monkeypatch: Any) -> None:
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url))
    monkeypatch.setenv("DISPLAY", ":0")
    reg, state = make_registry(FakeBackend(), tmp_path)
    state.http_mode = True
    out = (await call(reg, "registry_token_obtain", {"registry_url": "docker.io"}))["structuredContent"]
    await asyncio.sleep(0.1)
    assert out["status"] == "success" and out["url"].startswith("https://app.docker.com/")
    assert "Browser opened" not in out["message"] and opened == []
    unknown = (await call(reg, "registry_token_obtain", {"registry_url": "quay.example.org"}))[
        "structuredContent"
    ]
    assert unknown["status"] == "error" and unknown["message"].startswith(
        "Unknown registry 'quay.example.org'"
    )


async def test_13_ids_and_tags_are_validated_before_any_backend_call(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, _ = make_registry(backend, tmp_path)
    for bad in ("../images", "tag:../x", "a b", ""):
        out = await call(reg, "get_image", {"image": bad})
        assert out["isError"], bad
    out = await call(reg, "set_tag", {"image_uuid": backend.busybox, "tag": "../../etc"})
    assert out["isError"] and "Invalid tag" in text_of(out)


async def test_15_backend_errors_reach_the_model_without_tracebacks(tmp_path: Path) -> None:
    reg, _ = make_registry(FakeBackend(), tmp_path)
    out = await call(reg, "get_operation", {"operation_id": "3fa85f64-5717-4562-b3fc-2c963f66afa6"})
    assert out["isError"] and "Traceback" not in text_of(out)
    assert text_of(out).startswith("Error executing tool get_operation: ")


# --- operations ------------------------------------------------------------------------------------


async def test_21_run_wait_is_bounded_and_sends_progress(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    state.run_grace_seconds = 0.3
    ctx = FakeContext()
    out = await asyncio.wait_for(
        call(reg, "run", {"command": "sleep 1000", "image": "busybox:latest", "timeout": 1}, ctx), 10
    )
    assert out["structuredContent"]["result"]["status"] == "PENDING"
    assert ctx.progress_calls


async def test_22_cancelling_a_waiting_run_cancels_its_operation(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, _ = make_registry(backend, tmp_path)
    task = asyncio.create_task(
        call(reg, "run", {"command": "sleep 100", "image": "busybox:latest", "timeout": 100})
    )
    while not backend.spawned:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (op_id,) = backend.ops
    assert backend.cancelled == [op_id]


# --- files and inspection --------------------------------------------------------------------------


async def test_34_read_file_is_capped_and_reports_truncation(tmp_path: Path) -> None:
    backend = FakeBackend()
    backend.add_image("big:1", {"/big.txt": b"0123456789" * 100})
    reg, state = make_registry(backend, tmp_path)
    state.read_max_bytes = 64
    out = (await call(reg, "read_file", {"image": "big:1", "path": "/big.txt"}))["structuredContent"]
    assert out["truncated"] is True and len(out["content"]) == 64 and "offset=64" in out["hint"]
    page = (await call(reg, "read_file", {"image": "big:1", "path": "/big.txt", "offset": 990}))[
        "structuredContent"
    ]
    assert page["content"] == "0123456789" and page["truncated"] is False


def test_36_list_files_reports_special_files() -> None:
    assert file_type({"mode": 0o010644}) == "fifo"
    assert file_type({"mode": 0o140755}) == "socket"
    assert file_type({"mode": 0o020666}) == "char_device"
    assert file_type({"mode": 0o060660}) == "block_device"
    assert file_type({"mode": 0o120777, "is_symlink": True}) == "symlink"
    assert file_type({"mode": 0o100644}) == "file"


# --- images and registries -------------------------------------------------------------------------


async def test_40_docker_references_name_the_right_registry(tmp_path: Path) -> None:
    reg, _ = make_registry(FakeBackend(), tmp_path)
    for url, host in (
        ("docker://python:3.11-slim", "docker.io"),
        ("docker://localhost:5000/img", "localhost:5000"),
        ("ghcr.io/x/y:1", "ghcr.io"),
        ("docker://pytorch/pytorch:2.0", "docker.io"),
    ):
        out = await call(reg, "import_image", {"registry_url": url})
        assert f"Not authenticated with '{host}'" in text_of(out), url


async def test_42_get_image_accepts_bare_tags(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, _ = make_registry(backend, tmp_path)
    for ref in ("busybox:latest", "tag:busybox:latest", backend.busybox):
        assert (await call(reg, "get_image", {"image": ref}))["structuredContent"]["uuid"] == backend.busybox


async def test_43_tag_prefix_really_is_a_prefix(tmp_path: Path) -> None:
    backend = FakeBackend()
    backend.add_image("common/python/debian:12")
    backend.add_image("commonx/evil:1")
    reg, _ = make_registry(backend, tmp_path)
    out = (await call(reg, "list_images", {"tag_prefix": "common/"}))["structuredContent"]
    assert [i["tag"] for i in out["images"]] == ["common/python/debian:12"]
    assert backend.image_queries[-1].tag == "common"


async def test_44_set_tag_can_remove_one_tag(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, _ = make_registry(backend, tmp_path)
    out = await call(reg, "set_tag", {"image_uuid": backend.busybox, "remove_tag": "busybox:latest"})
    assert out["structuredContent"]["tag"] is None
    out = await call(reg, "set_tag", {"image_uuid": backend.busybox, "tag": "mine/x:1"})
    assert out["structuredContent"]["tag"] == "mine/x:1"


# --- output and structure --------------------------------------------------------------------------


async def test_46_lineage_records_wait_false_runs_backfills_and_children_are_direct(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    a = backend.busybox
    b, c = backend.add_image(None), backend.add_image(None)
    # B ← A is learned after C ← B (back-fill), via a wait=false run tracked in the background
    op_bc = backend.add_op("SUCCESS", image_uuid=b, result_image_uuid=c)
    await call(reg, "get_operation", {"operation_id": op_bc})
    out = await call(reg, "run", {"command": "x", "image": a, "disposable": False, "wait": False})
    op_ab = out["structuredContent"]["result"]["operation_id"]
    backend.finish(op_ab, result_image=b)
    for _ in range(50):
        if (await state.lineage.view(b)).parent == a:
            break
        await asyncio.sleep(0.1)
    contents = await reg.read_resource(f"contree://image/{a}/lineage", FakeContext())  # type: ignore[arg-type]
    view = json.loads(contents[0].text or "")
    assert view["children"] == [b] and view["descendants"] == [b, c]
    assert contents[0].mime_type == "application/json"
    view_c = await state.lineage.view(c)
    assert (view_c.parent, view_c.ancestors, view_c.root, view_c.depth) == (b, [b, a], a, 2)
    await state.close()


async def test_47_resource_mime_types_match_content(tmp_path: Path) -> None:
    reg, _ = make_registry(FakeBackend(), tmp_path)
    mimes = {t.name: t.mime_type for t in reg.templates.values()}
    assert mimes["image_lineage"] == "application/json" and mimes["instance_operation"] == "application/json"


async def test_48_unknown_resources_are_not_found(tmp_path: Path) -> None:
    reg, _ = make_registry(FakeBackend(), tmp_path)
    with pytest.raises(ResourceNotFound):
        await reg.read_resource("contree://nope", FakeContext())  # type: ignore[arg-type]
    with pytest.raises(ResourceNotFound):
        uri = "contree://operations/instance/3fa85f64-5717-4562-b3fc-2c963f66afa6"
        await reg.read_resource(uri, FakeContext())  # type: ignore[arg-type]


def test_51_prompts_survive_whitespace_and_multiline_arguments() -> None:
    body = prompts.render(
        "prepare-environment", {"task": "train\n  a model\n1. not a step", "packages": "   "}
    )
    assert "custom-env" in body
    assert "   ```\n   train\n     a model\n   1. not a step\n   ```" in body
    assert (
        prompts.render("prepare-environment", {"task": "t", "packages": "torch==2.1 numpy"}).count(
            "common/torch-env/python:3.11-slim"
        )
        >= 1
    )
    sync = prompts.render("sync-and-run", {"source": "/src", "command": "make"})
    assert "no Python" in sync and "Python-ready" not in sync


def test_52_guides_name_real_fields_and_flags() -> None:
    from tools.guides import GUIDES, guide_text

    text = "\n".join(guide_text(g, "local") for g in GUIDES)
    for gone in ("[TRUNCATED]", "ds_abc123", "--port ", "docker.io/python:", "microVM"):
        assert gone not in text, gone
    for real in ("stdout_truncated", "filesystem_changed", "result_image", "pending", "--allowed-root"):
        assert real in text, real


async def test_07_local_image_archives_are_read_only_inside_the_allowed_roots(tmp_path: Path) -> None:
    backend = FakeBackend()
    root = tmp_path / "root"
    root.mkdir()
    reg, _ = make_registry(backend, tmp_path, roots=[root])
    for url in ("oci-archive:/etc/shadow", "docker-archive:/root/x.tar", "oci:relative/layout"):
        out = await call(reg, "import_image", {"registry_url": url})
        assert out["isError"], url
    assert backend.imports == []
    (root / "img.tar").write_bytes(b"x")
    ok = await call(reg, "import_image", {"registry_url": f"oci-archive:{root / 'img.tar'}"})
    assert not ok.get("isError") and backend.imports[0].registry.url.endswith("img.tar")
