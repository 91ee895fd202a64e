"""Result shapes of the tools: the reference's fields (COMPAT §3 and §4) plus the superset of §14.

Every field has a default so the derived `outputSchema` marks nothing required that the reference
did not; `forbid_unknown_fields` stays off so newer clients can add fields without breaking us.
Where a result has exactly the shape of a Contree API Struct it subclasses it (`ResultRef`, `ImageOutput`,
`RunLimits`, `UploadOutput`): one definition of the fields, the tool's own name in the schema. The others
differ from their API cousins on purpose: `OperationSummaryOutput`, `Resources`, `GrepSubmatch` and
`WhoAmIOutput` default every field (the API requires some), and `OperationOutput` is flat.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from contree import api
from contree.backend import DiskUsage


class ResultRef(api.OperationResult):
    pass  # no docstring: the schema keeps no description, as before


class Resources(api.Model, omit_defaults=False):
    """The 16 `InstanceResult.resources` counters of the backend."""

    block_input: int | None = None
    block_output: int | None = None
    cost: float | None = None
    elapsed_time: float | None = None
    involuntary_switches: int | None = None
    max_rss: int | None = None
    monotonic_time: float | None = None
    page_faults: int | None = None
    page_faults_io: int | None = None
    shared_memory: int | None = None
    signals: int | None = None
    swaps: int | None = None
    system_cpu_time: float | None = None
    unshared_memory: int | None = None
    user_cpu_time: float | None = None
    voluntary_switches: int | None = None


class RunLimits(api.InstanceLimits, omit_defaults=False):
    """The limits a run ran under (embedded engine); a missing field was not enforced."""


class OperationOutput(api.Model):
    """One operation (a `run` or an import), flat. `SUCCESS` means it ran; see `exit_code` for the command.

    The reference's fields first (COMPAT §3), then what an agent needs beyond them — each thing once:
    the operation is `uuid`, the result image `result_image_uuid` (and, as the reference has it,
    `result.image`). `stdout`/`stderr` are the first bytes of each stream; when a stream was longer,
    `*_truncated` is set and `*_tail`, `*_bytes` and `*_resource` say what the rest holds and where."""

    uuid: str = ""
    status: str = ""
    kind: str = ""
    error: str | None = None
    created_at: str = ""
    result: ResultRef | None = None
    duration: float | None = None
    image_size: int | None = None
    consumed_cpu: float | None = None
    consumed_memory: int | None = None
    image_uuid: str | None = None
    result_image_uuid: str | None = None
    exit_code: int | None = None
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    # superset (COMPAT §14)
    filesystem_changed: bool | None = None
    signal: int | None = None
    oom_killed: bool = False  # the OOM killer killed a process of the run (embedded engine)
    limits: RunLimits | None = None  # the limits the run ran under (embedded engine)
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_bytes: int | None = None
    stderr_bytes: int | None = None
    stdout_tail: str | None = None
    stderr_tail: str | None = None
    stdout_resource: str | None = None
    stderr_resource: str | None = None
    output_quota_exceeded: bool = False
    output_bytes_kept: int | None = None
    hint: str | None = None
    resources: Resources | None = None


class OperationRef(api.Model):
    """Returned by `wait=false`: poll it with get_operation or wait_operations."""

    operation_id: str


class ImageOutput(api.Image):
    pass


class ImageListOutput(api.Model):
    images: list[ImageOutput]


class TokenObtainOutput(api.Model):
    status: Literal["success", "error"]
    registry: str
    url: str = ""
    message: str = ""
    agent_instruction: str = ""


class RegistryAuthOutput(api.Model):
    status: Literal["success", "error"]
    registry: str
    message: str = ""


class UploadOutput(api.FileResponse):
    pass


class DownloadSource(api.Model):
    image: str
    path: str


class DownloadOutput(api.Model):
    success: bool
    source: DownloadSource
    destination: str
    size: int
    executable: bool
    sha256: str = ""


class OperationSummaryOutput(api.Model):
    uuid: str = ""
    kind: str = ""
    status: str = ""
    error: str | None = None
    created_at: str = ""
    duration: float | None = None
    image_uuid: str | None = None
    result_image_uuid: str | None = None
    image_size: int | None = None
    consumed_cpu: float | None = None
    consumed_memory: int | None = None


class OperationListOutput(api.Model):
    operations: list[OperationSummaryOutput]
    hint: str | None = None


class WaitOperationsOutput(api.Model):
    results: dict[str, OperationOutput] = msgspec.field(default_factory=dict)
    completed: list[str] = msgspec.field(default_factory=list)
    cancelled: list[str] = msgspec.field(default_factory=list)
    timed_out: bool = False
    pending: list[str] = msgspec.field(default_factory=list)
    errors: dict[str, str] = msgspec.field(default_factory=dict)
    hint: str | None = None


class CancelOutput(api.Model):
    cancelled: bool
    operation_id: str
    status: str = ""


class UpgradeInfo(api.Model):
    current: str
    latest: str
    command: str


class WhoAmIOutput(api.Model):
    token_uuid: str
    token_expiration: int | None = None
    permissions: dict[str, bool] = msgspec.field(default_factory=dict)
    limits: dict[str, int] = msgspec.field(default_factory=dict)
    operations_stat: dict[str, int] = msgspec.field(default_factory=dict)
    mcp_version: str = ""
    mcp_upgrade: UpgradeInfo | None = None
    backend: str = ""
    disk_usage: DiskUsage | None = None  # the embedded engine's home: what it holds, what prune frees


FileType = Literal["file", "directory", "symlink", "fifo", "socket", "char_device", "block_device"]


class FileEntry(api.Model):
    name: str
    path: str
    type: FileType
    size: int
    mode: str | None = None
    target: str | None = None


class ListFilesOutput(api.Model):
    """One page of a directory: `count` entries of `total`; `next_cursor` (with `hint`) when more follow."""

    path: str
    count: int
    files: list[FileEntry]
    next_cursor: str | None = None
    total: int | None = None
    hint: str | None = None


class ReadFileOutput(api.Model):
    path: str
    content: str
    encoding: Literal["utf-8", "base64"] = "utf-8"
    bytes_size: int = 0
    truncated: bool = False
    offset: int = 0
    hint: str | None = None


class GrepSubmatch(api.Model):
    text: str = ""
    start: int = 0
    end: int = 0


class GrepMatchOutput(api.Model):
    path: str
    line_number: int
    line_text: str
    type: str = "match"
    line_bytes: int | None = None
    submatches: list[GrepSubmatch] = msgspec.field(default_factory=list)


class GrepOutput(api.Model):
    path: str
    patterns: list[str]
    truncated: bool = False
    matches: list[GrepMatchOutput] = msgspec.field(default_factory=list)
    next_offset: int | None = None
    hint: str | None = None


class GuideOutput(api.Model):
    section: str
    content: str
    available_sections: list[str]


class SyncReport(api.Model):
    """Emitted as a log notification by rsync (the result stays the bare integer of the reference)."""

    files: int = 0
    bytes: int = 0
    uploaded: int = 0
    uploaded_bytes: int = 0
    skipped: list[str] = msgspec.field(default_factory=list)


NonNegInt = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]
JsonObject = dict[str, Any]


class ProcessOutput(api.Model):
    """One process of a sandbox. `status`: running | exited | killed (by a signal) | timed_out. `stdout`/
    `stderr` are the first bytes; when a stream was longer, `*_truncated` is set and `*_tail`, `*_bytes`
    and `*_resource` say what the rest holds and where."""

    sandbox_id: str
    process_id: int
    status: str
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    pid: int | None = None  # inside the sandbox
    duration: float | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_bytes: int | None = None
    stderr_bytes: int | None = None
    stdout_tail: str | None = None
    stderr_tail: str | None = None
    stdout_resource: str | None = None
    stderr_resource: str | None = None
    output_quota_exceeded: bool = False
    output_bytes_kept: int | None = None
    hint: str | None = None
