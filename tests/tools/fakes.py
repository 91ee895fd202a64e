"""The in-memory Backend and a RequestContext for unit tests of the tools (no engine, no transport)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from protocol.registry import Registry
from tests import fake_backend
from tools.app import build_registry, build_state
from tools.state import ServerState


class FakeBackend(fake_backend.FakeBackend):
    """The shared fake as the tool tests drive it: a run stays PENDING until the test calls `finish`, no
    event log (the tools poll), downloads in 7-byte chunks (so reads meet chunk boundaries)."""

    def __init__(self) -> None:
        super().__init__(auto_finish=False, event_log=False, download_chunk=7, spawned_status="PENDING")


class FakeContext:
    """Stands in for protocol's RequestContext when calling registry.call_tool directly."""

    def __init__(self, principal: str | None = None) -> None:
        self.principal = principal
        self.progress_calls: list[tuple[float, float | None, str | None]] = []
        self.logs: list[Any] = []
        self.updated: list[str] = []
        self.client_capabilities: dict[str, Any] = {}
        self.cancel_requested = False  # True = the client sent notifications/cancelled for this request
        self.progress_token: Any = None

    async def progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        self.progress_calls.append((progress, total, message))

    async def log(self, level: str, data: Any, logger: str | None = None) -> None:
        self.logs.append(data)

    async def notify_resource_updated(self, uri: str) -> None:
        self.updated.append(uri)


def make_registry(
    backend: Any,
    tmp: Path,
    *,
    roots: list[Path] | None = None,
    kind: str = "contree",
    scoped_operations: bool = False,
) -> tuple[Registry, ServerState]:
    state = build_state(
        backend,
        kind,  # type: ignore[arg-type]
        cache_dir=tmp / "cache",
        allowed_roots=roots or [tmp],
        scoped_operations=scoped_operations,
    )
    return build_registry(state), state


async def call(registry: Registry, name: str, args: dict[str, Any], ctx: FakeContext | None = None) -> Any:
    """(is_error, structured, text) of a tools/call."""
    result = await registry.call_tool(name, args, ctx or FakeContext())  # type: ignore[arg-type]
    blocks = msgspec.to_builtins(result)
    return blocks
