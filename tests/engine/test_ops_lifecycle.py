"""One operation lifecycle: the transition table refuses illegal moves, `finish` is the one way an
operation ends, and the engine's event payloads are the API's Structs (written and folded back typed)."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from contree import api
from contree.engine.eventlog import EventLog, FoldedProcess, StreamRecorder, fold_process, payload_as
from contree.engine.oplog import (
    ASSIGNED,
    CANCELLED,
    EXECUTING,
    FAILED,
    PENDING,
    SUCCESS,
    TRANSITIONS,
    IllegalTransition,
    OperationLog,
)
from contree.engine.processes import Process, exit_event, network_event, result_from_fold
from contree.engine.runtime.handles import ProcessExit, SandboxExit
from contree.engine.runtime.netns import InterfaceCounters, NetConfigured, NetworkInfo


def test_the_table_allows_only_forward_moves_and_no_move_out_of_an_end() -> None:
    assert TRANSITIONS[PENDING] == {ASSIGNED, EXECUTING, FAILED, CANCELLED}
    assert TRANSITIONS[ASSIGNED] == {EXECUTING, FAILED, CANCELLED}
    assert TRANSITIONS[EXECUTING] == {SUCCESS, FAILED, CANCELLED}
    assert all(not TRANSITIONS[end] for end in api.TERMINAL_STATUSES)


def test_an_illegal_move_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path)
    rec = oplog.create("instance", image_uuid="img", metadata={})
    with pytest.raises(IllegalTransition, match="PENDING -> SUCCESS"):
        oplog.transition(rec, SUCCESS)
    assert rec.status == PENDING and oplog.get(rec.uuid).status == PENDING
    oplog.transition(rec, EXECUTING)
    assert rec.started_at is not None and oplog.get(rec.uuid).status == EXECUTING
    oplog.finish(rec, CANCELLED, error="cancelled")
    with pytest.raises(IllegalTransition, match="CANCELLED -> SUCCESS"):
        oplog.finish(rec, SUCCESS)  # a cancelled run is never recorded as a success afterwards
    got = oplog.get(rec.uuid)
    assert (got.status, got.error) == (CANCELLED, "cancelled")
    oplog.close()


def test_finish_writes_shutdown_then_completion_saves_and_closes_the_log(tmp_path: Path) -> None:
    oplog = OperationLog(tmp_path)
    rec = oplog.create("instance", image_uuid="img", metadata={})
    oplog.transition(rec, ASSIGNED, save=False)
    oplog.transition(rec, EXECUTING, save=False)
    rec.result_image_uuid, rec.image_size = "would-be-result", 10
    log = oplog.open_log(rec.uuid)
    oplog.finish(rec, FAILED, error="boom", reason="timeout")
    assert log.closed and log.append("stdout", api.EventDataStream(value="late", encoding="ascii"), 1) is None
    events = oplog.read_events(rec.uuid)
    assert [e.type for e in events] == ["shutdown", "completion"]
    assert payload_as(events[0], api.EventDataShutdown).reason == "timeout"
    done = payload_as(events[1], api.EventDataCompletion)
    assert (done.status, done.error, done.result_image_uuid) == (FAILED, "boom", None)
    got = oplog.get(rec.uuid)
    assert got.status == FAILED and got.finished_at is not None and got.result_image_uuid is None
    oplog.close()


def _process(tmp_path: Path) -> Process:
    log = EventLog(tmp_path / "events.jsonl")
    recorders = [StreamRecorder(log, 2, name, 100) for name in ("stdout", "stderr", "stdin")]
    return Process(spid=2, handle=None, pid=42, started=time.monotonic(),  # type: ignore[arg-type]
                   stdout=recorders[0], stderr=recorders[1], stdin=recorders[2], stdin_open=False)


def test_exit_payloads_name_an_oom_kill_only_when_there_was_one(tmp_path: Path) -> None:
    proc = _process(tmp_path)
    plain = msgspec.to_builtins(exit_event(proc, SandboxExit(exit_code=3, max_rss_kb=7)))
    assert "oom_killed" not in plain  # an extension: absent, as in the cloud's events
    assert (plain["code"], plain["signal"], plain["resources"]["max_rss_kb"]) == (3, -1, 7)
    killed = exit_event(proc, SandboxExit(exit_code=None, signal=9, oom_killed=True))
    assert msgspec.to_builtins(killed)["oom_killed"] is True
    state = result_from_fold(FoldedProcess(spawned=True, pid=42, exit=killed)).state
    assert state is not None and state.oom_killed and (state.exit_code, state.signal) == (-1, 9)
    execd = msgspec.to_builtins(exit_event(proc, ProcessExit(exit_code=0)))
    assert execd["resources"] == msgspec.to_builtins(api.EventResources())  # exec'd: no rusage


def test_exit_events_fold_back_into_the_result(tmp_path: Path) -> None:
    proc = _process(tmp_path)
    log = proc.stdout.log
    log.append("spawn", api.EventDataSpawn(pid=42, command="true"), 2)
    proc.stdout.feed(b"out")
    log.append("exit", exit_event(proc, ProcessExit(exit_code=5)), 2)
    folded = fold_process(log.events, 2)
    assert folded.spawned and folded.pid == 42 and folded.stdout == b"out"
    assert folded.exit is not None and folded.exit.code == 5
    state = result_from_fold(folded).state
    assert state is not None and state.exit_code == 5 and not state.oom_killed


def test_network_payload_uses_the_api_names(tmp_path: Path) -> None:
    info = NetworkInfo(mode="nat", interfaces=[InterfaceCounters(name="eth0", rx_bytes=5)],
                       configured=NetConfigured(ip4="10.231.0.6/30", gw="10.231.0.5", nameserver="9.9.9.9"))
    data = msgspec.to_builtins(network_event(info))
    assert data["configured"] == {"ip4": "10.231.0.6/30", "ip4_gw": "10.231.0.5", "nameserver": "9.9.9.9"}
    assert data["interfaces"][0]["name"] == "eth0" and data["interfaces"][0]["rx_bytes"] == 5
    assert "error" not in data
    msgspec.convert(data, api.EventDataNetwork)  # what a client decodes
    failed = msgspec.to_builtins(network_event(NetworkInfo(mode="none", error="no network")))
    assert failed["error"] == "no network" and failed["configured"] == {}
