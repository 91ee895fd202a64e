"""Backend records → tool results. Reads backend Structs through `msgspec.to_builtins` so the tools
depend on the wire field names of the OpenAPI spec, not on how `contree.api` models unions."""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from tools.budget import utf8_boundary
from tools.models import ImageOutput, OperationOutput, OperationSummaryOutput, Resources, ResultRef, RunLimits

TERMINAL = frozenset({"SUCCESS", "FAILED", "CANCELLED"})


def as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    out = msgspec.to_builtins(value)
    return out if isinstance(out, dict) else {}


def stream_raw(stream: Any) -> tuple[bytes, bool]:
    """(bytes, truncated by the backend) of a StreamRepr."""
    data = as_dict(stream)
    value = data.get("value") or ""
    if data.get("encoding") == "base64":
        try:
            raw = base64.b64decode(value)
        except ValueError:
            raw = value.encode()
    else:
        raw = value.encode()
    return raw, bool(data.get("truncated", False))


def head_length(raw: bytes, cap: int | None) -> int:
    """Bytes of a stream shown as its head: all of it, or `cap` bytes cut back to a character boundary."""
    if cap is None or len(raw) <= cap:
        return len(raw)
    return utf8_boundary(raw, cap)


def decode_stream(stream: Any, cap: int | None = None) -> tuple[str, bool]:
    """(text, truncated) for a StreamRepr, cut at `cap` bytes (never inside a character); read as UTF-8
    with replacement."""
    raw, truncated = stream_raw(stream)
    n = head_length(raw, cap)
    return raw[:n].decode("utf-8", errors="replace"), truncated or n < len(raw)


def image_output(image: Any) -> ImageOutput:
    data = as_dict(image)
    return ImageOutput(
        uuid=data.get("uuid") or "",
        tag=data.get("tag"),
        created_at=str(data.get("created_at") or ""),
        operation_uuid=data.get("operation_uuid"),
    )


def _resources(raw: Any) -> Resources | None:
    data = as_dict(raw)
    if not data:
        return None
    fields = set(Resources.__struct_fields__)
    return msgspec.convert({k: v for k, v in data.items() if k in fields}, Resources)


def _limits(raw: Any) -> RunLimits | None:
    data = as_dict(raw)
    if not data:
        return None
    fields = set(RunLimits.__struct_fields__)
    return msgspec.convert({k: v for k, v in data.items() if k in fields}, RunLimits)


def operation_output(op: Any, *, cap: int | None = None, with_resources: bool = False) -> OperationOutput:
    """The flat OperationOutput with each stream's head (`cap` bytes). Never copies `metadata` (it echoes
    `env` values and file maps). Tails, sizes and resource URIs of cut streams: `tools.output.shape`."""
    data = as_dict(op)
    status = str(data.get("status") or "")
    kind = str(data.get("kind") or "")
    metadata = as_dict(data.get("metadata"))
    result = as_dict(metadata.get("result")) if kind == "instance" else {}
    state = as_dict(result.get("state"))
    stdout, out_trunc = decode_stream(result.get("stdout"), cap)
    stderr, err_trunc = decode_stream(result.get("stderr"), cap)
    res = as_dict(data.get("result"))
    result_ref = ResultRef(image=res.get("image"), tag=res.get("tag")) if res else None
    result_image_uuid = data.get("result_image_uuid") if status == "SUCCESS" else None
    result_image = (res.get("image") if res else None) or result_image_uuid
    image_uuid = data.get("image_uuid")
    exit_code = state.get("exit_code") if state else None
    signal = state.get("signal") if state else None
    changed: bool | None = None
    if kind == "instance" and status == "SUCCESS":
        changed = bool(result_image) and result_image != image_uuid
    return OperationOutput(
        uuid=str(data.get("uuid") or ""),
        status=status,
        kind=kind,
        error=data.get("error"),
        created_at=str(data.get("created_at") or ""),
        result=result_ref,
        duration=data.get("duration"),
        image_size=data.get("image_size"),
        consumed_cpu=data.get("consumed_cpu"),
        consumed_memory=data.get("consumed_memory"),
        image_uuid=image_uuid,
        result_image_uuid=result_image_uuid,
        exit_code=exit_code if status in TERMINAL else None,
        timed_out=bool(state.get("timed_out", False)),
        stdout=stdout,
        stderr=stderr,
        filesystem_changed=changed,
        signal=signal if isinstance(signal, int) and signal >= 0 else None,
        stdout_truncated=out_trunc,
        stderr_truncated=err_trunc,
        oom_killed=bool(state.get("oom_killed", False)),
        limits=_limits(result.get("limits")),
        resources=_resources(result.get("resources")) if with_resources else None,
    )


def summary_output(op: Any) -> OperationSummaryOutput:
    data = as_dict(op)
    fields = set(OperationSummaryOutput.__struct_fields__)
    return msgspec.convert({k: v for k, v in data.items() if k in fields}, OperationSummaryOutput)
