"""A stdio server for the integration tests: the conformance fixtures plus misbehaving tools."""

from __future__ import annotations

import asyncio
import sys

from protocol.registry import RequestContext
from protocol.server import Server
from protocol.stdio import run_stdio
from protocol.testing.conformance import build_registry


def main() -> int:
    registry = build_registry()

    @registry.tool("noisy", description="prints to stdout, which must not reach the protocol stream")
    async def noisy(ctx: RequestContext) -> str:
        print("stray print from a tool")
        sys.stdout.write("stray write\n")
        return "quiet"

    @registry.tool("sleepy", description="sleeps for a minute unless cancelled")
    async def sleepy(ctx: RequestContext) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            print("sleepy cancelled", file=sys.stderr, flush=True)
            raise
        return "woke"

    return run_stdio(Server(registry, page_size=int(sys.argv[1]) if len(sys.argv) > 1 else 100))


if __name__ == "__main__":
    raise SystemExit(main())
