"""Output on the Contree cloud backend, which keeps only what its event log records (at most
`truncate_output_at`, 10 MiB, per stream): the tools ask it to record as much as it allows, page from
the event log, and say that the rest was not kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contree import api
from protocol.errors import InvalidParams
from tests.tools.fakes import FakeBackend, FakeContext, call, make_registry
from tools.budget import RESULT_BUDGET, result_size


class CloudBackend(FakeBackend):
    """The cloud as the tools see it: no `read_output`; output in the record and the event log."""

    def __init__(self) -> None:
        super().__init__()
        self.logs: dict[str, list[api.OperationEvent]] = {}

    def finish_recorded(self, op_id: str, recorded: bytes, *, cut: bool) -> None:
        self.finish(op_id)
        stream = api.encode_stream(recorded, cut)
        record = self.ops[op_id]
        assert record.metadata is not None
        record.metadata["result"]["stdout"] = msgspec.to_builtins(stream)
        events = [
            api.OperationEvent(
                id=i + 1,
                ts="2026-01-01T00:00:00Z",
                type="stdout",
                spid=1,
                data=msgspec.to_builtins(api.encode_event_stream(recorded[start : start + 8192])),
            )
            for i, start in enumerate(range(0, len(recorded), 8192))
        ]
        if cut:
            events.append(
                api.OperationEvent(
                    id=len(events) + 1,
                    ts="2026-01-01T00:00:00Z",
                    type="truncated",
                    spid=1,
                    data={"stream": "stdout", "bytes_emitted": len(recorded), "bytes_dropped": 12345},
                )
            )
        events.append(
            api.OperationEvent(
                id=len(events) + 1, ts="2026-01-01T00:00:00Z", type="completion", data={"status": "SUCCESS"}
            )
        )
        self.logs[op_id] = events

    async def events(
        self, operation_id: str, *, follow: bool = False, spid: int | None = None, since: int | None = None
    ) -> AsyncIterator[api.OperationEvent]:
        while operation_id not in self.logs:  # noqa: ASYNC110 (the test's finisher fills it in)
            await asyncio.sleep(0.01)
        for event in self.logs[operation_id]:
            if since is None or event.id > since:
                yield event


async def test_cloud_output_comes_from_the_event_log_and_says_what_was_lost(tmp_path: Path) -> None:
    backend = CloudBackend()
    reg, state = make_registry(backend, tmp_path)
    recorded = b"".join(b"line %06d\n" % i for i in range(3000))  # 33,000 bytes recorded, more were lost

    async def finisher() -> None:
        while not backend.spawned:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        backend.finish_recorded(next(iter(backend.ops)), recorded, cut=True)

    task = asyncio.create_task(finisher())
    out = await call(reg, "run", {"command": "seq", "image": "busybox:latest"})
    await task
    assert backend.spawned[0].truncate_output_at == api.MAX_TRUNCATE_OUTPUT_AT  # as much as the API keeps
    res = out["structuredContent"]["result"]
    assert res["stdout"].encode() == recorded[:8000] and res["stdout_tail"].encode() == recorded[-8000:]
    assert res["stdout_bytes"] == len(recorded) and res["stdout_truncated"] is True
    assert "Contree API recorded only" in res["hint"] and res["output_quota_exceeded"] is False
    assert result_size(res) <= RESULT_BUDGET

    uri = res["stdout_resource"]
    got = bytearray()
    while True:
        (item,) = await reg.read_resource(f"{uri}?offset={len(got)}&limit=5000", FakeContext())  # type: ignore[arg-type]
        assert item.meta is not None and item.meta["source"] == "events"
        assert item.meta["dropped_bytes"] == 12345 and item.meta["total_bytes"] == len(recorded)
        if not item.text:
            break
        got += item.text.encode()
    assert bytes(got) == recorded
    with pytest.raises(InvalidParams):
        await reg.read_resource(f"{uri}?offset={len(recorded) + 1}", FakeContext())  # type: ignore[arg-type]
    await state.close()


async def test_wait_operations_keeps_many_results_within_the_budget(tmp_path: Path) -> None:
    backend = CloudBackend()
    reg, state = make_registry(backend, tmp_path)
    ids = []
    for i in range(120):
        op_id = backend.add_op("PENDING", metadata={})
        backend.finish_recorded(op_id, b"\x01\x02" * 5000 + b"%d" % i, cut=False)  # escapes weigh 6x
        ids.append(op_id)
    out: Any = (await call(reg, "wait_operations", {"operation_ids": ids, "timeout": 5}))["structuredContent"]
    assert sorted(out["completed"]) == sorted(ids)
    assert result_size(out) <= RESULT_BUDGET
    shown = set(out["results"])
    assert shown and shown < set(ids) and all(i in out["hint"] for i in set(ids) - shown)
    await state.close()
