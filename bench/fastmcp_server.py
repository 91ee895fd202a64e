"""The comparison server for bench/protocol.py: FastMCP (mcp 1.x) with N trivial tools.

python -m bench.fastmcp_server --tools N --mode stdio|http [--port P]
"""

from __future__ import annotations

import argparse
import logging


def build(tools: int, port: int) -> object:
    from mcp.server.fastmcp import FastMCP

    server = FastMCP("fastmcp-bench", host="127.0.0.1", port=port, log_level="WARNING")
    for i in range(tools):

        def make(n: int) -> object:
            def tool(text: str = "") -> str:
                return f"tool {n}: {text}"

            return tool

        server.add_tool(make(i), name=f"tool_{i}", description=f"Trivial tool number {i}.")  # type: ignore[arg-type]
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fastmcp_server")
    parser.add_argument("--tools", type=int, default=20)
    parser.add_argument("--mode", choices=("stdio", "http"), default="stdio")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.getLogger("mcp").setLevel(logging.WARNING)
    server = build(args.tools, args.port)
    server.run("stdio" if args.mode == "stdio" else "streamable-http")  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
