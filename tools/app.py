"""Wiring in one place: backend → state → registry with every tool, resource and prompt.

Nothing happens at import time. `TOOLS` is the one list of the tools: registered in that order, it is
the order of tools/list.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from contree.backend import Backend
from contree.oci.credentials import CredentialStore
from protocol.registry import Registry
from tools import (
    disk_tools,
    image_tools,
    import_tools,
    info_tools,
    inspect_tools,
    operation_tools,
    prompts,
    resources,
    run_tool,
    sandbox_tools,
    sync_tools,
)
from tools.guides.catalog import CatalogCache
from tools.guides.instructions import instructions
from tools.schema_cache import SchemaCache
from tools.state import DEFAULT_READ_MAX_BYTES, ServerState
from tools.stores.dirstate import DirectoryStates
from tools.stores.image_scope import ImageScope
from tools.stores.lineage import EdgeStore, Lineage
from tools.stores.owners import OperationOwners
from tools.version import __version__

# contree-mcp 0.5.0's registration order (COMPAT §1), then the tools beyond its 19 (COMPAT §14: new names
# only, after them).
TOOLS: tuple[Callable[[Registry, ServerState], None], ...] = (
    image_tools.register_list,  # list_images
    import_tools.register_auth,  # registry_token_obtain, registry_auth
    import_tools.register_import,  # import_image
    image_tools.register_get_tag,  # get_image, set_tag
    run_tool.register,  # run
    sync_tools.register_rsync_upload,  # rsync, upload
    sync_tools.register_download,  # download
    operation_tools.register_get_list,  # get_operation, list_operations
    operation_tools.register_wait_cancel,  # wait_operations, cancel_operation
    info_tools.register_whoami,  # whoami
    inspect_tools.register,  # list_files, read_file, grep
    info_tools.register_guide,  # get_guide
    disk_tools.register,  # delete_image
    sandbox_tools.register,  # start_sandbox, exec, write_stdin, signal_process, get_process, expose_port,
    # snapshot_sandbox, stop_sandbox, list_sandboxes
)


def build_state(
    backend: Backend,
    backend_kind: Literal["local", "contree"],
    *,
    cache_dir: Path,
    allowed_roots: list[Path],
    files_db: Path | None = None,
    general_db: Path | None = None,
    read_max_bytes: int = DEFAULT_READ_MAX_BYTES,
    http_mode: bool = False,
    http_port: int = 9452,
    prune_days: float = 60.0,
    scoped_operations: bool = False,
) -> ServerState:
    store = EdgeStore(general_db or cache_dir / "lineage.db")
    store.prune(prune_days)
    dirstates = DirectoryStates(files_db or cache_dir / "files.db")
    dirstates.prune(prune_days)
    owners = OperationOwners(general_db or cache_dir / "operations.db", scoped=scoped_operations)
    owners.prune(prune_days)
    images = ImageScope(backend, general_db or cache_dir / "operations.db", owners, scoped=scoped_operations)
    images.prune(prune_days)
    return ServerState(
        backend=backend,
        backend_kind=backend_kind,
        lineage=Lineage(backend, store, native=not scoped_operations),
        dirstates=dirstates,
        images=images,
        credentials=CredentialStore(cache_dir / "registry-credentials.json"),
        allowed_roots=[p.resolve() for p in allowed_roots],
        cache_dir=cache_dir,
        read_max_bytes=read_max_bytes,
        http_mode=http_mode,
        http_port=http_port,
        owners=owners,
        catalog_cache=CatalogCache(cache_dir / "image-catalog.json") if backend_kind == "local" else None,
    )


def build_registry(state: ServerState) -> Registry:
    # the embedded engine's servers keep the derived tool schemas in the home (a Contree API server may
    # have been told to keep nothing on disk)
    cache = SchemaCache(state.cache_dir / "tool-schemas.json") if state.backend_kind == "local" else None
    registry = Registry(
        name="contree-mcp",
        version=__version__,
        title="Contree sandboxes",
        instructions=instructions(state.guidance_now()),
        schemas=cache.load() if cache is not None else None,
    )
    for register in TOOLS:
        register(registry, state)
    resources.register_templates(registry, state)
    resources.register_guides(registry, state)
    resources.register_guide_template(registry, state)
    prompts.register(registry, state)
    resources.register_completions(registry, state)
    if cache is not None and registry.schemas is not None:
        cache.save(registry.schemas)
    return registry
