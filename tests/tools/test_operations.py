"""wait_operations, cancel_operation, get_operation and list_operations rules (COMPAT §13, §15.16-26)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.tools.fakes import FakeBackend, FakeContext, call, make_registry


async def test_wait_empty_list_returns_empty_result(tmp_path: Path) -> None:
    reg, _ = make_registry(FakeBackend(), tmp_path)
    out = await call(reg, "wait_operations", {"operation_ids": []})
    assert not out.get("isError")
    assert out["structuredContent"] == {
        "results": {},
        "completed": [],
        "cancelled": [],
        "timed_out": False,
        "pending": [],
        "errors": {},
        "hint": None,
    }


async def test_wait_deadline_reports_pending_and_never_cancels(tmp_path: Path) -> None:
    backend = FakeBackend()
    running = backend.add_op("EXECUTING")
    done = backend.add_op("SUCCESS")
    reg, _ = make_registry(backend, tmp_path)
    out = (await call(reg, "wait_operations", {"operation_ids": [running, done, running], "timeout": 0.3}))[
        "structuredContent"
    ]
    assert out["timed_out"] is True
    assert out["pending"] == [running]
    assert out["completed"] == [done]
    assert out["cancelled"] == []
    assert backend.cancelled == []
    assert backend.ops[running].status == "EXECUTING"


async def test_wait_any_ignores_unknown_ids_and_waits_for_terminal(tmp_path: Path) -> None:
    backend = FakeBackend()
    running = backend.add_op("EXECUTING")
    reg, _ = make_registry(backend, tmp_path)
    unknown = "00000000-0000-0000-0000-000000000000"

    async def finish_later() -> None:
        await asyncio.sleep(0.4)
        backend.finish(running, stdout="ok\n")

    task = asyncio.create_task(finish_later())
    ctx = FakeContext()
    out = (
        await call(
            reg, "wait_operations", {"operation_ids": [unknown, running], "mode": "any", "timeout": 10}, ctx
        )
    )["structuredContent"]
    await task
    assert out["completed"] == [running]
    assert unknown in out["errors"] and unknown not in out["results"]
    assert out["results"][running]["kind"] == "instance"
    assert out["results"][running]["stdout"] == "ok\n"
    assert out["timed_out"] is False
    assert ctx.progress_calls, "progress notifications while waiting"


async def test_wait_cancel_pending_only_when_asked(tmp_path: Path) -> None:
    backend = FakeBackend()
    a = backend.add_op("EXECUTING")
    b = backend.add_op("SUCCESS")
    reg, _ = make_registry(backend, tmp_path)
    out = (
        await call(reg, "wait_operations", {"operation_ids": [a, b], "mode": "any", "cancel_pending": True})
    )["structuredContent"]
    assert out["completed"] == [b]
    assert out["cancelled"] == [a]
    assert backend.cancelled == [a]


async def test_cancel_finished_operation_reports_real_status(tmp_path: Path) -> None:
    backend = FakeBackend()
    done = backend.add_op("SUCCESS")
    running = backend.add_op("EXECUTING")
    reg, _ = make_registry(backend, tmp_path)
    out = (await call(reg, "cancel_operation", {"operation_id": done}))["structuredContent"]
    assert out == {"cancelled": False, "operation_id": done, "status": "SUCCESS"}
    out = (await call(reg, "cancel_operation", {"operation_id": running}))["structuredContent"]
    assert out == {"cancelled": True, "operation_id": running, "status": "CANCELLED"}


async def test_get_operation_is_never_stale(tmp_path: Path) -> None:
    backend = FakeBackend()
    op = backend.add_op("EXECUTING")
    reg, _ = make_registry(backend, tmp_path)
    first = (await call(reg, "get_operation", {"operation_id": op}))["structuredContent"]
    backend.finish(op, stdout="x")
    second = (await call(reg, "get_operation", {"operation_id": op}))["structuredContent"]
    assert (first["status"], second["status"]) == ("EXECUTING", "SUCCESS")


async def test_list_operations_accepts_lowercase_aliases_and_kind(tmp_path: Path) -> None:
    backend = FakeBackend()
    running = backend.add_op("EXECUTING")
    backend.add_op("SUCCESS", "image_import")
    reg, _ = make_registry(backend, tmp_path)
    out = (await call(reg, "list_operations", {"status": "running"}))["structuredContent"]
    assert [o["uuid"] for o in out["operations"]] == [running]
    out = (await call(reg, "list_operations", {"kind": "image_import", "offset": 0, "until": "1h"}))[
        "structuredContent"
    ]
    assert [o["kind"] for o in out["operations"]] == ["image_import"]
    bad = await call(reg, "list_operations", {"status": "bogus"})
    assert bad["isError"] and bad["content"][0]["text"].startswith("Error executing tool list_operations: ")


async def test_run_wait_false_returns_operation_id_wrapped(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    out = await call(reg, "run", {"command": "true", "image": "busybox:latest", "wait": False})
    await state.close()
    op_id = out["structuredContent"]["result"]["operation_id"]
    assert out["content"][0]["text"] == '{\n  "operation_id": "' + op_id + '"\n}'
    sent = backend.spawned[0]
    assert sent.image == backend.busybox  # bare tag resolved to a UUID
    assert sent.shell is True and sent.disposable is True and sent.timeout == 30


async def test_run_result_never_echoes_env_and_reports_truncation(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, _ = make_registry(backend, tmp_path)

    async def finisher() -> None:
        while not backend.spawned:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        op_id = next(iter(o for o in backend.ops))
        backend.finish(op_id, stdout="y" * 50, result_image=None)

    task = asyncio.create_task(finisher())
    out = await call(
        reg,
        "run",
        {
            "command": "yes",
            "image": "busybox:latest",
            "env": {"API_KEY": "s3cr3t-value"},
            "truncate_output_at": 10,
        },
    )
    await task
    assert "s3cr3t-value" not in str(out)
    result = out["structuredContent"]["result"]
    assert result["stdout"] == "y" * 10 and result["stdout_truncated"] is True
    assert result["stdout_resource"].endswith("/stdout")
    assert backend.spawned[0].env == {"API_KEY": "s3cr3t-value"}


async def test_run_wait_survives_an_event_log_that_is_gone(tmp_path: Path) -> None:
    """A CANCELLED operation's event log may 404; the wait reads the real status instead of failing."""
    from contree.errors import NotFound

    backend = FakeBackend()

    async def no_log(operation_id: str, **kwargs: object) -> Any:
        backend.ops[operation_id].status = "CANCELLED"
        raise NotFound("event log dropped")
        yield  # pragma: no cover

    backend.events = no_log  # type: ignore[method-assign]
    reg, _ = make_registry(backend, tmp_path)
    out = await call(reg, "run", {"command": "sleep 9", "image": "busybox:latest"})
    assert not out.get("isError") and out["structuredContent"]["result"]["status"] == "CANCELLED"


async def test_run_on_the_embedded_engine_sends_a_tag_for_the_engine_to_resolve(tmp_path: Path) -> None:
    """Unscoped, on the local backend, a tag goes in the spawn request as `tag:<tag>` (one request fewer);
    a UUID goes as it is; a missing tag fails the same way as when the tools resolve it. A scoped server
    resolves in the tools (a principal's own tags live there), and so does one on the Contree API."""
    errors = []
    for kind, scoped in (("local", False), ("contree", False), ("local", True)):
        backend = FakeBackend()
        home = tmp_path / f"{kind}-{scoped}"
        reg, state = make_registry(backend, home, kind=kind, scoped_operations=scoped)
        for image in ("busybox:latest", "tag:busybox:latest", backend.busybox.upper()):
            out = await call(reg, "run", {"command": "true", "image": image, "wait": False})
            assert not out.get("isError"), out
        sent = [r.image for r in backend.spawned]
        if kind == "local" and not scoped:
            assert sent == ["tag:busybox:latest", "tag:busybox:latest", backend.busybox]
        else:
            assert sent == [backend.busybox] * 3
        missing = await call(reg, "run", {"command": "true", "image": "no-such:tag", "wait": False})
        assert missing["isError"]
        errors.append(missing["content"][0]["text"])
        await state.close()
    assert errors[0] == errors[1] and "no-such:tag" in errors[0], errors
