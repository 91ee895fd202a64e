"""Backend records (`contree.api` Structs) → tool results, read by attribute: one conversion from the
backend's typed form to the agent's."""

from __future__ import annotations

import base64

from contree import api
from tools.budget import utf8_boundary
from tools.models import ImageOutput, OperationOutput, OperationSummaryOutput, Resources, ResultRef, RunLimits


def stream_raw(stream: api.StreamRepr | None) -> tuple[bytes, bool]:
    """(bytes, truncated by the backend) of a StreamRepr (an absent stream is empty)."""
    if stream is None:
        return b"", False
    if stream.encoding == "base64":
        try:
            raw = base64.b64decode(stream.value)
        except ValueError:
            raw = stream.value.encode()
    else:
        raw = stream.value.encode()
    return raw, stream.truncated


def head_length(raw: bytes, cap: int | None) -> int:
    """Bytes of a stream shown as its head: all of it, or `cap` bytes cut back to a character boundary."""
    if cap is None or len(raw) <= cap:
        return len(raw)
    return utf8_boundary(raw, cap)


def decode_stream(stream: api.StreamRepr | None, cap: int | None = None) -> tuple[str, bool]:
    """(text, truncated) for a StreamRepr, cut at `cap` bytes (never inside a character); read as UTF-8
    with replacement."""
    raw, truncated = stream_raw(stream)
    n = head_length(raw, cap)
    return raw[:n].decode("utf-8", errors="replace"), truncated or n < len(raw)


def image_output(image: api.Image) -> ImageOutput:
    return ImageOutput(
        uuid=image.uuid, tag=image.tag, created_at=image.created_at, operation_uuid=image.operation_uuid
    )


def _resources(raw: api.InstanceResources | None) -> Resources | None:
    if raw is None:
        return None
    return Resources(
        block_input=raw.block_input,
        block_output=raw.block_output,
        cost=raw.cost,
        elapsed_time=raw.elapsed_time,
        involuntary_switches=raw.involuntary_switches,
        max_rss=raw.max_rss,
        monotonic_time=raw.monotonic_time,
        page_faults=raw.page_faults,
        page_faults_io=raw.page_faults_io,
        shared_memory=raw.shared_memory,
        signals=raw.signals,
        swaps=raw.swaps,
        system_cpu_time=raw.system_cpu_time,
        unshared_memory=raw.unshared_memory,
        user_cpu_time=raw.user_cpu_time,
        voluntary_switches=raw.voluntary_switches,
    )


def _limits(raw: api.InstanceLimits | None) -> RunLimits | None:
    # an engine that enforced nothing reports `limits: {}`: no limits, as when it reports none
    if raw is None or raw == api.InstanceLimits():
        return None
    return RunLimits(
        memory_bytes=raw.memory_bytes, cpus=raw.cpus, pids=raw.pids, max_layer_bytes=raw.max_layer_bytes
    )


def operation_output(
    op: api.OperationResponse, *, cap: int | None = None, with_resources: bool = False
) -> OperationOutput:
    """The flat OperationOutput with each stream's head (`cap` bytes). Never copies `metadata` (it echoes
    `env` values and file maps). Tails, sizes and resource URIs of cut streams: `tools.output.shape`."""
    result = op.instance_result()
    state = result.state if result is not None else None
    stdout, out_trunc = decode_stream(result.stdout if result is not None else None, cap)
    stderr, err_trunc = decode_stream(result.stderr if result is not None else None, cap)
    ref = op.result
    result_image_uuid = op.result_image_uuid if op.status == "SUCCESS" else None
    result_image = (ref.image if ref is not None else None) or result_image_uuid
    changed: bool | None = None
    if op.kind == "instance" and op.status == "SUCCESS":
        changed = bool(result_image) and result_image != op.image_uuid
    signal = state.signal if state is not None else None
    return OperationOutput(
        uuid=op.uuid,
        status=op.status,
        kind=op.kind,
        error=op.error,
        created_at=op.created_at,
        result=ResultRef(image=ref.image, tag=ref.tag) if ref is not None else None,
        duration=op.duration,
        image_size=op.image_size,
        consumed_cpu=op.consumed_cpu,
        consumed_memory=op.consumed_memory,
        image_uuid=op.image_uuid,
        result_image_uuid=result_image_uuid,
        exit_code=state.exit_code if state is not None and op.status in api.TERMINAL_STATUSES else None,
        timed_out=state.timed_out if state is not None else False,
        stdout=stdout,
        stderr=stderr,
        filesystem_changed=changed,
        signal=signal if signal is not None and signal >= 0 else None,
        stdout_truncated=out_trunc,
        stderr_truncated=err_trunc,
        oom_killed=state.oom_killed if state is not None else False,
        limits=_limits(result.limits) if result is not None else None,
        resources=_resources(result.resources) if with_resources and result is not None else None,
    )


def summary_output(op: api.OperationSummary) -> OperationSummaryOutput:
    return OperationSummaryOutput(
        uuid=op.uuid,
        kind=op.kind,
        status=op.status,
        error=op.error,
        created_at=op.created_at,
        duration=op.duration,
        image_uuid=op.image_uuid,
        result_image_uuid=op.result_image_uuid,
        image_size=op.image_size,
        consumed_cpu=op.consumed_cpu,
        consumed_memory=op.consumed_memory,
    )
