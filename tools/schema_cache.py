"""The tools' JSON Schemas kept between starts of the same code.

Deriving them from the msgspec types (annotations evaluated one by one) was a sixth of a start. A server
of the embedded engine keeps them in the home's `mcp/` beside its other caches and uses them while the
code they came from is the same: every module of `protocol`, `tools` and `contree` loaded when the
registry is built has the same path, size and modification time (the rule Python applies to its own
bytecode cache), and so do the msgspec and Python versions. Otherwise they are derived again and replaced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from contree.api import Model
from contree.fsutil import write_private

log = logging.getLogger(__name__)

PACKAGES = ("protocol", "tools", "contree")


class _File(Model):
    code: str
    schemas: dict[str, dict[str, Any]]


def code_fingerprint() -> str:
    """What the schemas depend on: the loaded modules of the three packages, msgspec, Python."""
    digest = hashlib.sha256(f"{sys.version}\0{msgspec.__version__}".encode())
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or name.partition(".")[0] not in PACKAGES:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        digest.update(f"\0{name}\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()


class SchemaCache:
    """`load()` the schemas derived by an earlier start of this code (empty when there are none or the
    code changed), hand them to the `Registry`, then `save()` what it had to derive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.code = code_fingerprint()
        self._loaded: frozenset[str] = frozenset()

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            kept = msgspec.json.decode(self.path.read_bytes(), type=_File)
        except (OSError, msgspec.MsgspecError):
            return {}
        if kept.code != self.code:
            return {}
        self._loaded = frozenset(kept.schemas)
        return kept.schemas

    def save(self, schemas: dict[str, dict[str, Any]]) -> None:
        if schemas.keys() == self._loaded:
            return  # nothing new was derived
        try:
            write_private(self.path, msgspec.json.encode(_File(code=self.code, schemas=schemas)))
        except OSError as exc:
            log.debug("cannot keep the tool schemas in %s: %s", self.path, exc)
        self._loaded = frozenset(schemas)
