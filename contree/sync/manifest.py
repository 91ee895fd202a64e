"""Directory states: immutable manifests identified by their content.

The id is a digest of the sorted (path, sha256, mode, uid, gid) tuples, so the same tree always gives
the same id and a changed tree a new one; an id can never come to mean other content. Where the
backend keeps a file (its uuid) is not part of the identity: a re-uploaded blob keeps the state's id.
"""

from __future__ import annotations

import hashlib
import stat
from operator import attrgetter

import msgspec

from contree import api


class ManifestEntry(msgspec.Struct, array_like=True, frozen=True):
    path: str  # absolute path in the sandbox
    sha256: str
    uuid: str  # the backend's file record
    size: int
    mode: str  # "0644": permission bits only, never file-type bits (COMPAT §15.32)
    uid: int = 0
    gid: int = 0


class Manifest(msgspec.Struct, frozen=True):
    id: str  # "sha256:<hex>" of the identity tuples
    entries: list[ManifestEntry]

    def injected_files(self) -> dict[str, api.InjectedFile]:
        return {
            e.path: api.InjectedFile(uuid=e.uuid, mode=e.mode, uid=e.uid, gid=e.gid) for e in self.entries
        }


def mode_string(st_mode: int) -> str:
    return format(stat.S_IMODE(st_mode), "04o")


def build_manifest(entries: list[ManifestEntry]) -> Manifest:
    ordered = sorted(entries, key=attrgetter("path"))
    identity = msgspec.msgpack.encode([(e.path, e.sha256, e.mode, e.uid, e.gid) for e in ordered])
    return Manifest("sha256:" + hashlib.sha256(identity).hexdigest(), ordered)
