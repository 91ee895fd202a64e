"""Issue 17 item 4: `serve-api` refuses what a web page can make a browser send to 127.0.0.1.

Raw HTTP, so the Host, Origin and Content-Type headers are exactly what a browser (or a DNS-rebound page)
would send, and a listener never runs without a token unless --insecure-no-token is given on loopback."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contree.rest.guard import RequestGuard
from contree.rest.serve import main, serve
from tests.fake_backend import FakeBackend

SPAWN = json.dumps({"command": "touch /pwned", "image": "tag:busybox:latest"}).encode()


def raw(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, bytes]:
    """One request with exactly these headers (no Host unless given)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def ask(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, bytes]:
    return await asyncio.to_thread(raw, port, method, path, headers, body)


@pytest.fixture
async def no_token_server(capsys: pytest.CaptureFixture[str]) -> AsyncIterator[tuple[int, FakeBackend]]:
    """`serve()` on 127.0.0.1 with --insecure-no-token (the weakest configuration allowed)."""
    fake = FakeBackend()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(fake, "127.0.0.1", 0, token=None, stop=stop, insecure_no_token=True))
    try:
        out = ""
        for _ in range(200):
            out += capsys.readouterr().out
            if out:
                break
            await asyncio.sleep(0.02)
        port = int(out.split()[-1].rsplit(":", 1)[1].split("/")[0])
        yield port, fake
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_a_rebound_host_name_is_refused(no_token_server: tuple[int, FakeBackend]) -> None:
    port, _ = no_token_server
    status, body = await ask(port, "GET", "/v1/whoami", {"Host": "evil.example"})
    assert status == 403 and b"Host" in body
    status, _ = await ask(port, "GET", "/v1/whoami", {"Host": f"evil.example:{port}"})
    assert status == 403
    assert (await ask(port, "GET", "/v1/whoami", {"Host": f"127.0.0.1:{port}"}))[0] == 200
    assert (await ask(port, "GET", "/v1/whoami", {"Host": f"localhost:{port}"}))[0] == 200
    assert (await ask(port, "GET", "/v1/whoami", {}))[0] in (400, 403)  # HTTP/1.1 without Host


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
        {"Origin": "http://evil.example", "Content-Type": "application/json"},
        {"Origin": "null", "Content-Type": "text/plain"},
        {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
        {"Content-Type": "text/plain;charset=UTF-8"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=x"},
        {},
    ],
    ids=[
        "origin-text",
        "origin-json",
        "null-origin",
        "sec-fetch-cross-site",
        "text",
        "form",
        "multipart",
        "no-type",
    ],
)
async def test_a_cross_origin_or_simple_post_starts_nothing(
    no_token_server: tuple[int, FakeBackend], headers: dict[str, str]
) -> None:
    port, fake = no_token_server
    status, body = await ask(port, "POST", "/v1/instances", {"Host": f"127.0.0.1:{port}", **headers}, SPAWN)
    assert status in (403, 415), body
    assert json.loads(body)["status"] == status
    assert len(fake.spawned) == 0


async def test_same_origin_and_loopback_pages_and_plain_clients_are_served(
    no_token_server: tuple[int, FakeBackend],
) -> None:
    port, _ = no_token_server
    host = f"127.0.0.1:{port}"
    for origin in (None, f"http://{host}", "http://localhost:3000"):
        headers = {"Host": host} | ({"Origin": origin} if origin else {})
        assert (await ask(port, "GET", "/v1/whoami", headers))[0] == 200
    status, _ = await ask(
        port, "POST", "/v1/files", {"Host": host, "Content-Type": "application/octet-stream"}, b"x"
    )
    assert status == 201


def test_allowed_hosts_and_origins_extend_the_loopback_defaults() -> None:
    guard = RequestGuard("127.0.0.1", ["api.internal"], ["https://ui.internal"])
    assert guard.host_allowed("api.internal:9453") and guard.host_allowed("[::1]:1")
    assert not guard.host_allowed("evil.example")
    assert guard.origin_allowed("https://ui.internal/", "api.internal")
    assert not guard.origin_allowed("https://evil.example", "api.internal")
    wildcard = RequestGuard("0.0.0.0")
    assert wildcard.host_allowed("anything.example")  # beyond loopback the token guards it
    specific = RequestGuard("10.1.2.3")
    assert specific.host_allowed("10.1.2.3:9453") and not specific.host_allowed("evil.example")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "127.0.0.1:0"], "without a token"),
        (["--listen", "0.0.0.0:0", "--insecure-no-token"], "for loopback only"),
        (["--listen", "127.0.0.1:0", "--insecure-no-token", "--token", "t"], "contradict"),
    ],
)
def test_every_listener_needs_a_token_unless_told_otherwise_on_loopback(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONTREE_SERVE_TOKEN", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


async def test_serve_itself_refuses_a_tokenless_listener() -> None:
    with pytest.raises(ValueError, match="without a token"):
        await serve(FakeBackend(), "127.0.0.1", 0, token=None, stop=asyncio.Event())


@pytest.mark.slow
def test_serve_api_without_a_token_obeys_no_web_page(tmp_path: Path) -> None:
    """The reproduction on the real command and engine: nothing a page sends reaches the engine."""
    from tests.contract.conftest import require_engine_host
    from tests.service_util import stop_service

    require_engine_host()
    code = "import sys; from contree.rest import main; raise SystemExit(main(sys.argv[1:]))"
    argv = ["--listen", "127.0.0.1:0", "--home", str(tmp_path / "home"), "--insecure-no-token"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Contree API listening on http://127.0.0.1:"), (
            proc.stderr and proc.stderr.read()
        )
        port = int(line.split()[-1].rsplit(":", 1)[1].split("/")[0])
        host = {"Host": f"127.0.0.1:{port}"}
        assert raw(port, "GET", "/v1/images", {"Host": "evil.example"})[0] == 403
        page = {**host, "Origin": "http://evil.example", "Content-Type": "text/plain"}
        assert raw(port, "POST", "/v1/instances", page, SPAWN)[0] == 403
        assert raw(port, "POST", "/v1/instances", {**host, "Content-Type": "text/plain"}, SPAWN)[0] == 415
        status, body = raw(port, "GET", "/v1/operations", host)
        operations: Any = json.loads(body)
        assert status == 200 and operations == []  # nothing was started
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop_service(tmp_path / "home")  # serve-api started the home's engine service
