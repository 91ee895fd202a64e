"""One test per COMPAT §15 defect that concerns tools, resources, prompts or configuration; each would
fail on contree-mcp 0.5.0's behaviour. (Transport-level ones are tested through the SDK elsewhere.)"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import webbrowser
from pathlib import Path
from typing import Any

import pytest

from contree import api
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
    ctx = FakeContext()
    task = asyncio.create_task(
        call(reg, "run", {"command": "sleep 100", "image": "busybox:latest", "timeout": 100}, ctx)
    )
    while not backend.spawned:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    ctx.cancel_requested = True  # what notifications/cancelled does before it cancels the handler
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (op_id,) = backend.ops
    assert backend.cancelled == [op_id]


async def test_22_a_waiting_run_outlives_a_session_that_ends(tmp_path: Path) -> None:
    """The reference's semantics: a client that goes away (no notifications/cancelled) cancels nothing."""
    backend = FakeBackend()
    reg, _ = make_registry(backend, tmp_path)
    task = asyncio.create_task(
        call(reg, "run", {"command": "sleep 100", "image": "busybox:latest", "timeout": 100}, FakeContext())
    )
    while not backend.spawned:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    task.cancel()  # the session closed: its handlers are cancelled
    with pytest.raises(asyncio.CancelledError):
        await task
    (op_id,) = backend.ops
    assert backend.cancelled == [] and backend.ops[op_id].status != "CANCELLED"


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


def _item(mode: int, *, is_symlink: bool = False) -> api.FileItem:
    return api.FileItem(
        size=0, path="x", owner=0, group=0, mode=mode, mtime=0, nlink=1, uid=0, gid=0, is_dir=False,
        is_regular=False, is_symlink=is_symlink, is_socket=False, is_fifo=False, symlink_to="",
    )  # fmt: skip


def test_36_list_files_reports_special_files() -> None:
    assert file_type(_item(0o010644)) == "fifo"
    assert file_type(_item(0o140755)) == "socket"
    assert file_type(_item(0o020666)) == "char_device"
    assert file_type(_item(0o060660)) == "block_device"
    assert file_type(_item(0o120777, is_symlink=True)) == "symlink"
    assert file_type(_item(0o100644)) == "file"


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


# --- added for the §15 audit (docs/compat-defects.md) ---------------------------------------------

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def test_01_no_mcp_sdk_in_the_server_and_bounded_dependencies() -> None:
    import ast
    import tomllib

    for package in ("protocol", "tools", "contree"):
        for source in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text(), str(source))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and node.level == 0
                    else []
                )
                assert not any(n == "mcp" or n.startswith("mcp.") for n in names), source
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert sorted(d.split(">")[0].split("<")[0].split("=")[0] for d in deps) == [
        "aiohttp",
        "msgspec",
        "xxhash",
    ]
    assert all(">=" in d and "<" in d.replace("<=", "") for d in deps), deps  # pinned below, bounded above
    assert not any(d.startswith("mcp") for d in deps)


NET_PROBE = """
import sys
def hook(event, args):
    if event == "socket.getaddrinfo":
        sys.stderr.write(f"NET getaddrinfo {args[0]!r}\\n")
    elif event == "socket.connect":
        sys.stderr.write(f"NET connect {args[1]!r}\\n")
sys.addaudithook(hook)
from tools.cli import main
sys.argv = ["contree-mcp", *sys.argv[1:]]
main()
"""


def _stdio_session(tmp_path: Path, *requests: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    lines = [init, {"jsonrpc": "2.0", "method": "notifications/initialized"}, *requests]
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            NET_PROBE,
            "--backend",
            "contree",
            "--url",
            "http://127.0.0.1:9",
            "--token",
            "t",
            "--auth-type",
            "jwt",
        ],
        input="".join(json.dumps(m) + "\n" for m in lines),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    replies = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return replies, [line for line in out.stderr.splitlines() if line.startswith("NET ")]


def test_03_startup_makes_no_network_call(tmp_path: Path) -> None:
    replies, net = _stdio_session(tmp_path, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    assert [r["id"] for r in replies] == [1, 2] and replies[1]["result"]["tools"]
    assert net == []  # no update check, no name lookup, no connection: not even to the backend
    # the probe does see network use: a tool call reaches the (loopback) backend
    call_list = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "list_images", "arguments": {}},
    }
    _, net = _stdio_session(tmp_path, call_list)
    assert net and all(any(host in line for host in LOOPBACK) for line in net), net


async def test_14_env_values_are_never_echoed_or_persisted(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    secret, injected = "s3cr3t-env-value-71", "s3cr3t-file-body-72"
    (tmp_path / "cfg.txt").write_text(injected)
    sid = (await call(reg, "rsync", {"source": str(tmp_path / "cfg.txt"), "destination": "/etc/app"}))[
        "structuredContent"
    ]["result"]
    out = await call(
        reg,
        "run",
        {
            "command": "env",
            "image": "busybox:latest",
            "env": {"TOKEN": secret},
            "directory_state_id": sid,
            "wait": False,
        },
    )
    op_id = out["structuredContent"]["result"]["operation_id"]
    backend.finish(op_id, stdout="done\n")
    got = await call(reg, "get_operation", {"operation_id": op_id})
    listed = await call(reg, "list_operations", {})
    await asyncio.sleep(0.05)  # let the background tracker start before closing
    await state.close()
    assert backend.spawned[0].env == {"TOKEN": secret}
    for result in (out, got, listed):
        assert secret not in json.dumps(result) and injected not in json.dumps(result)
    for stored in (tmp_path / "cache").rglob("*"):
        if stored.is_file():
            data = stored.read_bytes()
            assert secret.encode() not in data and injected.encode() not in data, stored


async def test_22_wait_false_operations_survive_server_shutdown(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    out = await call(reg, "run", {"command": "sleep 100", "image": "busybox:latest", "wait": False})
    op_id = out["structuredContent"]["result"]["operation_id"]
    await asyncio.sleep(0.1)  # the background lineage tracker is polling it
    await state.close()
    assert backend.cancelled == [] and backend.ops[op_id].status != "CANCELLED"


async def test_23_waiters_do_not_hold_a_concurrency_slot(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, _ = make_registry(backend, tmp_path)
    ops = [backend.add_op("EXECUTING") for _ in range(14)]
    waiters = [
        asyncio.create_task(call(reg, "wait_operations", {"operation_ids": [op], "timeout": 30}))
        for op in ops
    ]
    await asyncio.sleep(0.3)  # all 14 are waiting now
    backend.finish(ops[-1], stdout="last\n")  # 0.1.x: the 11th+ waiter queued behind ten long-lived slots
    done = await asyncio.wait_for(waiters[-1], 10)
    assert done["structuredContent"]["completed"] == [ops[-1]]
    assert not any(w.done() for w in waiters[:-1])
    for op in ops[:-1]:
        backend.finish(op, stdout="x")
    results = await asyncio.wait_for(asyncio.gather(*waiters[:-1]), 10)
    assert all(r["structuredContent"]["completed"] for r in results)


def test_28_the_builtin_excludes_the_guide_promises_exist() -> None:
    import re

    from contree.sync.excludes import Excludes

    text = (REPO / "tools" / "guides" / "reference.md").read_text()
    promised = re.search(r"Built-in excludes: (.*?); `exclude`", text, re.S)
    assert promised, "the reference guide lists the built-in excludes"
    names = re.findall(r"`([^`]+)`", promised.group(1))
    assert len(names) >= 8 and ".git" in names and "node_modules" in names
    excludes = Excludes()
    for name in names:
        sample = name.replace("*", "mod")
        assert excludes.excluded(f"deep/{sample}", not name.startswith("*")), name


async def test_30_states_never_mix_files_of_directories_sharing_content(tmp_path: Path) -> None:
    reg, state = make_registry(FakeBackend(), tmp_path)
    for name, files in (("a", ("x.txt", "both.txt")), ("b", ("y.txt", "both.txt"))):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("same content\n")
    ids = {}
    for name in ("a", "b", "a"):
        ids[name] = (await call(reg, "rsync", {"source": str(tmp_path / name), "destination": "/w"}))[
            "structuredContent"
        ]["result"]
    assert sorted(await state.dirstates.injected_files(None, ids["a"])) == ["/w/both.txt", "/w/x.txt"]
    assert sorted(await state.dirstates.injected_files(None, ids["b"])) == ["/w/both.txt", "/w/y.txt"]
    await state.close()


async def test_32_injected_modes_are_four_digit_permissions(tmp_path: Path) -> None:
    import re

    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    for name, mode in (("ro", 0o444), ("priv", 0o600), ("exe", 0o755), ("plain", 0o644)):
        (src / name).write_text(name)
        (src / name).chmod(mode)
    (src / "alias").symlink_to(src / "exe")
    sid = (await call(reg, "rsync", {"source": str(src), "destination": "/s"}))["structuredContent"]["result"]
    await call(
        reg, "run", {"command": "ls", "image": "busybox:latest", "directory_state_id": sid, "wait": False}
    )
    sent = backend.spawned[-1].files or {}
    await asyncio.sleep(0.05)  # let the background tracker start before closing
    await state.close()
    modes = {path: f.mode for path, f in sent.items()}
    assert modes == {
        "/s/ro": "0444",
        "/s/priv": "0600",
        "/s/exe": "0755",
        "/s/plain": "0644",
        "/s/alias": "0755",
    }
    assert all(re.fullmatch(r"0[0-7]{3}", m or "") for m in modes.values())


class _ChunkyBackend(FakeBackend):
    """Streams a large file in 64 KiB chunks, as the REST backend does."""

    def download(self, image_uuid: str, path: str) -> Any:
        async def gen() -> Any:
            for _ in range(32):
                yield b"z" * 65536

        return gen()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Any:
    import os

    if os.geteuid() != 0:
        pytest.fail("test_33 mounts a tiny tmpfs and needs root (Debian package: mount)")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        yield small
    finally:
        subprocess.run(["umount", str(small)], check=True)


async def test_33_download_fails_promptly_when_the_disk_is_full(tmp_path: Path, tiny_tmpfs: Path) -> None:
    reg, _ = make_registry(_ChunkyBackend(), tmp_path, roots=[tiny_tmpfs])
    args = {"image": "busybox:latest", "path": "/big", "destination": str(tiny_tmpfs / "big")}
    out = await asyncio.wait_for(call(reg, "download", args), 20)  # 2 MiB into 256 KiB: 0.5.0 loops forever
    assert out["isError"] and "No space left on device" in text_of(out)
    assert os.listdir(tiny_tmpfs) == []  # the partial temp file is gone


async def test_37_rsync_walks_and_reads_off_the_event_loop(tmp_path: Path, monkeypatch: Any) -> None:
    import builtins
    import os
    import threading

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        (src / "sub" / f"f{i}.txt").write_text(f"file {i}\n")
    loop_thread = threading.get_ident()
    touched: list[tuple[str, bool]] = []
    real_scandir, real_open, real_os_open = os.scandir, builtins.open, os.open

    def note(what: str, path: Any) -> None:
        if str(path).startswith(str(src)):
            touched.append((what, threading.get_ident() == loop_thread))

    def scandir(path: Any = ".") -> Any:
        note("scandir", path)
        return real_scandir(path)

    def open_(file: Any, *a: Any, **k: Any) -> Any:
        note("open", file)
        return real_open(file, *a, **k)

    def os_open(path: Any, *a: Any, **k: Any) -> Any:
        note("os.open", path)
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    reg, state = make_registry(FakeBackend(), tmp_path)
    out = await call(reg, "rsync", {"source": str(src), "destination": "/w"})
    monkeypatch.undo()
    await state.close()
    assert not out.get("isError"), out
    assert any(what == "scandir" for what, _ in touched) and any("open" in what for what, _ in touched)
    assert [t for t in touched if t[1]] == []  # nothing touched the tree on the event loop thread


async def test_41_stored_credentials_survive_transient_registry_errors(tmp_path: Path) -> None:
    from aiohttp import web

    from contree.oci.credentials import validate_credentials
    from contree.oci.registry import Timeouts
    from tests.oci import harness

    answer = {"status": 503}
    release = asyncio.Event()

    async def v2(request: web.Request) -> web.Response:
        if answer["status"] == 0:
            await release.wait()  # a registry that never answers (until the test ends)
        headers = {"WWW-Authenticate": 'Basic realm="r"'} if answer["status"] == 401 else {}
        return web.Response(status=answer["status"], headers=headers)

    app = web.Application()
    app.router.add_get("/v2/", v2)
    runner, port = await harness.serve_app(app)
    try:
        host = f"127.0.0.1:{port}"
        backend = FakeBackend()
        reg, state = make_registry(backend, tmp_path)
        state.credentials.put(host, "alice", "pat-123")
        out = await call(reg, "import_image", {"registry_url": f"{host}/team/app:1", "wait": False})
        assert not out.get("isError"), out  # a 503 is no verdict: the import goes ahead with the credentials
        sent = backend.imports[-1].registry.credentials
        assert sent is not None and (sent.username, sent.password) == ("alice", "pat-123")
        assert state.credentials.get(host) is not None
        answer["status"] = 0  # hanging: the probe gives up in time and still keeps the credentials
        check = await asyncio.wait_for(
            validate_credentials(host, "alice", "pat-123", timeouts=Timeouts(connect=1.0, request=0.5)), 10
        )
        assert check.status == "unreachable"
        answer["status"] = 401  # a definite refusal is the only thing that drops them
        refused = await call(reg, "import_image", {"registry_url": f"{host}/team/app:1", "wait": False})
        assert refused["isError"] and f"Not authenticated with '{host}'" in text_of(refused)
        assert state.credentials.get(host) is None
        await state.close()
    finally:
        release.set()
        await runner.cleanup()


class _StalledBackend(FakeBackend):
    """Sends one chunk, then stalls: the download can only end by cancellation."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()

    def download(self, image_uuid: str, path: str) -> Any:
        async def gen() -> Any:
            yield b"partial"
            self.started.set()
            await asyncio.Event().wait()
            yield b""  # pragma: no cover

        return gen()


async def test_33_download_honours_cancellation_and_leaves_nothing(tmp_path: Path) -> None:
    backend = _StalledBackend()
    dest = tmp_path / "out"
    dest.mkdir()
    reg, _ = make_registry(backend, tmp_path)
    args = {"image": "busybox:latest", "path": "/f", "destination": str(dest / "f")}
    task = asyncio.create_task(call(reg, "download", args))
    await asyncio.wait_for(backend.started.wait(), 5)
    assert len(os.listdir(dest)) == 1  # the temp file is being written
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert os.listdir(dest) == []


async def test_52_every_call_and_field_in_the_guides_is_real(tmp_path: Path) -> None:
    import re

    import msgspec

    from tools.guides import GUIDES, guide_text
    from tools.models import OperationOutput, WaitOperationsOutput

    reg, _ = make_registry(FakeBackend(), tmp_path)
    text = "\n".join(guide_text(g, kind) for g in GUIDES for kind in ("local", "contree"))
    names = "|".join(sorted(reg.tools, key=len, reverse=True))
    calls = list(re.finditer(rf"\b({names})\(([^()]*)\)", text))
    assert len(calls) >= 30  # the guides are example-heavy; the pattern really finds them
    unknown = [
        (c.group(0), kw)
        for c in calls
        for kw in re.findall(r"(?:^|[,(]\s*)(\w+)\s*=", c.group(2))
        if kw not in reg.tools[c.group(1)].input_schema.get("properties", {})
    ]
    assert unknown == []  # 0.5.0's guides: list_operations(kind=…, until=…) that the tool did not take
    assert re.findall(r'destination="(?!/)[^"]*"', text) == []  # relative destinations are rejected
    results = re.search(r"Results: (.*?)\.\n", text, re.S)
    assert results, "the reference guide lists run's result fields"
    run_fields = {f.name for f in msgspec.structs.fields(OperationOutput)}
    promised = set(re.findall(r"`(\w+)`", results.group(1)))
    assert len(promised) >= 10 and promised <= run_fields, promised - run_fields
    wait_fields = {f.name for f in msgspec.structs.fields(WaitOperationsOutput)}
    assert {"pending", "timed_out", "completed"} <= wait_fields
    assert "UUID prefix" not in text.replace("never a UUID prefix", "")


class _SlowImportBackend(FakeBackend):
    async def import_image(self, request: Any) -> str:
        self.imports.append(request)
        return self.add_op("PENDING", "image_import")


async def test_21_import_wait_is_bounded_and_sends_progress(tmp_path: Path) -> None:
    backend = _SlowImportBackend()
    reg, state = make_registry(backend, tmp_path)
    state.run_grace_seconds = 0.3
    ctx = FakeContext()
    args = {
        "registry_url": "docker://alpine:3.20",
        "timeout": 1,
        "i_accept_that_anonymous_access_might_be_rate_limited": True,
    }
    out = await asyncio.wait_for(call(reg, "import_image", args, ctx), 10)
    assert not out.get("isError"), out
    result = out["structuredContent"]["result"]
    assert (result["status"], result["kind"]) == ("PENDING", "image_import")
    assert ctx.progress_calls and backend.cancelled == []


def test_39_lineage_retention_follows_last_use_not_creation(tmp_path: Path) -> None:
    import sqlite3
    import time

    from tools.stores.lineage import EdgeStore

    path = tmp_path / "lineage.db"
    store = EdgeStore(path)
    store.record("p", "child", "parent", operation_id="op1", kind="instance")
    store.close()
    old = time.time() - 100 * 86400
    with sqlite3.connect(path) as db:
        db.execute("UPDATE lineage SET created_at=?", (old,))  # created long ago, updated just now
    store = EdgeStore(path)
    store.prune(60)
    assert store.row("p", "child") is not None  # 0.5.0 pruned by created_at: gone after 60 days
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE lineage SET updated_at=?", (old,))
    store = EdgeStore(path)
    store.prune(60)
    assert store.row("p", "child") is None
    store.close()


async def test_39_using_a_directory_state_keeps_it(tmp_path: Path) -> None:
    import time

    reg, state = make_registry(FakeBackend(), tmp_path)
    (tmp_path / "f.txt").write_text("x")
    sid = (await call(reg, "rsync", {"source": str(tmp_path / "f.txt"), "destination": "/d"}))[
        "structuredContent"
    ]["result"]
    db = state.dirstates._db
    db.execute("UPDATE states SET used_at=?", (time.time() - 100 * 86400,))
    db.commit()
    await call(
        reg, "run", {"command": "ls", "image": "busybox:latest", "directory_state_id": sid, "wait": False}
    )
    state.dirstates.prune(60)  # the run just used it
    assert await state.dirstates.injected_files(None, sid)
    db.execute("UPDATE states SET used_at=?", (time.time() - 100 * 86400,))
    db.commit()
    state.dirstates.prune(60)
    out = await call(reg, "run", {"command": "ls", "image": "busybox:latest", "directory_state_id": sid})
    assert out["isError"] and "Directory state not found" in text_of(out)
    await asyncio.sleep(0.05)
    await state.close()


async def test_26_list_operations_sends_offset_until_and_normalised_status(tmp_path: Path) -> None:
    from contree.backend import OperationQuery

    backend = FakeBackend()
    seen: list[OperationQuery] = []
    original = backend.list_operations

    async def recording(query: OperationQuery) -> Any:
        seen.append(query)
        return await original(query)

    backend.list_operations = recording  # type: ignore[method-assign]
    reg, _ = make_registry(backend, tmp_path)
    for alias, status in (("pending", "PENDING"), ("running", "EXECUTING"), ("failed", "FAILED")):
        args = {"status": alias, "offset": 5, "until": "2h", "limit": 7}
        out = await call(reg, "list_operations", args)
        assert not out.get("isError"), out
        query = seen[-1]
        assert (query.status, query.offset, query.until, query.limit) == (status, 5, "2h", 7)


async def test_10_state_ids_are_unguessable(tmp_path: Path) -> None:
    reg, state = make_registry(FakeBackend(), tmp_path)
    ids = []
    for i in range(6):
        (tmp_path / f"f{i}.txt").write_text(f"content {i}")
        out = await call(reg, "rsync", {"source": str(tmp_path / f"f{i}.txt"), "destination": "/d"})
        ids.append(out["structuredContent"]["result"])
    assert len(set(ids)) == 6 and max(ids) > 2**32  # drawn from a large space, not a counter
    assert all(abs(a - b) > 1000 for a, b in itertools.pairwise(ids))
    same = tmp_path / "f0.txt"
    theirs = await call(reg, "rsync", {"source": str(same), "destination": "/d"}, FakeContext("bob"))
    assert theirs["structuredContent"]["result"] != ids[0]  # same content, another principal: another id
    await state.close()


class _SpecialFilesBackend(FakeBackend):
    async def list_directory(self, image_uuid: str, path: str) -> Any:
        from contree import api

        def item(name: str, mode: int, **flags: bool) -> api.FileItem:
            base = {
                "is_dir": False,
                "is_regular": False,
                "is_symlink": False,
                "is_socket": False,
                "is_fifo": False,
            }
            return api.FileItem(
                size=0,
                path=f"{path.rstrip('/')}/{name}",
                owner="root",
                group="root",
                mode=mode,
                mtime=0,
                nlink=1,
                uid=0,
                gid=0,
                **{**base, **flags},
                symlink_to="",
            )

        return api.DirectoryList(
            path=path,
            files=[
                item("pipe", 0o010644, is_fifo=True),
                item("sock", 0o140755, is_socket=True),
                item("null", 0o020666),
                item("sda", 0o060660),
                item("plain", 0o100644, is_regular=True),
                item("sub", 0o040755, is_dir=True),
            ],
        )


async def test_36_the_list_files_tool_names_special_files(tmp_path: Path) -> None:
    reg, _ = make_registry(_SpecialFilesBackend(), tmp_path)
    out = await call(reg, "list_files", {"image": "busybox:latest", "path": "/dev"})
    assert not out.get("isError"), out
    kinds = {f["name"]: f["type"] for f in out["structuredContent"]["files"]}
    assert kinds == {
        "pipe": "fifo",
        "sock": "socket",
        "null": "char_device",
        "sda": "block_device",
        "plain": "file",
        "sub": "directory",
    }
