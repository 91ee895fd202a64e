"""Wire models of the Contree REST API (`shared/reference/contree-openapi.yaml`).

One msgspec Struct per schema of `components.schemas`, named exactly like the schema; inline objects of
those schemas get their own Struct (`ImageRegistry`, `RegistryCredentials`, `InjectedFile`,
`InstanceResources`, `ProcessState`, `OperationResult`, `NetworkConfigured`) and so do the inline
request/response bodies of the paths (`ImageImportResponse`, `SubprocessCreateResponse`,
`ImageTagRequest`).

Unknown fields: request bodies the server validates strictly (`InstanceSpawnRequest`, `ExecSpec`,
`ClosableStreamRepr` and what they contain) forbid unknown fields, so the REST server answers 400 like
the cloud does (CONTREE-API §8). Every other Struct ignores unknown fields, so the client keeps working
when the cloud adds a field.

Two schemas are untagged `oneOf`s whose discriminator lives in the parent (`OperationResponse.metadata`
by `kind`, `OperationEvent.data` by `type`); msgspec cannot decode such unions, so those fields are
plain JSON objects and `OperationResponse.instance_metadata()` / `.import_metadata()` and
`OperationEvent.payload()` convert them to the typed Structs. Build them with `metadata_from()` and
`OperationEvent.make()`.

Every Struct derives from `Model` (keyword-only fields, unknown fields ignored) or `RequestBody` (unknown
fields refused); `omit_defaults=True` is set per Struct, only where the spec allows a field to be absent.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal, dataclass_transform

import msgspec
from msgspec import UNSET, UnsetType

OperationStatus = Literal["PENDING", "ASSIGNED", "EXECUTING", "SUCCESS", "FAILED", "CANCELLED"]
OperationKind = Literal["image_import", "instance"]
StreamEncoding = Literal["ascii", "base64"]
OperationEventType = Literal[
    "init",
    "spawn",
    "stdin",
    "stdout",
    "stderr",
    "exit",
    "truncated",
    "size_cap",
    "network",
    "shutdown",
    "completion",
]
GrepLineType = Literal["match", "context"]
# The cloud's four, then the embedded engine's long-lived sandboxes' ("additional categories may be added"):
# stopped by stop_sandbox, idle for their ttl_seconds.
ShutdownReason = Literal["job_complete", "timeout", "spawn_failed", "signal", "stopped", "idle_timeout"]
StreamName = Literal["stdin", "stdout", "stderr"]
TerminalStatus = Literal["SUCCESS", "FAILED", "CANCELLED"]

# The one set of terminal operation statuses (the engine, the client and the tools read this one).
TERMINAL_STATUSES: frozenset[OperationStatus] = frozenset(("SUCCESS", "FAILED", "CANCELLED"))

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
TAG_SOURCE_PATTERN = r"^tag:[A-Za-z0-9][A-Za-z0-9_-]*(?:[:/.][A-Za-z0-9_-]+)*$"
CWD_PATTERN = r"^((/[^/]*)+/?)?$"

DEFAULT_TRUNCATE_OUTPUT_AT = 1048576
MAX_TRUNCATE_OUTPUT_AT = 10485760
DEFAULT_MAX_LAYER_BYTES = 12884901888
MAX_CPUS = 65536.0  # bounds of the resources_limits extensions (the engine's own maxima are lower)
MAX_PIDS = 4194304  # the kernel's pid_max ceiling
DEFAULT_HOSTNAME = "linuxkit"
DEFAULT_IMPORT_TIMEOUT = 300

Cwd = Annotated[str, msgspec.Meta(pattern=CWD_PATTERN)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


# ---------------------------------------------------------------- bases


class _KeywordOnly(msgspec.StructMeta):
    """Makes `kw_only=True` the default of every Struct below `Model`: msgspec applies `kw_only` only to
    the fields of the class that names it, so without this each subclass would have to repeat it
    (msgspec's own answer to inheritable kw_only, msgspec#841, is a StructMeta subclass)."""

    def __new__(
        mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **config: Any
    ) -> _KeywordOnly:
        config.setdefault("kw_only", True)
        return super().__new__(mcls, name, bases, namespace, **config)


@dataclass_transform(kw_only_default=True, field_specifiers=(msgspec.field,))
class Model(msgspec.Struct, metaclass=_KeywordOnly):
    """Base of the API's Structs: keyword-only fields; unknown fields are ignored, so a client keeps
    working when the server adds one."""


class RequestBody(Model, forbid_unknown_fields=True):
    """A request body the server validates strictly: an unknown field is a 400 (CONTREE-API §8)."""


# ---------------------------------------------------------------- streams


class StreamRepr(Model):
    value: str
    encoding: StreamEncoding
    truncated: bool = False


class ClosableStreamRepr(RequestBody):
    value: str
    encoding: StreamEncoding = "ascii"
    close: bool = True


_PRINTABLE = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}


def is_ascii_text(data: bytes) -> bool:
    """True when every byte is printable ASCII or \\n, \\r, \\t (the spec's ascii encoding rule)."""
    # bytes.isascii is C-speed; the per-byte check then only runs over pure-ASCII input.
    if not data.isascii():
        return False
    return not data.translate(None, bytes(_PRINTABLE))


def encode_stream(data: bytes, truncated: bool = False) -> StreamRepr:
    if is_ascii_text(data):
        return StreamRepr(value=data.decode("ascii"), encoding="ascii", truncated=truncated)
    return StreamRepr(value=base64.b64encode(data).decode("ascii"), encoding="base64", truncated=truncated)


def decode_stream(stream: StreamRepr | ClosableStreamRepr) -> bytes:
    """The bytes a stream carries; raises ValueError on malformed base64 or non-ASCII 'ascii' text."""
    if stream.encoding == "base64":
        try:
            return base64.b64decode(stream.value, validate=True)
        except Exception as exc:  # binascii.Error is a ValueError but say what was wrong
            raise ValueError(f"invalid base64 stream value: {exc}") from None
    # 'ascii' values from real clients are often UTF-8 text; pass those bytes through unchanged.
    return stream.value.encode("utf-8")


# ---------------------------------------------------------------- spawn / exec


class InstanceResourcesLimits(RequestBody):
    max_layer_bytes: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_LAYER_BYTES
    # Extensions of the embedded engine (absent = the engine's default; the cloud does not know them):
    # raise or lower one run's cgroup limits within `whoami.limits.instance_max_*`.
    memory_bytes: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | UnsetType = UNSET
    cpus: Annotated[float, msgspec.Meta(ge=0.01, le=MAX_CPUS)] | UnsetType = UNSET
    pids: Annotated[int, msgspec.Meta(ge=1, le=MAX_PIDS)] | UnsetType = UNSET


class InstanceNetworking(RequestBody):
    enabled: bool = True


class InjectedFile(RequestBody):
    """One entry of `InstanceSpawnRequest.files` (absolute path → uploaded file record)."""

    uuid: str
    uid: int = 0
    gid: int = 0
    mode: str | None = None  # octal string: "0644" (also "0o100644" as contree-mcp's rsync sends)


class ExecSpec(RequestBody, omit_defaults=True):
    command: str
    args: list[str] = msgspec.field(default_factory=list)
    shell: bool = False
    env: dict[str, str | None] | None = None  # null values: see CONTREE-API §14 #10
    cwd: Cwd = ""
    uid: NonNegative = 0
    gid: NonNegative = 0
    stdin: ClosableStreamRepr | None = None
    truncate_output_at: NonNegative = DEFAULT_TRUNCATE_OUTPUT_AT
    # Extension (the API has none, CONTREE-API §14 #12): seconds before the process is killed. The
    # embedded engine's long-lived sandboxes honour it; absent = as long as the instance runs.
    timeout: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] | None = None


class InstanceSpawnRequest(RequestBody, omit_defaults=True):
    command: str
    image: str  # UUID or "tag:<tag>" (ImageSource)
    disposable: bool = False
    hostname: str = DEFAULT_HOSTNAME
    args: list[str] = msgspec.field(default_factory=list)
    shell: bool = False
    env: dict[str, str | None] | None = None
    preserve_env: bool = False
    preserve_cwd: bool = False
    cwd: Cwd = ""
    uid: NonNegative = 0
    gid: NonNegative = 0
    resources_limits: InstanceResourcesLimits | None = None
    networking: InstanceNetworking | None = None
    stdin: ClosableStreamRepr | None = None
    timeout: int | None = None  # no spec default; the engine applies its own (CONTREE-API §14 #11)
    truncate_output_at: NonNegative = DEFAULT_TRUNCATE_OUTPUT_AT
    files: dict[str, InjectedFile] | None = None


def _echo_fields(request: InstanceSpawnRequest) -> dict[str, Any]:
    """Request fields for an echo: defaults filled in, absent optional fields left UNSET."""
    fields = msgspec.structs.asdict(request)
    del fields["image"]
    for name in ("stdin", "timeout"):
        if fields[name] is None:
            fields[name] = UNSET
    if fields["resources_limits"] is None:
        fields["resources_limits"] = InstanceResourcesLimits()
    if fields["networking"] is None:
        fields["networking"] = InstanceNetworking()
    if fields["files"] is None:
        fields["files"] = {}
    return fields


# ---------------------------------------------------------------- results


class InstanceResources(Model):
    """`InstanceResult.resources`; running processes report sentinel zeros."""

    block_input: int = 0
    block_output: int = 0
    cost: float = 0.0
    elapsed_time: float = 0.0
    involuntary_switches: int = 0
    max_rss: int = 0  # KB
    monotonic_time: float = 0.0
    page_faults: int = 0
    page_faults_io: int = 0
    shared_memory: int = 0
    signals: int = 0
    swaps: int = 0
    system_cpu_time: float = 0.0
    unshared_memory: int = 0
    user_cpu_time: float = 0.0
    voluntary_switches: int = 0


class ProcessState(Model):
    """`InstanceResult.state`; exit_code and signal are -1 while running / when not applicable."""

    continued: bool = False
    core_dump: bool = False
    exit_code: int = -1
    pid: int = 0
    signal: int = -1
    stopped: bool = False
    timed_out: bool = False
    oom_killed: bool = False  # extension: the kernel's OOM killer killed a process of the sandbox


class InstanceLimits(Model, omit_defaults=True):
    """Extension: the limits a run of the embedded engine ran under (absent = not enforced)."""

    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None
    max_layer_bytes: int | None = None


class InstanceResult(Model, omit_defaults=True):
    resources: InstanceResources | None = None
    state: ProcessState | None = None
    stdout: StreamRepr | None = None
    stderr: StreamRepr | None = None
    limits: InstanceLimits | None = None


class InstanceSpawnResponse(Model):
    """The spawn request echoed with `uuid` (operation id), `image` as UUID and `result` null."""

    uuid: str
    command: str
    image: str
    hostname: str = DEFAULT_HOSTNAME
    args: list[str] = msgspec.field(default_factory=list)
    shell: bool = False
    env: dict[str, str | None] | None = None
    preserve_env: bool = False
    preserve_cwd: bool = False
    cwd: str = ""
    uid: int = 0
    gid: int = 0
    resources_limits: InstanceResourcesLimits = msgspec.field(default_factory=InstanceResourcesLimits)
    networking: InstanceNetworking = msgspec.field(default_factory=InstanceNetworking)
    stdin: ClosableStreamRepr | UnsetType = UNSET  # not nullable in the schema: absent instead
    timeout: int | UnsetType = UNSET
    truncate_output_at: int = DEFAULT_TRUNCATE_OUTPUT_AT
    disposable: bool = False
    files: dict[str, InjectedFile] = msgspec.field(default_factory=dict)
    result: InstanceResult | None = None

    @classmethod
    def echo(cls, request: InstanceSpawnRequest, *, uuid: str, image: str) -> InstanceSpawnResponse:
        return cls(uuid=uuid, image=image, **_echo_fields(request))


# ---------------------------------------------------------------- images and import


class RegistryCredentials(Model, omit_defaults=True):
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # never leak the password into logs
        return f"RegistryCredentials(username={self.username!r}, password=<MASKED>)"


class ImageRegistry(Model, omit_defaults=True):
    url: str
    credentials: RegistryCredentials | None = None


class ImageImportRequest(Model, omit_defaults=True):
    registry: ImageRegistry
    tag: str | None = None
    timeout: int = DEFAULT_IMPORT_TIMEOUT


class ImageImportMetadata(Model, omit_defaults=True):
    """Import request as echoed in operation metadata; the password is always `<MASKED>`."""

    registry: ImageRegistry | None = None
    tag: str | None = None
    timeout: int = DEFAULT_IMPORT_TIMEOUT

    @classmethod
    def masked(cls, request: ImageImportRequest) -> ImageImportMetadata:
        creds = request.registry.credentials
        if creds is not None:
            creds = RegistryCredentials(
                username=creds.username, password="<MASKED>" if creds.password is not None else None
            )
        registry = ImageRegistry(url=request.registry.url, credentials=creds)
        return cls(registry=registry, tag=request.tag, timeout=request.timeout)


class ImageImportResponse(Model):
    """201 body of POST /images/import: the operation UUID."""

    uuid: str


class ImageTagRequest(Model):
    """Body of PATCH /images/{uuid}/tag."""

    tag: str


class Image(Model):
    uuid: str
    tag: str | None = None
    created_at: str = ""
    operation_uuid: str | None = None


class ImageListResponse(Model):
    images: list[Image] = msgspec.field(default_factory=list)


# ---------------------------------------------------------------- operations


class OperationInstanceMetadata(Model):
    """The spawn request with `image` resolved to a UUID, plus the main process result."""

    command: str
    image: str
    disposable: bool = False
    hostname: str = DEFAULT_HOSTNAME
    args: list[str] = msgspec.field(default_factory=list)
    shell: bool = False
    env: dict[str, str | None] | None = None
    preserve_env: bool = False
    preserve_cwd: bool = False
    cwd: str = ""
    uid: int = 0
    gid: int = 0
    resources_limits: InstanceResourcesLimits = msgspec.field(default_factory=InstanceResourcesLimits)
    networking: InstanceNetworking = msgspec.field(default_factory=InstanceNetworking)
    stdin: ClosableStreamRepr | UnsetType = UNSET
    timeout: int | UnsetType = UNSET
    truncate_output_at: int = DEFAULT_TRUNCATE_OUTPUT_AT
    files: dict[str, InjectedFile] = msgspec.field(default_factory=dict)
    result: InstanceResult | UnsetType = UNSET

    @classmethod
    def from_request(
        cls, request: InstanceSpawnRequest, *, image: str, result: InstanceResult | None = None
    ) -> OperationInstanceMetadata:
        return cls(image=image, result=UNSET if result is None else result, **_echo_fields(request))


def metadata_from(meta: OperationInstanceMetadata | ImageImportMetadata) -> dict[str, Any]:
    """The JSON object to store in `OperationResponse.metadata`."""
    out: dict[str, Any] = msgspec.to_builtins(meta)
    return out


class OperationResult(Model):
    """`OperationResponse.result`: the produced image and, for imports, its tag."""

    image: str | None = None
    tag: str | None = None


class OperationSummary(Model):
    uuid: str
    kind: OperationKind
    status: OperationStatus
    error: str | None = None
    created_at: str = ""
    duration: float | None = None
    image_size: int | None = None
    consumed_cpu: float | None = None
    consumed_memory: int | None = None
    image_uuid: str | None = None
    result_image_uuid: str | None = None


class OperationResponse(OperationSummary):
    """The summary's fields, then the request echo (`metadata`) and the result."""

    metadata: dict[str, Any] | None = None  # OperationInstanceMetadata | ImageImportMetadata by `kind`
    result: OperationResult | None = None

    def instance_metadata(self) -> OperationInstanceMetadata | None:
        if self.kind != "instance" or self.metadata is None:
            return None
        return msgspec.convert(self.metadata, OperationInstanceMetadata)

    def import_metadata(self) -> ImageImportMetadata | None:
        if self.kind != "image_import" or self.metadata is None:
            return None
        return msgspec.convert(self.metadata, ImageImportMetadata)

    def instance_result(self) -> InstanceResult | None:
        """The main process's result (`metadata.result`) alone: None for an import or while it runs.
        Cheaper than `instance_metadata()` when the request echo (env, a large `files` map) is not needed."""
        if self.kind != "instance" or not self.metadata or self.metadata.get("result") is None:
            return None
        return msgspec.convert(self.metadata["result"], InstanceResult)

    def summary(self) -> OperationSummary:
        """The summary alone (what GET /operations lists), without `metadata` and `result`."""
        return OperationSummary(**{name: getattr(self, name) for name in OperationSummary.__struct_fields__})


class SubprocessCreateResponse(Model):
    """201 body of POST /operations/{id}/subprocesses."""

    spid: Annotated[int, msgspec.Meta(ge=2)]


# ---------------------------------------------------------------- files


class FileResponse(Model):
    uuid: str
    sha256: str
    size: int  # -1 if unknown


class File(Model):
    uuid: str
    sha256: str
    size: int
    created_at: str
    updated_at: str


class FilesListResponse(Model):
    files: list[File] = msgspec.field(default_factory=list)


# ---------------------------------------------------------------- inspect


class FileItem(Model):
    size: int
    path: str
    owner: str | int
    group: str | int
    mode: int
    mtime: int
    nlink: int
    uid: int
    gid: int
    is_dir: bool
    is_regular: bool
    is_symlink: bool
    is_socket: bool
    is_fifo: bool
    symlink_to: str


class DirectoryList(Model):
    path: str
    files: list[FileItem]


class GrepSubmatch(Model):
    text: str
    start: int
    end: int


class GrepMatch(Model):
    path: str
    line_number: int
    absolute_offset: int
    line_text: str
    line_bytes: int
    submatches: list[GrepSubmatch]
    type: GrepLineType


class GrepResult(Model):
    path: str
    patterns: list[str]
    matches: list[GrepMatch]
    truncated: bool


# ---------------------------------------------------------------- misc


class Error(Model, omit_defaults=True):
    """Error body. `traceback` exists in the schema but is never sent nor forwarded (§14 #20)."""

    error: str | dict[str, Any] | list[dict[str, Any]]
    status: int | None = None
    traceback: list[str] | None = None

    def message(self) -> str:
        if isinstance(self.error, str):
            return self.error
        return msgspec.json.encode(self.error).decode()


class WhoAmIResponse(Model):
    token_uuid: str
    token_expiration: int | None
    permissions: dict[str, bool]
    operations_stat: dict[str, int]
    limits: dict[str, int] = msgspec.field(default_factory=dict)


# ---------------------------------------------------------------- event log


class EventDataInit(Model):
    # The spec requires all four; the cloud's own examples omit some (§14 #14), so decode leniently.
    started_at: str = ""
    runtime_path: str = ""
    verbose: bool = False
    init_pid: int = 1
    hostname: str | UnsetType = UNSET
    kernel: str | UnsetType = UNSET
    machine: str | UnsetType = UNSET
    boot_id: str | UnsetType = UNSET


class EventDataSpawn(Model):
    pid: int
    command: str = ""
    args: list[str] = msgspec.field(default_factory=list)
    shell: bool = False
    cwd: str = ""
    uid: int = 0
    gid: int = 0
    timeout: int = 0
    truncate_at: int = DEFAULT_TRUNCATE_OUTPUT_AT
    env: dict[str, str] | UnsetType = UNSET


class EventDataStream(StreamRepr):
    """Payload of a stdin/stdout/stderr event: a StreamRepr whose `truncated` is always false."""


class EventResources(Model):
    user_time_us: int = 0
    sys_time_us: int = 0
    max_rss_kb: int = 0
    shared_memory: int = 0
    unshared_memory: int = 0
    swaps: int = 0
    minor_faults: int = 0
    major_faults: int = 0
    voluntary_ctx_switches: int = 0
    involuntary_ctx_switches: int = 0
    block_input_ops: int = 0
    block_output_ops: int = 0
    ipc_msgs_sent: int = 0
    ipc_msgs_received: int = 0
    signals_received: int = 0


class EventDataExit(Model):
    pid: int
    code: int
    signal: int
    timed_out: bool
    duration_ms: int
    resources: EventResources = msgspec.field(default_factory=EventResources)
    core_dump: bool = False
    oom_killed: bool | UnsetType = UNSET  # extension, as in ProcessState: absent unless true


class EventDataTruncated(Model):
    stream: StreamName
    bytes_emitted: int
    bytes_dropped: int


class EventDataSizeCap(Model):
    limit_bytes: int
    file_size: int


class NetworkInterface(Model):
    name: str
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errs: int = 0
    rx_drop: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errs: int = 0
    tx_drop: int = 0


class NetworkConfigured(Model, omit_defaults=True):
    """`EventDataNetwork.configured`: only the keys that were applied."""

    ip4: str | None = None
    ip4_gw: str | None = None
    ip6: str | None = None
    ip6_gw: str | None = None
    gw_mac: str | None = None
    nameserver: str | None = None


class EventDataNetwork(Model):
    interfaces: list[NetworkInterface]
    configured: NetworkConfigured | UnsetType = UNSET
    error: str | UnsetType = UNSET


class EventDataShutdown(Model):
    stopped_at: str
    reason: str  # ShutdownReason; "additional categories may be added"


class EventDataCompletion(Model):
    status: TerminalStatus
    duration_ms: int
    result_image_uuid: str | None = None
    error: str | None = None
    image_size_bytes: int = 0


def encode_event_stream(data: bytes) -> EventDataStream:
    """Payload of a stdin/stdout/stderr event (same ascii/base64 rule; `truncated` is always false)."""
    stream = encode_stream(data)
    return EventDataStream(value=stream.value, encoding=stream.encoding)


EventData = (
    EventDataInit
    | EventDataSpawn
    | EventDataStream
    | EventDataExit
    | EventDataTruncated
    | EventDataSizeCap
    | EventDataNetwork
    | EventDataShutdown
    | EventDataCompletion
)

EVENT_DATA_TYPES: dict[str, type[msgspec.Struct]] = {
    "init": EventDataInit,
    "spawn": EventDataSpawn,
    "stdin": EventDataStream,
    "stdout": EventDataStream,
    "stderr": EventDataStream,
    "exit": EventDataExit,
    "truncated": EventDataTruncated,
    "size_cap": EventDataSizeCap,
    "network": EventDataNetwork,
    "shutdown": EventDataShutdown,
    "completion": EventDataCompletion,
}


class OperationEvent(Model, omit_defaults=True):
    """One event of an operation's log. `spid` is None only for `completion`."""

    id: int
    ts: str
    type: OperationEventType
    data: dict[str, Any]
    spid: int | None = None

    @classmethod
    def make(
        cls, *, id: int, ts: str, data: EventData, type: OperationEventType, spid: int | None
    ) -> OperationEvent:
        return cls(id=id, ts=ts, type=type, spid=spid, data=msgspec.to_builtins(data))

    def payload(self) -> EventData:
        """The typed `data` for this event's `type` (raises msgspec.ValidationError if malformed)."""
        result: EventData = msgspec.convert(self.data, EVENT_DATA_TYPES[self.type])  # type: ignore[assignment]
        return result
