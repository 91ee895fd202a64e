"""Engine services started by tests: stopped at the end of their test, whatever happened.

Every `contree-mcp` on the local backend starts (or attaches to) its home's engine service, which
outlives the MCP server by design. Tests stop it with `stop_service(home)`; the root conftest stops any
left under the session's temporary directory, and auto-started services get a short idle exit.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from contree.service.control import ControlConnection, ServiceGone, ServiceUnresponsive

TEST_IDLE_EXIT = "120s"  # a service a crashed test run left behind goes away by itself
STORE_TREES = frozenset(("layers", "sandboxes", "blobs", "tmp", "operations", "runtime"))


def stop_service(home: Path, *, timeout: float = 60.0) -> bool:
    """Stop the home's service (cancelling its work) and wait for its exit; SIGKILL it if it hangs.
    Returns whether one was running."""
    for attempt in range(3):
        try:
            conn = ControlConnection(home, pin=True, timeout=10.0)
            break
        except ServiceGone:
            return False
        except ServiceUnresponsive:
            if attempt == 2:
                raise
    else:  # pragma: no cover - the loop either breaks or raises
        return False
    with conn:
        try:
            conn.stop("now")
        except ServiceGone:
            pass  # it went away between the status and the stop
        if not conn.wait_exit(timeout):
            signal.pidfd_send_signal(conn.pidfd, signal.SIGKILL)
            conn.wait_exit(30)
            raise AssertionError(f"the engine service of {home} did not stop within {timeout:g} s")
    return True


def service_homes(root: Path, depth: int = 5) -> list[Path]:
    """Homes below `root` (at most `depth` levels down) that have a service socket."""
    found: list[Path] = []
    root_depth = str(root).rstrip("/").count("/")
    for path, dirs, files in os.walk(root):
        if "engine.sock" in files:
            found.append(Path(path))
        if path.count("/") - root_depth >= depth:
            dirs.clear()
        # never descend into a store's own trees (large, and mounts may be busy)
        dirs[:] = [d for d in dirs if d not in STORE_TREES]
    return found
