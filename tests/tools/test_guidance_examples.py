"""Guidance that tells the truth on the embedded engine: every example in the guides, the prompts and
the docs site (```calls blocks, tool calls an agent can make as printed) runs green against a real
server, and the texts name the images that exist here instead of the cloud's.

Examples marked `# needs network` (package installs, registry imports) are checked against the tools'
input schemas but not run: tests reach no host beyond loopback. The engine gets busybox:latest and a
Python image built from this machine's own Python (no network), so the Python examples run too.
"""

from __future__ import annotations

import ast
import html
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

from contree.engine.storage.store import Store
from tests.netutil import free_port
from tests.tools.conftest import http_server
from tests.tools.test_sdk_tools import result
from tools.guides import GUIDES

CALLS = re.compile(r"```calls\n(.*?)```", re.S)
JSON_NAMES = {"true": True, "false": False, "null": None}
CLOUD_ONLY = (
    "garbage-collected",
    "garbage collection",
    "ubuntu:noble",
    "common/python",
    'tag_prefix="common/")',
)


def host_python_image(home: Path) -> None:
    """`hostpython:3.11`: busybox plus this machine's python3.11, its libraries and stdlib."""
    binary = Path(os.path.realpath("/usr/bin/python3"))
    if not binary.name.startswith("python3."):
        raise AssertionError(f"unexpected host python {binary}: install the Debian package python3")
    version = binary.name.removeprefix("python")
    store = Store(home)
    try:
        stage = store.staging_dir("hostpython")
        (stage / "usr" / "bin").mkdir(parents=True)
        shutil.copy2(binary, stage / "usr" / "bin" / binary.name)
        (stage / "usr" / "bin" / "python3").symlink_to(binary.name)
        libs = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
        for path in re.findall(r"(/\S+\.so[.\d]*)", libs):
            target = stage / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), target)
        shutil.copytree(
            f"/usr/lib/python{version}",
            stage / "usr" / "lib" / f"python{version}",
            ignore=shutil.ignore_patterns("test", "__pycache__", "idlelib", "tkinter", "ensurepip"),
            symlinks=True,
        )
        base = store.get(store.resolve_tag("busybox:latest"))
        store.create_image_from_layer_dirs([stage], parent=base, tag=f"hostpython:{version}")
    finally:
        store.close()


def blocks_of(text: str) -> list[str]:
    return [textwrap.dedent(b) for b in CALLS.findall(text)]


def value_of(node: ast.expr, bound: dict[str, Any], *, resolve: bool) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List):
        return [value_of(e, bound, resolve=resolve) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {
            value_of(k, bound, resolve=resolve): value_of(v, bound, resolve=resolve)  # type: ignore[arg-type]
            for k, v in zip(node.keys, node.values, strict=True)
        }
    if isinstance(node, ast.Name) and node.id in JSON_NAMES:
        return JSON_NAMES[node.id]
    if isinstance(node, ast.Name):
        assert node.id in bound, f"{node.id} is used before a call binds it"
        return bound[node.id] if resolve else 1
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        assert node.value.id in bound, f"{node.value.id} is used before a call binds it"
        if not resolve:
            return "00000000-0000-0000-0000-000000000000"
        found = bound[node.value.id]
        assert isinstance(found, dict) and node.attr in found, f"{node.value.id} has no field {node.attr}"
        return found[node.attr]
    raise AssertionError(f"not a value an agent can write: {ast.dump(node)}")


async def run_block(
    session: Any, label: str, code: str, schemas: dict[str, Any], bound: dict[str, Any]
) -> int:
    """Make every call of a ```calls block (names bound by earlier blocks of the same text are known);
    returns how many ran (0 for a `# needs network` block)."""
    network = code.lstrip().startswith("# needs network")
    ran = 0
    for stmt in ast.parse(code).body:
        if isinstance(stmt, ast.Assign):
            assert len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), label
            name, call = stmt.targets[0].id, stmt.value
        else:
            assert isinstance(stmt, ast.Expr), f"{label}: {ast.dump(stmt)}"
            name, call = "_", stmt.value
        assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args, label
        tool = call.func.id
        assert tool in schemas, f"{label}: unknown tool {tool}"
        args = {kw.arg: value_of(kw.value, bound, resolve=not network) for kw in call.keywords}
        jsonschema.validate(args, schemas[tool])
        if network:
            bound[name] = {}
            continue
        res = await session.call_tool(tool, args)
        assert not res.isError, f"{label}: {tool}({args}) failed: {res.content[0].text}"
        out = result(res)
        if tool == "run" and isinstance(out, dict) and "exit_code" in out:
            assert out["status"] == "SUCCESS", f"{label}: {out}"
            assert out["exit_code"] == 0 or name.startswith("failed"), f"{label}: {tool}({args}) → {out}"
        bound[name] = out
        ran += 1
    return ran


async def test_every_example_runs_on_the_embedded_engine(engine_home: Path, workdir: Path) -> None:
    host_python_image(engine_home)
    for name, body in {
        "run.sh": "echo run.sh ran\n",
        "install.sh": "mkdir -p /opt/deps && echo installed > /opt/deps/ok\n",
        "build.sh": "mkdir -p /app/dist && cat /opt/deps/ok > /app/dist/out\n",
        "test.sh": "test -f /opt/deps/ok && echo tests pass\n",
    }.items():
        (workdir / name).write_text(body)
    port = free_port()
    async with http_server(engine_home, workdir, port) as base:
        async with aiohttp.ClientSession() as http, http.get(f"{base}/tools") as resp:
            page = await resp.text()
        docs = [
            html.unescape(m) for m in re.findall(r"<p>Example:</p><pre><code>(.*?)</code></pre>", page, re.S)
        ]
        async with streamablehttp_client(f"{base}/mcp") as (read, write, _), ClientSession(read, write) as s:
            session: Any = s
            init = await session.initialize()
            instructions = init.instructions or ""
            tools = (await session.list_tools()).tools
            schemas = {t.name: t.inputSchema for t in tools}
            assert len(docs) == len(tools), "every tool on the docs site has an example"

            failed = result(await session.call_tool("run", {"command": "exit 3", "image": "busybox:latest"}))
            prompt_args = {
                "prepare-environment": [
                    {"task": "a shell toolbox"},
                    {"task": "fetching", "packages": "curl"},
                ],
                "run-python": [{"code": "print(6 * 7)"}],
                "run-shell": [{"command": "echo hi && uname -s"}],
                "sync-and-run": [{"source": str(workdir), "command": "sh run.sh"}],
                "install-packages": [{"packages": "curl"}],
                "parallel-tasks": [{"tasks": "echo one\necho two"}],
                "build-project": [
                    {"source": str(workdir), "install_cmd": "sh install.sh", "test_cmd": "sh test.sh"}
                ],
                "debug-failure": [{"operation_id": failed["uuid"]}],
                "serve-and-test": [
                    {
                        "serve_cmd": "mkdir -p /www && echo ok > /www/index.html && "
                        "exec busybox httpd -f -p 8080 -h /www",
                        "port": "8080",
                        "test_cmd": "sleep 1; wget -qO- http://127.0.0.1:8080/",
                    },
                ],
                "inspect-image": [{"image": "busybox:latest"}],
                "multi-stage-build": [
                    {
                        "source": str(workdir),
                        "install_cmd": "sh install.sh",
                        "build_cmd": "sh build.sh",
                        "test_cmd": "sh test.sh",
                    }
                ],
            }
            texts: dict[str, str] = {"instructions": instructions}
            documents: list[tuple[str, list[str]]] = []  # the examples of one text share their names
            for section in GUIDES:
                text = result(await session.call_tool("get_guide", {"section": section}))["content"]
                texts[f"guide {section}"] = text
                documents.append((f"guide {section}", blocks_of(text)))
            for name, cases in prompt_args.items():
                for args in cases:
                    got = await session.get_prompt(name, args)
                    text = got.messages[0].content.text
                    texts[f"prompt {name} {args}"] = text
                    documents.append((f"prompt {name} {args}", blocks_of(text)))
            documents += [(f"docs example {t.name}", [d]) for t, d in zip(tools, docs, strict=True)]

            ran = 0
            for label, codes in documents:
                assert codes, f"{label} has no example"
                bound: dict[str, Any] = {}
                for code in codes:
                    ran += await run_block(session, label, code, schemas, bound)
            assert ran >= 80, ran

    # what the texts say about this engine is true here
    assert "busybox:latest" in instructions and "hostpython:3.11" in instructions
    assert "| `hostpython:3.11` | BusyBox | /bin/sh (busybox) | — | 3.11 (no pip) |" in instructions
    for label, text in texts.items():
        claims = [c for c in CLOUD_ONLY if c in text]
        assert claims == [], f"{label} makes cloud-only claims: {claims}"
    assert any("hostpython:3.11" in b for _, codes in documents for b in codes), "no Python example ran"
