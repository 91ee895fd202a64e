"""The machine's shared engine service, for shared machines (README "A system service").

An administrator runs the root engine as a service (`packaging/systemd/contree-engine.service`):
`contree-mcp engine serve --home /var/lib/contree-engine --socket /run/contree-engine/engine.sock
--socket-group contree`. Its socket is mode 0660, group `contree`; the directory above it is 0711.
Membership of that group is the right to run sandboxes on that engine: they run in the root engine's
own id range, confined as every sandbox is (no host root, no host files), and the members share one
Contree namespace (each sees the others' images and operations). The engine never reads a local image
archive for them (it would read it as root): they import from registries or upload.

A non-root user's MCP server on the default home uses that service when it answers (the user is in the
group), before starting a rootless engine of its own; an explicit `--home` (or CONTREE_ENGINE_HOME)
always means an engine of that home. CONTREE_ENGINE_SYSTEM_SOCKET names another socket, `off` none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from contree.service.control import ServiceStatus, probe

SYSTEM_SOCKET = Path("/run/contree-engine/engine.sock")
SYSTEM_HOME = Path("/var/lib/contree-engine")
SOCKET_ENV = "CONTREE_ENGINE_SYSTEM_SOCKET"


def system_socket(env: Mapping[str, str]) -> Path | None:
    value = env.get(SOCKET_ENV, "")
    if value.lower() in ("off", "none", "no", "0"):
        return None
    return Path(value) if value else SYSTEM_SOCKET


def find(env: Mapping[str, str]) -> tuple[Path, ServiceStatus] | None:
    """The shared service's socket and status, when one answers and this user may use it."""
    path = system_socket(env)
    if path is None or not os.access(path, os.R_OK | os.W_OK):
        return None
    status = probe(path.parent, socket=path, timeout=5.0)
    if status is None or status.state not in ("ready", "retiring"):
        return None
    return path, status
