"""Run by `.validators/py2/bin/python` (mcp==2.3.0, a client we did not write): drive contree-mcp over
stdio and print a JSON summary. usage: py2_client.py <server argv...>"""

import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def structured(result: object) -> dict:
    # mcp 2.x renamed structuredContent; this file is type-checked against the 1.x stubs
    return result.__dict__["structured_content"]


async def main() -> None:
    params = StdioServerParameters(command=sys.argv[1], args=sys.argv[2:])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = await session.list_tools()
        guide = await session.call_tool("get_guide", {"section": "state"})
        run = await session.call_tool("run", {"command": "echo py2", "image": "busybox:latest"})
        prompts = await session.list_prompts()
        print(
            json.dumps(
                {
                    "tools": [t.name for t in tools.tools],
                    "guide": structured(guide)["section"],
                    "run": (structured(run) or {}).get("result", {}).get("stdout"),
                    "prompts": len(prompts.prompts),
                }
            )
        )


asyncio.run(main())
