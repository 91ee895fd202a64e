"""Through the official SDK client: the protocol-level surface (initialize, lists, every guide resource,
every prompt, completion, error codes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import McpError
from mcp.types import PromptReference, ResourceTemplateReference
from pydantic import AnyUrl

from tests.tools.conftest import mcp_session
from tools.prompts import PROMPTS
from tools.version import __version__


async def test_surface_guides_prompts_completion_and_errors(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        # initialize: our own version and truthful instructions (§15.2)
        tools = (await session.list_tools()).tools
        assert [t.name for t in tools][:3] == ["list_images", "registry_token_obtain", "registry_auth"]
        assert len(tools) == 29 and all(t.outputSchema for t in tools)
        run = next(t for t in tools if t.name == "run")
        assert run.description.split("\n", 1)[0].endswith("Spawns sandbox.")
        assert run.annotations is not None and run.annotations.openWorldHint is True

        templates = {t.uriTemplate for t in (await session.list_resource_templates()).resourceTemplates}
        assert "contree://operations/instance/{operation_id}" in templates

        resources = (await session.list_resources()).resources
        assert len(resources) == 8
        for res in resources:
            contents = (await session.read_resource(res.uri)).contents
            assert contents[0].mimeType == "text/markdown" and contents[0].text.startswith("# ")
            assert "microVM" not in contents[0].text

        prompts = (await session.list_prompts()).prompts
        assert [p.name for p in prompts] == [p[0] for p in PROMPTS]
        for prompt in prompts:
            args = {a.name: "line one\nline two" for a in prompt.arguments or [] if a.required}
            got = await session.get_prompt(prompt.name, args)
            assert got.messages[0].role == "user" and "line two" in got.messages[0].content.text
        ws = await session.get_prompt("prepare-environment", {"task": "x", "packages": "   "})
        assert "custom-env" in ws.messages[0].content.text

        # completion: image tags for templates and prompt arguments
        done = await session.complete(
            ResourceTemplateReference(type="ref/resource", uri="contree://image/{image}/lineage"),
            {"name": "image", "value": "busy"},
        )
        assert done.completion.values == ["busybox:latest"]
        done = await session.complete(
            PromptReference(type="ref/prompt", name="run-shell"), {"name": "image", "value": "tag:b"}
        )
        assert done.completion.values == ["tag:busybox:latest"]

        done = await session.complete(
            ResourceTemplateReference(type="ref/resource", uri="contree://guide/{section}"),
            {"name": "section", "value": "ta"},
        )
        assert done.completion.values == ["tagging"]
        # error codes (§15.48)
        with pytest.raises(McpError) as err:
            await session.get_prompt("no-such-prompt", {})
        assert err.value.error.code == -32602
        with pytest.raises(McpError) as err:
            await session.read_resource(AnyUrl("contree://nowhere/x"))
        assert err.value.error.code == -32002
        with pytest.raises(McpError) as err:
            await session.get_prompt("run-shell", {})
        assert err.value.error.code == -32602
        with pytest.raises(McpError) as err:
            await session.call_tool("no_such_tool", {})
        assert err.value.error.code == -32602


async def test_server_info_and_instructions(engine_home: Path, workdir: Path) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    from tests.tools.conftest import server_command

    command, *args = server_command()
    params = StdioServerParameters(
        command=command, args=[*args, "--backend", "local", "--home", str(engine_home)], cwd=str(workdir)
    )
    with open(workdir.parent / "stderr.log", "w") as errlog:  # noqa: ASYNC230
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            init = await session.initialize()
    assert init.serverInfo.name == "contree-mcp" and init.serverInfo.version == __version__
    assert init.instructions and "embedded engine" in init.instructions and "microVM" not in init.instructions
    assert init.capabilities.completions is not None
    log = (workdir.parent / "stderr.log").read_text()
    assert all(line.startswith("[") for line in log.splitlines() if line.strip())


async def test_token_page_is_offered_through_url_elicitation(engine_home: Path, workdir: Path) -> None:
    from mcp.types import ElicitResult

    asked: list[Any] = []

    async def on_elicit(context: Any, params: Any) -> ElicitResult:
        asked.append(params)
        return ElicitResult(action="accept")

    async with mcp_session(engine_home, workdir, elicitation_callback=on_elicit) as s:
        session: Any = s
        res = await session.call_tool("registry_token_obtain", {"registry_url": "ghcr.io"})
        assert not res.isError
        out = res.structuredContent
    assert len(asked) == 1 and asked[0].mode == "url"
    assert asked[0].url == "https://github.com/settings/tokens?type=beta" == out["url"]
    assert out["message"].startswith("The user's client opened https://github.com/settings/tokens")
