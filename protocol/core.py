"""What every session of one server shares: the registry, cached listings and discovery, task records,
and the secret that seals request states and mints task ids."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from protocol import versions
from protocol.catalog import Catalog
from protocol.messages import DiscoverResult, Implementation, encode
from protocol.registry import Registry
from protocol.stateless import ResultEnvelope
from protocol.tasks import EXTENSION as TASKS_EXTENSION
from protocol.tasks import TaskStore


class Core:
    """What every session of one server shares: the registry, cached listings, tasks and the secret that
    signs request states and mints task ids. `clock` is wall-clock seconds (the shell passes time.time)."""

    def __init__(
        self,
        registry: Registry,
        *,
        secret: bytes,
        clock: Callable[[], float],
        page_size: int = 100,
        discover_cache_ms: int = 3_600_000,
    ) -> None:
        self.registry = registry
        self.secret = secret
        self.clock = clock
        info = Implementation(
            name=registry.name,
            version=registry.version or "0.0.0",
            title=registry.title,
            description=registry.description,
            website_url=registry.website_url,
        )
        self.envelope = ResultEnvelope(info)
        self.catalog = Catalog(registry, page_size, self.envelope)
        self.tasks = TaskStore(secret, clock)
        self.discover_cache_ms = discover_cache_ms
        self._discover: tuple[int, bytes] | None = None

    def has_tasks(self) -> bool:
        return any(t.tasks != "forbidden" for t in self.registry.tools.values())

    def discover(self) -> bytes:
        """The server/discover result (both eras' versions, the stateless capabilities), cached."""
        generation = self.registry.generation
        if self._discover is None or self._discover[0] != generation:
            r = self.registry
            capabilities: dict[str, Any] = {
                "tools": {"listChanged": True},
                "resources": {"subscribe": True, "listChanged": True},
                "prompts": {"listChanged": True},
                "completions": {},
                "logging": {},
            }
            if self.has_tasks():
                capabilities["extensions"] = {TASKS_EXTENSION: {}}
            body = encode(DiscoverResult(list(versions.ADVERTISED), capabilities, r.instructions))
            hint = msgspec.structs.replace(r.list_cache, ttl_ms=self.discover_cache_ms)
            self._discover = (generation, self.envelope.wrap(body, hint))
        return self._discover[1]
