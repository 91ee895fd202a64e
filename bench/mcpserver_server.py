"""The second comparison server for bench/protocol.py: the mcp 2.3 SDK's MCPServer with N trivial tools.
It speaks both protocol eras. Run with the mcp 2.3 interpreter (`.validators/py2/bin/python`).

python bench/mcpserver_server.py --tools N --mode stdio|http [--port P]
"""

from __future__ import annotations

import argparse
import logging
from typing import Any


def build(tools: int) -> Any:
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("mcpserver-bench", log_level="WARNING")
    for i in range(tools):

        def make(n: int) -> Any:
            def tool(text: str = "") -> str:
                return f"tool {n}: {text}"

            return tool

        server.add_tool(make(i), name=f"tool_{i}", description=f"Trivial tool number {i}.")
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/mcpserver_server.py")
    parser.add_argument("--tools", type=int, default=20)
    parser.add_argument("--mode", choices=("stdio", "http"), default="stdio")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.getLogger("mcp").setLevel(logging.WARNING)
    server = build(args.tools)
    if args.mode == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
