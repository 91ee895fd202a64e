"""File sync: gitignore-style excludes, a stat-keyed SQLite cache, xxh3-128 content-defined chunks,
content-identified directory-state manifests, and transfers to the engine (chunks) or a backend (files).

The names below are loaded on first use, like `contree.rest`'s: an MCP server imports the excludes for
the rsync tool's description at start-up, the rest only when it syncs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from contree.sync.excludes import DEFAULT_EXCLUDES, Excludes
    from contree.sync.manifest import Manifest, ManifestEntry, build_manifest
    from contree.sync.scanner import SyncError
    from contree.sync.state import StateCache
    from contree.sync.syncer import SyncReport, sync_tree
    from contree.sync.transfer import ChunkTransfer, RemoteTransfer, Transfer, transfer_for

_MODULES = {
    "DEFAULT_EXCLUDES": "excludes",
    "Excludes": "excludes",
    "Manifest": "manifest",
    "ManifestEntry": "manifest",
    "build_manifest": "manifest",
    "SyncError": "scanner",
    "StateCache": "state",
    "SyncReport": "syncer",
    "sync_tree": "syncer",
    "ChunkTransfer": "transfer",
    "RemoteTransfer": "transfer",
    "Transfer": "transfer",
    "transfer_for": "transfer",
}

__all__ = [
    "DEFAULT_EXCLUDES",
    "ChunkTransfer",
    "Excludes",
    "Manifest",
    "ManifestEntry",
    "RemoteTransfer",
    "StateCache",
    "SyncError",
    "SyncReport",
    "Transfer",
    "build_manifest",
    "sync_tree",
    "transfer_for",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"contree.sync.{module}"), name)
