"""Long-lived sandboxes: the wire shapes of the embedded engine's `/v1/sandboxes` extension and the
`SandboxHost` interface (beyond the Contree API, like `OutputReader` and `EngineAdmin`).

A sandbox is an instance operation whose main process is the engine's own init: it runs until it is
stopped, cancelled (`DELETE /v1/operations/{id}`) or idle for `ttl_seconds`, and processes are started
in it with the Contree API's subprocess endpoints (`POST /v1/operations/{id}/subprocesses`). The
extension adds what the API has no word for: starting one without a command, listing the running ones,
forwarding a port to the host's loopback, snapshotting the filesystem while it runs, and a graceful
stop that may commit.

    POST   /v1/sandboxes                      SandboxRequest      -> 201 SandboxInfo (running)
    GET    /v1/sandboxes                                          -> 200 SandboxList (running ones)
    GET    /v1/sandboxes/{id}                                     -> 200 SandboxInfo (also once ended)
    POST   /v1/sandboxes/{id}/ports           PortRequest         -> 200 PortForward (an existing one too)
    DELETE /v1/sandboxes/{id}/ports/{port}                        -> 204
    POST   /v1/sandboxes/{id}/snapshot                            -> 201 SandboxSnapshot
    POST   /v1/sandboxes/{id}/stop            StopSandboxRequest  -> 200 SandboxInfo (ended)
    GET    /v1/operations/{id}/subprocesses/{spid}?wait=S          (long poll: returns at exit or S)
"""

from __future__ import annotations

from typing import Annotated, Literal, Protocol, runtime_checkable

import msgspec
from msgspec import Meta

from contree import api

__all__ = [
    "DEFAULT_TTL", "MAX_WAIT", "PortForward", "PortRequest", "SandboxHost", "SandboxInfo", "SandboxList",
    "SandboxRequest", "SandboxSnapshot", "StopSandboxRequest", "process_exited",
]

DEFAULT_TTL = 1800  # seconds of idleness before a sandbox is stopped
MAX_WAIT = 600  # seconds one long poll of a subprocess may wait

SandboxState = Literal["starting", "running", "stopping", "stopped"]
LISTEN_HOST = "127.0.0.1"  # exposed ports are reachable from the engine's host only


class PortForward(api.Model):
    """One exposed port: connections to `url` (host loopback) reach `port` inside the sandbox."""

    port: int  # in the sandbox
    host: str = LISTEN_HOST
    host_port: int
    url: str
    created_at: float
    connections: int = 0  # accepted so far
    open_connections: int = 0
    bytes_in: int = 0  # host -> sandbox
    bytes_out: int = 0  # sandbox -> host


class SandboxRequest(api.RequestBody, omit_defaults=True):
    """What a sandbox starts from. `env` and `cwd` are the defaults of every process started in it."""

    image: str  # UUID or "tag:<tag>"
    env: dict[str, str | None] | None = None
    cwd: api.Cwd = ""
    files: dict[str, api.InjectedFile] | None = None
    hostname: str = api.DEFAULT_HOSTNAME
    networking: bool = True
    ttl_seconds: Annotated[int, Meta(ge=1)] = DEFAULT_TTL
    resources_limits: api.InstanceResourcesLimits | None = None


class SandboxInfo(api.Model):
    """A sandbox (`uuid` = its instance operation). Times are ISO 8601; `expires_at` is when it stops if
    nothing happens (absent while a foreground process runs, and once it stopped)."""

    uuid: str
    image: str  # the image it started from
    state: SandboxState
    status: str  # the operation's status
    created_at: str
    ttl_seconds: int
    networking: bool = True
    started_at: str | None = None
    expires_at: str | None = None
    last_active_at: str | None = None
    idle_seconds: float | None = None
    busy: bool = False  # a foreground process runs: never stopped for idleness then
    processes_running: int = 0
    ports: list[PortForward] = msgspec.field(default_factory=list)
    commands: int = 0  # processes started in it so far
    snapshots: list[str] = msgspec.field(default_factory=list)  # images taken while it ran
    stop_reason: str | None = None  # stopped | idle | cancelled | exited | failed | engine_restart
    error: str | None = None
    result_image: str | None = None  # stop with commit=true


class SandboxList(api.Model):
    sandboxes: list[SandboxInfo]


class PortRequest(api.RequestBody):
    port: Annotated[int, Meta(ge=1, le=65535)]


class SandboxSnapshot(api.Model):
    """The filesystem of a running sandbox as a new image (a child of the image it started from)."""

    image: api.Image
    sandbox_id: str
    parent: str
    unchanged: bool = False  # nothing was written yet: `image` is the parent itself
    bytes: int = 0  # the new layer
    pause_ms: float = 0.0  # how long the sandbox's processes were frozen
    copy_ms: float = 0.0
    total_ms: float = 0.0
    frozen_with: str = "cgroup freezer"  # or "SIGSTOP" where no freezer is available (rootless)
    commands: int = 0  # processes started in the sandbox before the snapshot


class StopSandboxRequest(api.RequestBody):
    commit: bool = False  # keep the filesystem as a new image (SandboxInfo.result_image)
    grace_seconds: Annotated[float, Meta(ge=0, le=60)] = 2.0  # SIGTERM, then SIGKILL after this long


def process_exited(result: api.InstanceResult) -> bool:
    """Whether a subprocess result is final (a running process reports exit_code = signal = -1)."""
    state = result.state
    return state is not None and (state.exit_code != -1 or state.signal != -1)


@runtime_checkable
class SandboxHost(Protocol):
    """A backend with long-lived sandboxes (the embedded engine, directly or over its REST API)."""

    async def start_sandbox(self, request: SandboxRequest) -> SandboxInfo: ...
    async def list_sandboxes(self) -> list[SandboxInfo]: ...
    async def get_sandbox(self, sandbox_id: str) -> SandboxInfo: ...
    async def expose_port(self, sandbox_id: str, port: int) -> PortForward: ...
    async def close_port(self, sandbox_id: str, port: int) -> None: ...
    async def snapshot_sandbox(self, sandbox_id: str) -> SandboxSnapshot: ...
    async def stop_sandbox(self, sandbox_id: str, request: StopSandboxRequest) -> SandboxInfo: ...
    async def wait_subprocess(self, operation_id: str, spid: int, wait: float) -> api.InstanceResult: ...
