"""The operation log: records, filters, event logs, stream capture, persistence and restart recovery."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import pytest

from contree import api
from contree.engine.eventlog import StreamRecorder, fold_process, mask_env
from contree.engine.operations import OperationQueue
from contree.engine.oplog import (
    EXECUTING,
    FAILED,
    INTERRUPTED,
    SUCCESS,
    OperationLog,
)
from contree.errors import BadRequest, NotFound
from contree.timeparse import parse_instant


def test_records_persist_across_reopen(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path)
    rec = oplog.create("instance", image_uuid="img", metadata={"command": "true"})
    rec.status = SUCCESS
    rec.result_image_uuid = "img2"
    oplog.save(rec)
    oplog.close()
    again = OperationLog(tmp_path)
    got = again.get(rec.uuid)
    assert (got.status, got.result_image_uuid, got.metadata) == (SUCCESS, "img2", {"command": "true"})
    with pytest.raises(NotFound):
        again.get("00000000-0000-0000-0000-000000000000")
    again.close()


def test_query_filters_status_kind_and_paging(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path)
    made = []
    for i in range(5):
        rec = oplog.create("instance" if i % 2 == 0 else "image_import", image_uuid=None, metadata={})
        rec.status = SUCCESS if i < 3 else EXECUTING
        oplog.save(rec)
        made.append(rec.uuid)
    assert [r.uuid for r in oplog.query()] == made[::-1]  # newest first
    assert {r.uuid for r in oplog.query(status="success")} == set(made[:3])
    assert {r.uuid for r in oplog.query(status="running")} == set(made[3:])
    assert {r.uuid for r in oplog.query(kind="image_import")} == {made[1], made[3]}
    assert [r.uuid for r in oplog.query(limit=2, offset=1)] == made[::-1][1:3]
    assert len(oplog.query(since="1h")) == 5
    assert oplog.query(until="1h") == []
    with pytest.raises(BadRequest):
        oplog.query(status="bogus")
    with pytest.raises(BadRequest):
        oplog.query(limit=0)
    oplog.close()


def test_parse_instant_accepts_iso_unix_and_intervals() -> None:
    now = 1_700_000_000.0
    assert parse_instant("600s", now=now) == now - 600
    assert parse_instant("2h", now=now) == now - 7200
    assert parse_instant("1w", now=now) == now - 604800
    assert parse_instant("1700000000", now=now) == now
    assert parse_instant("2023-11-14T22:13:20+00:00") == now
    assert parse_instant("2023-11-14T22:13:20Z") == now
    with pytest.raises(BadRequest):
        parse_instant("yesterday")


def test_mask_env_hides_secret_suffixes() -> None:
    masked = mask_env({"GITHUB_TOKEN": "t", "db_password": "p", "OPENAI_API_KEY": "k", "PATH": "/bin"})
    assert masked == {"GITHUB_TOKEN": "<MASKED>", "db_password": "<MASKED>", "OPENAI_API_KEY": "<MASKED>",
                      "PATH": "/bin"}


async def test_event_ids_increase_and_survive_torn_line(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path)
    rec = oplog.create("instance", image_uuid="img", metadata={})
    log = oplog.open_log(rec.uuid)
    log.append("init", api.EventDataInit(init_pid=1), 0)
    log.append("stdout", api.EventDataStream(value="a", encoding="ascii"), 1)
    oplog.finish_log(rec.uuid)
    path = oplog.log_path(rec.uuid)
    path.write_bytes(path.read_bytes() + b'{"id": 3, "ts": "x", "ty')  # a write torn by a crash
    oplog.close()
    again = OperationLog(tmp_path)
    assert again.recover() == [rec.uuid]
    events = [e async for e in again.events(rec.uuid)]
    assert [e.type for e in events] == ["init", "stdout", "completion"]
    assert [e.id for e in events] == [1, 2, 3]
    assert events[-1].spid is None
    assert events[-1].data["status"] == FAILED
    got = again.get(rec.uuid)
    assert (got.status, got.error) == (FAILED, INTERRUPTED)
    again.close()


async def test_stream_recorder_caps_and_reports_truncation(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path)
    rec = oplog.create("instance", image_uuid="img", metadata={})
    log = oplog.open_log(rec.uuid)
    out = StreamRecorder(log, 1, "stdout", truncate_at=10)
    err = StreamRecorder(log, 1, "stderr", truncate_at=100)
    out.feed(b"hello ")
    out.feed(b"world, and more")
    err.feed(b"\x00\xffbin")
    out.close()
    err.close()
    events = oplog.read_events(rec.uuid)
    trunc = [e for e in events if e.type == "truncated"]
    assert len(trunc) == 1 and trunc[0].data == {"stream": "stdout", "bytes_emitted": 10, "bytes_dropped": 11}
    binary = next(e for e in events if e.type == "stderr")
    assert binary.data["encoding"] == "base64"
    assert base64.b64decode(binary.data["value"]) == b"\x00\xffbin"
    folded = fold_process(events, 1)
    assert folded.stdout == b"hello worl" and folded.stdout_truncated
    assert folded.stderr == b"\x00\xffbin" and not folded.stderr_truncated
    oplog.close()


async def test_output_spill_keeps_every_byte_beyond_the_event_cap(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path)
    rec = oplog.create("instance", image_uuid="img", metadata={})
    log = oplog.open_log(rec.uuid)
    out = StreamRecorder(log, 1, "stdout", truncate_at=10)
    chunks = [bytes([i]) * 70000 for i in range(30)]  # 2.1 MB, far beyond the events' 10 bytes
    for chunk in chunks:
        out.feed(chunk)
    out.close()
    whole = b"".join(chunks)
    live = oplog.read_output(rec.uuid, "stdout", offset=69995, limit=10)
    assert (live.data, live.total, live.complete, live.dropped) == (whole[69995:70005], len(whole), False, 0)
    rec.status = SUCCESS
    oplog.save(rec)
    oplog.finish_log(rec.uuid)
    pages = []
    offset = 0
    while True:
        page = oplog.read_output(rec.uuid, "stdout", offset=offset, limit=1 << 20)
        if not page.data:
            break
        pages.append(page.data)
        offset += len(page.data)
    assert b"".join(pages) == whole and page.complete and page.total == len(whole)
    tail = oplog.read_output(rec.uuid, "stdout", limit=5, tail=True)
    assert (tail.offset, tail.data) == (len(whole) - 5, whole[-5:])
    empty = oplog.read_output(rec.uuid, "stderr")
    assert (empty.data, empty.total) == (b"", 0)
    assert fold_process(oplog.read_events(rec.uuid), 1).stdout == whole[:10]  # the API's record: capped
    with pytest.raises(BadRequest):
        oplog.read_output(rec.uuid, "stdout", offset=len(whole) + 1)
    with pytest.raises(BadRequest):
        oplog.read_output(rec.uuid, "stdin")
    with pytest.raises(NotFound):
        oplog.read_output(rec.uuid, "stdout", spid=7)
    oplog.close()


async def test_output_quota_keeps_the_first_bytes_of_a_run_and_counts_the_rest(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path, output_quota=1000)
    rec = oplog.create("instance", image_uuid="img", metadata={})
    log = oplog.open_log(rec.uuid)
    out = StreamRecorder(log, 1, "stdout", truncate_at=100)
    err = StreamRecorder(log, 1, "stderr", truncate_at=100)
    out.feed(b"o" * 600)
    err.feed(b"e" * 600)  # the quota is shared by the run's streams: 400 of these fit
    out.feed(b"o" * 50)
    rec.status = SUCCESS
    oplog.save(rec)
    oplog.finish_log(rec.uuid)
    oplog.close()
    again = OperationLog(tmp_path, output_quota=1000)  # what the quota refused survives a restart
    o = again.read_output(rec.uuid, "stdout")
    e = again.read_output(rec.uuid, "stderr")
    assert (o.data, o.dropped, o.quota) == (b"o" * 600, 50, 1000)
    assert (e.data, e.dropped) == (b"e" * 400, 200)
    again.close()


async def test_output_of_a_run_cut_short_by_an_engine_crash_stays_readable(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path)
    rec = oplog.create("instance", image_uuid="img", metadata={})
    rec.status = EXECUTING
    oplog.save(rec)  # saved before the run opened its log and spill, as the engine does
    log = oplog.open_log(rec.uuid)
    out = StreamRecorder(log, 1, "stdout", truncate_at=3)
    out.feed(b"written before the crash\n")
    log.close_file()  # the process dies: nothing else is saved
    oplog._db.close()
    again = OperationLog(tmp_path)
    assert again.recover() == [rec.uuid]
    page = again.read_output(rec.uuid, "stdout")
    assert (page.data, page.complete, page.quota) == (b"written before the crash\n", True, again.output_quota)
    again.close()


async def test_runs_from_before_output_spills_are_read_from_their_event_log(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path)
    rec = oplog.create("instance", image_uuid="img", metadata={})
    log = oplog.open_log(rec.uuid)
    out = StreamRecorder(log, 1, "stdout", truncate_at=4)
    out.feed(b"abcdefgh")
    out.close()
    rec.status = SUCCESS
    oplog.save(rec)
    oplog.finish_log(rec.uuid)
    import shutil

    shutil.rmtree(tmp_path / "output")  # an older engine (or a prune) left no spill
    page = oplog.read_output(rec.uuid, "stdout")
    assert (page.data, page.total, page.dropped, page.quota) == (b"abcd", 4, 4, None)
    oplog.close()


async def test_log_wide_size_cap_drops_streams_keeps_service_events(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path, size_cap=2000)
    rec = oplog.create("instance", image_uuid="img", metadata={})
    log = oplog.open_log(rec.uuid)
    rec_out = StreamRecorder(log, 1, "stdout", truncate_at=1 << 20)
    for _ in range(50):
        rec_out.feed(b"x" * 100)
    log.append("exit", api.EventDataExit(pid=5, code=0, signal=-1, timed_out=False, duration_ms=1), 1)
    types = [e.type for e in oplog.read_events(rec.uuid)]
    assert types.count("size_cap") == 1
    assert types[-1] == "exit"
    assert types.index("size_cap") < len(types) - 1
    oplog.close()


async def test_follow_gets_live_events_until_completion(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path)
    rec = oplog.create("instance", image_uuid="img", metadata={})

    async def consume() -> list[str]:
        return [e.type async for e in oplog.events(rec.uuid, follow=True)]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)  # the follower is waiting for a log that does not exist yet
    log = oplog.open_log(rec.uuid)
    log.append("init", api.EventDataInit(), 0)
    await asyncio.sleep(0.01)
    log.append("stdout", api.EventDataStream(value="x", encoding="ascii"), 1)
    log.append("completion", api.EventDataCompletion(status=SUCCESS, duration_ms=0), None)
    assert await asyncio.wait_for(task, 5) == ["init", "stdout", "completion"]
    since = [e.id async for e in oplog.events(rec.uuid, since=1)]
    assert since == [2, 3]
    only = [e.type async for e in oplog.events(rec.uuid, spid=1)]
    assert only == ["stdout"]
    oplog.close()


async def test_queue_limits_concurrency_and_cancels_pending() -> None:
    queue = OperationQueue({"instance": 2, "image_import": 1})
    running = 0
    peak = 0
    dropped: list[str] = []

    async def runner(job: object) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    for i in range(6):
        queue.submit(f"op{i}", "instance", runner, lambda job: dropped.append(job.op_uuid))
    await asyncio.sleep(0)
    assert queue.cancel("op5")
    assert not queue.cancel("nope")
    started = time.monotonic()
    await queue.drain()
    assert peak == 2
    assert dropped == ["op5"]
    assert time.monotonic() - started < 5
    await queue.close()
