"""Backend records → tool results. Reads backend Structs through `msgspec.to_builtins` so the tools
depend on the wire field names of the OpenAPI spec, not on how `contree.api` models unions."""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from tools.models import ImageOutput, OperationOutput, OperationSummaryOutput, Resources, ResultRef, RunLimits

TERMINAL = frozenset({"SUCCESS", "FAILED", "CANCELLED"})


def as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    out = msgspec.to_builtins(value)
    return out if isinstance(out, dict) else {}


def decode_stream(stream: Any, cap: int | None = None) -> tuple[str, bool]:
    """(text, truncated) for a StreamRepr, cut at `cap` bytes; read as UTF-8 with replacement."""
    data = as_dict(stream)
    value = data.get("value") or ""
    if data.get("encoding") == "base64":
        try:
            raw = base64.b64decode(value)
        except ValueError:
            raw = value.encode()
    else:
        raw = value.encode()
    truncated = bool(data.get("truncated", False))
    if cap is not None and len(raw) > cap:
        raw, truncated = raw[:cap], True
    return raw.decode("utf-8", errors="replace"), truncated


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


def operation_output(
    op: Any, *, cap: int | None = None, resource_base: str = "contree://operations/instance"
) -> OperationOutput:
    """The flat OperationOutput. Never copies `metadata` (it echoes `env` values and file maps)."""
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
    op_id = str(data.get("uuid") or "")
    return OperationOutput(
        uuid=op_id,
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
        operation_id=op_id,
        state=status,
        result_image=result_image if status == "SUCCESS" else None,
        result_tag=res.get("tag") if res else None,
        filesystem_changed=changed,
        stdout_truncated=out_trunc,
        stderr_truncated=err_trunc,
        signal=signal if isinstance(signal, int) and signal >= 0 else None,
        oom_killed=bool(state.get("oom_killed", False)),
        limits=_limits(result.get("limits")),
        resources=_resources(result.get("resources")),
        stdout_resource=f"{resource_base}/{op_id}/stdout" if kind == "instance" and op_id else None,
        stderr_resource=f"{resource_base}/{op_id}/stderr" if kind == "instance" and op_id else None,
    )


def summary_output(op: Any) -> OperationSummaryOutput:
    data = as_dict(op)
    fields = set(OperationSummaryOutput.__struct_fields__)
    return msgspec.convert({k: v for k, v in data.items() if k in fields}, OperationSummaryOutput)
