"""The rootless engine: the embedded engine run by the user who runs the agent (docs/rootless.md).

A non-root engine service enters a user namespace of its own first (`namespaces.py`): container id 0 is
the user, 1..65535 are the user's subordinate ids (`ids.py`), as with rootless podman. Inside it the engine
is root over its own files and its own mount and pid namespaces, so the store, overlay mounts and crun
work as in root mode, with these differences:

  ids.py          the user's subordinate ids and the namespace's id maps (single-id fallback)
  namespaces.py   entering the engine's user, mount and pid namespaces (everything dies with the engine)
  delegation.py   a cgroup delegated to the engine (--cgroup-scope): limits as in root mode
  sandbox_ns.py   each sandbox's own user namespace (its process limit) and network namespace
  network.py      slirp4netns or pasta behind an egress filter inside the sandbox's network namespace
  limits.py       what stands in for cgroups when none is delegated: per-sandbox process limits, kill
  runtime.py      the parts `SandboxRuntime.create` builds a rootless engine's runtime from
  check.py        readiness findings for `contree-mcp engine check`, each missing piece with its fix

`active()` says whether this process is such an engine (or a tool run inside its namespace).
"""

from __future__ import annotations

import os

from contree.layerformat import in_initial_userns

_host_pid: int | None = None  # set by namespaces.enter in the engine process


def active() -> bool:
    """True in a rootless engine: root inside a user namespace of its own, not root on the host."""
    return os.geteuid() == 0 and not in_initial_userns()


def host_pid() -> int:
    """This process's pid as the host sees it (the engine runs in a pid namespace of its own)."""
    return _host_pid if _host_pid is not None else os.getpid()
