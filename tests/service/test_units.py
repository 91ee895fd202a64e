"""The engine service's pure parts: version rules, durations, idle tracking, socket addresses, and the
error answer a stdio client gets when the engine cannot start."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import msgspec
import pytest

from contree.service.cli import parse_duration
from contree.service.control import skew, version_key
from contree.service.idle import IdleClock
from contree.service.paths import SUN_PATH_MAX, SocketAddress
from tools.engine_error import answer_with_error


def test_versions_order_by_release_and_unordered_builds_count_as_older() -> None:
    assert version_key("0.6.0") == (0, 6, 0)
    assert version_key("0.0.0+source") == (0, 0, 0)
    assert version_key("1.0rc1") is None
    assert skew("0.6.0", "0.6.0") == "same"
    assert skew("0.5.9", "0.6.0") == "older"
    assert skew("0.7.0", "0.6.0") == "newer"
    # two builds of one release, or a version without an order: the finder replaces the service
    assert skew("0.6.0+a", "0.6.0+b") == "older"
    assert skew("dev", "0.6.0") == "older"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("600", 600.0), ("30s", 30.0), ("10m", 600.0), ("2h", 7200.0), ("1d", 86400.0), ("1.5m", 90.0),
     ("never", None), ("0", None)],
)
def test_idle_exit_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "10x", ""])
def test_bad_durations_are_refused(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_idle_clock_counts_only_uninterrupted_idleness() -> None:
    now = [0.0]
    busy: list[str] = []
    clock = IdleClock([lambda: busy[0] if busy else None], 10.0, clock=lambda: now[0])
    now[0] = 9.0
    assert clock.check() == [] and not clock.expired()
    busy.append("1 clients attached")
    now[0] = 20.0
    assert clock.check() == ["1 clients attached"] and clock.idle_for is None and not clock.expired()
    busy.clear()
    clock.check()
    now[0] = 29.0
    assert not clock.expired()  # idle again only since 20
    now[0] = 30.0
    assert clock.expired() and clock.idle_for == 10.0


def test_idle_clock_without_limit_never_expires() -> None:
    now = [0.0]
    clock = IdleClock([], None, clock=lambda: now[0])
    now[0] = 1e9
    clock.check()
    assert not clock.expired()


def test_a_home_too_long_for_sockaddr_un_is_reached_through_its_descriptor(tmp_path: Path) -> None:
    home = tmp_path / ("h" * 60) / ("o" * 60)
    home.mkdir(parents=True)
    with SocketAddress(home) as address:
        assert len(str(address.real)) > SUN_PATH_MAX
        assert address.path.startswith("/proc/self/fd/")
        server = socket.socket(socket.AF_UNIX)
        server.bind(address.path)
        server.listen()
        client = socket.socket(socket.AF_UNIX)
        client.connect(address.path)
        client.close()
        server.close()
    assert (home / "engine.sock").is_socket()
    with SocketAddress(tmp_path) as short:
        assert short.path == str(tmp_path / "engine.sock")


def test_a_stdio_client_gets_the_start_error_for_every_request() -> None:
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        [{"jsonrpc": "2.0", "id": "b", "method": "ping"}],
    ]
    stdin = io.BytesIO(b"".join(msgspec.json.encode(m) + b"\n" for m in lines) + b"not json\n")
    stdout = io.BytesIO()
    answer_with_error("the engine at /h could not start: boom; log: /h/engine.log", stdin, stdout)
    replies = [msgspec.json.decode(line) for line in stdout.getvalue().splitlines()]
    assert [r["id"] for r in replies] == [1, "b"]
    assert all(r["error"]["code"] == -32603 for r in replies)
    assert replies[0]["error"]["message"] == "the engine at /h could not start: boom; log: /h/engine.log"


def test_engine_settings_are_handed_on_as_the_same_flags() -> None:
    """What an MCP server was given for the engine reaches a service it starts unchanged."""
    import argparse

    from contree.engine.runtime.limits import ResourceSettings, add_arguments, settings_from
    from contree.service.cli import engine_arguments

    settings = ResourceSettings(memory_bytes=64 << 20, max_memory_bytes=1 << 30, cpus=0.5, pids=100)
    argv = engine_arguments(512 << 20, settings)
    assert argv[:2] == ["--output-quota", str(512 << 20)]
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-quota", type=int)
    add_arguments(parser)
    parsed = parser.parse_args(argv)
    assert parsed.output_quota == 512 << 20
    assert settings_from(parsed) == settings
    assert engine_arguments(None, ResourceSettings()) == []
