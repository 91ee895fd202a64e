"""Parameters and results of the long-lived sandbox tools (`tools.sandbox_tools`)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from contree import api
from tools.bounds import MAX_SECONDS
from tools.params import (
    Args,
    Command,
    CpuCores,
    DirectoryStateId,
    Environment,
    Gid,
    ImageRef,
    InjectedFiles,
    PageLimit,
    PageOffset,
    PageStream,
    PidCount,
    PositiveBytes,
    TruncateOutputAt,
    Uid,
)

SandboxId = Annotated[str, Meta(description="Sandbox id from start_sandbox (also its operation id).")]
ProcessId = Annotated[int, Meta(ge=2, le=2**31 - 1, description="process_id from exec.")]


class StartSandboxParams(api.Model):
    image: ImageRef
    directory_state_id: DirectoryStateId = None
    files: InjectedFiles = None
    env: Annotated[
        Environment | None,
        Meta(description="Environment of every process started in it (exec's env adds to it). Not echoed."),
    ] = None
    cwd: Annotated[
        str, Meta(description="Default working directory of exec (absolute); '' = the image's.")
    ] = ""
    networking: Annotated[bool, Meta(description="Network access for the sandbox.")] = True
    ttl_seconds: Annotated[
        int,
        Meta(ge=1, le=MAX_SECONDS,
             description="Idle lifetime: stopped after this long without exec, stdin or port traffic "
             "(at most whoami limits.sandbox_max_ttl_seconds)."),
    ] = 1800
    hostname: Annotated[str | None, Meta(description="Hostname inside the sandbox.")] = None
    memory_bytes: Annotated[
        PositiveBytes | None,
        Meta(description="Memory limit in bytes (default and maximum: whoami limits)."),
    ] = None
    cpus: Annotated[
        CpuCores | None,
        Meta(description="CPU limit in cores (default and maximum: whoami limits)."),
    ] = None
    pids: Annotated[
        PidCount | None,
        Meta(description="Process/thread limit (default and maximum: whoami limits)."),
    ] = None
    max_layer_bytes: Annotated[
        PositiveBytes | None,
        Meta(description="Cap on bytes the sandbox may write to its filesystem."),
    ] = None


class ExecParams(api.Model):
    sandbox_id: SandboxId
    command: Command
    shell: Annotated[bool, Meta(description="Run through the image's shell ('sh -c').")] = True
    args: Args = None
    env: Annotated[
        Environment | None,
        Meta(description="Extra environment (over the sandbox's); a null value unsets one. Not echoed."),
    ] = None
    cwd: Annotated[str, Meta(description="Working directory (absolute); '' = the sandbox's default.")] = ""
    uid: Uid = 0
    gid: Gid = 0
    stdin: Annotated[str | None, Meta(description="Text written to the process's standard input.")] = None
    keep_stdin_open: Annotated[
        bool | None,
        Meta(description="Leave stdin open for write_stdin after 'stdin' (default: true when background)."),
    ] = None
    timeout: Annotated[
        Annotated[int, Meta(ge=1, le=MAX_SECONDS)] | None,
        Meta(description="Seconds before the process is killed (default 60; background: none)."),
    ] = None
    background: Annotated[
        bool, Meta(description="true: return at once with process_id (servers, watchers, REPLs).")
    ] = False
    truncate_output_at: TruncateOutputAt = 8000


class WriteStdinParams(api.Model):
    sandbox_id: SandboxId
    process_id: ProcessId
    data: Annotated[str | None, Meta(description="Text to write (UTF-8).")] = None
    data_base64: Annotated[str | None, Meta(description="Bytes to write, base64 (instead of data).")] = None
    close: Annotated[bool, Meta(description="Close stdin after writing (the process sees EOF).")] = False


class SignalParams(api.Model):
    sandbox_id: SandboxId
    process_id: ProcessId
    signal: Annotated[
        str, Meta(description="Signal name or number: TERM (default), INT, HUP, KILL, USR1, 15, ...")
    ] = "TERM"


class GetProcessParams(api.Model):
    sandbox_id: SandboxId
    process_id: ProcessId
    wait: Annotated[
        int, Meta(ge=0, le=MAX_SECONDS, description="Seconds to wait for it to exit (0: its state now).")
    ] = 0
    stream: PageStream = None
    offset: PageOffset = 0
    limit: PageLimit = None
    truncate_output_at: TruncateOutputAt = 8000


class ExposePortParams(api.Model):
    sandbox_id: SandboxId
    port: Annotated[int, Meta(ge=1, le=65535, description="TCP port a server listens on in the sandbox.")]


class SnapshotSandboxParams(api.Model):
    sandbox_id: SandboxId
    tag: Annotated[str | None, Meta(description="Tag the new image, e.g. 'myproject/dev-db/debian'.")] = None


class StopSandboxParams(api.Model):
    sandbox_id: SandboxId
    commit: Annotated[
        bool, Meta(description="Keep the sandbox's filesystem as a new image (result_image).")
    ] = False


class ListSandboxesParams(api.Model):
    pass


# ---------------------------------------------------------------------- results


class PortOutput(api.Model):
    """An exposed port: `url` (host loopback only) reaches `port` in the sandbox."""

    port: int
    url: str
    host_port: int
    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class SandboxOutput(api.Model):
    """A long-lived sandbox. `expires_at`: when it stops if nothing happens (none while busy or stopped)."""

    sandbox_id: str
    image: str
    state: str  # starting | running | stopping | stopped
    status: str = ""  # its operation's status
    created_at: str = ""
    ttl_seconds: int = 0
    expires_at: str | None = None
    idle_seconds: float | None = None
    busy: bool = False
    networking: bool = True
    processes_running: int = 0
    commands: int = 0
    ports: list[PortOutput] = msgspec.field(default_factory=list)
    snapshots: list[str] = msgspec.field(default_factory=list)
    stop_reason: str | None = None
    error: str | None = None
    result_image: str | None = None
    hint: str | None = None


class SandboxListOutput(api.Model):
    sandboxes: list[SandboxOutput]
    hint: str | None = None


class WriteStdinOutput(api.Model):
    sandbox_id: str
    process_id: int
    bytes_written: int
    closed: bool


class ExposePortOutput(api.Model):
    sandbox_id: str
    port: int
    url: str
    host: str
    host_port: int
    hint: str | None = None


class SnapshotOutput(api.Model):
    """The sandbox's filesystem as an immutable image (a child of the image it started from)."""

    sandbox_id: str
    image: str
    parent: str
    tag: str | None = None
    unchanged: bool = False
    bytes: int = 0
    pause_ms: float = 0.0
    total_ms: float = 0.0
    frozen_with: str = ""
    commands: int = 0
    hint: str | None = None
