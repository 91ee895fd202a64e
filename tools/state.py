"""What every tool needs, built once by `tools.app` and passed explicitly (no module globals)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from contree import api
from contree.backend import Backend
from tools.budget import RESULT_BUDGET
from tools.guides.catalog import Catalog, CatalogCache, describe_images
from tools.guides.guidance import Guidance
from tools.stores.owners import OperationOwners

if TYPE_CHECKING:
    from contree.oci.credentials import CredentialStore
    from tools.stores.dirstate import DirectoryStates
    from tools.stores.image_scope import ImageScope
    from tools.stores.lineage import Lineage

log = logging.getLogger(__name__)

DEFAULT_READ_MAX_BYTES = 1024 * 1024
DEFAULT_TRUNCATE_OUTPUT_AT = 8000
CATALOG_TTL = 10.0  # seconds a description of the images serves the guides before it is read again


@dataclass
class ServerState:
    backend: Backend
    backend_kind: Literal["local", "contree"]
    lineage: Lineage
    dirstates: DirectoryStates
    images: ImageScope
    credentials: CredentialStore
    allowed_roots: list[Path]
    cache_dir: Path
    read_max_bytes: int = DEFAULT_READ_MAX_BYTES
    http_mode: bool = False
    http_port: int = 9452
    run_grace_seconds: float = 120.0
    owners: OperationOwners = field(default_factory=OperationOwners)
    # False once the backend answered that it keeps no whole output (the Contree cloud): event logs then
    output_paging: bool = True
    disk_admin: bool = True  # False once the backend answered that it cannot delete images (the cloud)
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _caps: dict[str, int] = field(default_factory=dict)
    catalog: Catalog | None = None  # the backend's tagged images and what they contain (local only)
    catalog_cache: CatalogCache | None = None  # what each image contains, by UUID (local only)
    _catalog_at: float = 0.0

    def remember_cap(self, operation_id: str, cap: int) -> None:
        """The caller's truncate_output_at: the backend records more so the full output stays readable."""
        self._caps[operation_id] = cap
        if len(self._caps) > 10000:
            del self._caps[next(iter(self._caps))]

    def cap_for(self, operation_id: str) -> int:
        return self._caps.get(operation_id, DEFAULT_TRUNCATE_OUTPUT_AT)

    def output_cap(self, requested: int) -> tuple[int, int | None]:
        """(bytes of each stream's head and tail, result budget) for a caller's truncate_output_at: the
        default stays within RESULT_BUDGET; more can be asked for explicitly, up to read_max_bytes."""
        cap = min(requested, max(self.read_max_bytes, DEFAULT_TRUNCATE_OUTPUT_AT))
        return cap, RESULT_BUDGET if requested <= DEFAULT_TRUNCATE_OUTPUT_AT else None

    @property
    def sandbox_word(self) -> str:
        return "sandbox" if self.backend_kind == "local" else "microVM"

    def observe(self, op: api.OperationSummary, principal: str | None) -> None:
        """What a terminal operation of `principal` implies: a lineage edge, its result image as its own."""
        self.lineage.observe(op, principal)
        self.images.observe(op, principal)

    async def guidance(self) -> Guidance:
        """What guides, prompts and examples should say on this backend, with its images now
        (re-read at most every CATALOG_TTL seconds)."""
        loop = asyncio.get_running_loop()
        stale = self.catalog is None or loop.time() - self._catalog_at > CATALOG_TTL
        if self.backend_kind == "local" and stale:
            await self.read_catalog()
            self._catalog_at = loop.time()
        return self.guidance_now()

    async def read_catalog(self) -> Catalog:
        """Read the backend's images into `catalog` (`tools.cli` does at start-up, for the instructions;
        the first `guidance()` reads them again)."""
        self.catalog = await describe_images(
            self.backend, shared_only=self.owners.scoped, cache=self.catalog_cache
        )
        return self.catalog

    def guidance_now(self) -> Guidance:
        """`guidance()` with the images last read (at start-up: `tools.cli` reads them first)."""
        root = str(self.allowed_roots[0]) if self.allowed_roots else "/abs/path/project"
        return Guidance(backend_kind=self.backend_kind, catalog=self.catalog or Catalog(), root=root)

    def spawn_background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a best-effort task (lineage tracking) that must never take the server down."""

        # The coroutine is the task itself (no wrapper): a task cancelled before its first step still
        # closes it, where a wrapper's inner coroutine would be dropped "never awaited".
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("background task %s failed: %s", task.get_name(), task.exception())

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self.lineage.close()
        self.owners.close()
        self.images.close()
        await self.backend.close()
