"""File sync: gitignore-style excludes, a stat-keyed SQLite cache, xxh3-128 content-defined chunks,
content-identified directory-state manifests, and transfers to the engine (chunks) or a backend (files)."""

from contree.sync.excludes import DEFAULT_EXCLUDES, Excludes
from contree.sync.manifest import Manifest, ManifestEntry, build_manifest
from contree.sync.scanner import SyncError
from contree.sync.state import StateCache
from contree.sync.syncer import SyncReport, sync_tree
from contree.sync.transfer import ChunkTransfer, RemoteTransfer, Transfer, transfer_for

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
