"""Allowed roots: host paths the server may read (upload, rsync) or write (download)."""

from __future__ import annotations

import os
from pathlib import Path

from protocol.errors import ToolError


def expand(path: str, what: str) -> str:
    expanded = os.path.expanduser(path.strip())
    if not os.path.isabs(expanded):
        raise ToolError(f"{what} must be an absolute path, got: {path}")
    return os.path.normpath(expanded)


def inside(path: str, roots: list[Path]) -> bool:
    real = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return True
    return False


def require_inside(path: str, roots: list[Path], what: str) -> str:
    """The real path of `path`; refuses anything that resolves (symlinks included) outside the roots."""
    if not inside(path, roots):
        shown = ", ".join(str(r) for r in roots) or "(none)"
        raise ToolError(
            f"{what} {path} is outside the allowed roots ({shown}); start the server with --allowed-root "
            "to allow it"
        )
    return os.path.realpath(path)
