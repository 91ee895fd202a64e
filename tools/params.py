"""Parameter types the tools share: declared once, so a parameter two tools take has one schema.

Each alias carries its bounds and description (`Meta`); a tool whose wording differs declares its own
`Annotated` over the bounded types here (`PositiveBytes`, `CpuCores`, `PidCount`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from contree import api
from tools.bounds import MAX_BYTES, MAX_ID, MAX_OFFSET, MAX_STATE_ID

IMAGE_DESC = "Image UUID, 'tag:<tag>' or a bare tag such as 'busybox:latest'."

PositiveBytes = Annotated[int, Meta(ge=1, le=MAX_BYTES)]
CpuCores = Annotated[float, Meta(ge=0.01, le=api.MAX_CPUS)]
PidCount = Annotated[int, Meta(ge=1, le=api.MAX_PIDS)]
Environment = dict[str, str | None]  # a null value unsets a variable


class InjectedFileSpec(api.Model):
    uuid: Annotated[str, Meta(description="File UUID from upload().")]
    mode: Annotated[str, Meta(pattern=r"^0?[0-7]{3,4}$", description="Permission bits, e.g. '0755'.")] = (
        "0644"
    )
    uid: Annotated[int, Meta(ge=0, le=MAX_ID)] = 0
    gid: Annotated[int, Meta(ge=0, le=MAX_ID)] = 0


ImageRef = Annotated[str, Meta(description=IMAGE_DESC)]
Command = Annotated[str, Meta(description="Shell command (shell=true) or executable path (shell=false).")]
Args = Annotated[list[str] | None, Meta(description="Arguments for the executable when shell=false.")]
Uid = Annotated[int, Meta(ge=0, le=MAX_ID, description="User id of the process.")]
Gid = Annotated[int, Meta(ge=0, le=MAX_ID, description="Group id of the process.")]
DirectoryStateId = Annotated[
    Annotated[int, Meta(ge=1, le=MAX_STATE_ID)] | str | None,
    Meta(description="Id returned by rsync: injects that synced directory."),
]
InjectedFiles = Annotated[
    dict[str, str | InjectedFileSpec] | None,
    Meta(description="{absolute_path: file_uuid} (or {uuid, mode, uid, gid}) of files from upload()."),
]
TruncateOutputAt = Annotated[
    int, Meta(ge=0, le=api.MAX_TRUNCATE_OUTPUT_AT, description="Bytes of stdout/stderr kept in the result.")
]

# paging through one whole stream of a process (get_operation, get_process)
PageStream = Annotated[
    Literal["stdout", "stderr"] | None,
    Meta(description="Page through one whole stream instead: it comes in 'stdout' (or 'stderr')."),
]
PageOffset = Annotated[int, Meta(ge=0, le=MAX_OFFSET, description="Byte offset of the page in 'stream'.")]
PageLimit = Annotated[
    PositiveBytes | None,
    Meta(description="Bytes per page (default about 32 KiB; at most the server's --read-max-bytes)."),
]
