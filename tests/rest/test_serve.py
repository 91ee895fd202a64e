"""`contree-mcp serve-api`: argument handling, the loopback rule, and serving a Backend on a real port."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from contree.client import RemoteBackend
from contree.errors import Unauthorized
from contree.rest.serve import is_loopback, main, parse_listen, serve
from tests.fake_backend import FakeBackend


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9453") == ("127.0.0.1", 9453)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen(":0") == ("127.0.0.1", 0)
    for bad in ("127.0.0.1", "host:port", "h:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.9.9.9") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")


def test_refuses_non_loopback_without_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONTREE_SERVE_TOKEN", raising=False)
    assert main(["--listen", "0.0.0.0:9453"]) == 2
    assert "without a token" in capsys.readouterr().err
    assert main(["--listen", "nonsense"]) == 2


async def test_serve_binds_loopback_and_requires_the_token(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeBackend()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(fake, "127.0.0.1", 0, token="tok", stop=stop))
    try:
        for _ in range(100):
            out = capsys.readouterr().out
            if out:
                break
            await asyncio.sleep(0.02)
        assert out.startswith("Contree API listening on http://127.0.0.1:")
        url = out.split()[-1]
        good = RemoteBackend(url, token="tok")
        bad = RemoteBackend(url, token="wrong")
        try:
            assert (await good.whoami()).permissions["spawn"] is True
            with pytest.raises(Unauthorized):
                await bad.whoami()
        finally:
            await good.close()
            await bad.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


@pytest.mark.slow
def test_serve_api_command_on_the_embedded_engine(tmp_path: Path) -> None:
    """The real command: it starts the temp home's engine service and serves it on a loopback port with a
    token; SIGTERM stops the API cleanly and leaves the service to other clients."""
    from contree.service.control import probe
    from tests.contract.conftest import require_engine_host
    from tests.service_util import stop_service

    require_engine_host()
    code = "import sys; from contree.rest import main; raise SystemExit(main(sys.argv[1:]))"
    args = ["--listen", "127.0.0.1:0", "--home", str(tmp_path / "home"), "--token", "cli-token"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the socket is bound
        assert line.startswith("Contree API listening on http://127.0.0.1:"), (
            proc.stderr and proc.stderr.read()
        )
        url = line.split()[-1]
        request = urllib.request.Request(f"{url}/whoami", headers={"Authorization": "Bearer cli-token"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["permissions"]["spawn"] is True
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{url}/whoami", timeout=10)
        assert info.value.code == 401
        _assert_local_import_refused(url)
        status = probe(tmp_path / "home")
        assert status is not None and [c.name for c in status.clients] == ["serve-api"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert probe(tmp_path / "home") is not None  # the engine service stays for other clients
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop_service(tmp_path / "home")


def _assert_local_import_refused(url: str) -> None:
    """Without --import-root, an API client cannot make the engine read host files as an archive."""
    headers = {"Authorization": "Bearer cli-token", "Content-Type": "application/json"}
    body = json.dumps({"registry": {"url": "oci-archive:/etc/passwd"}}).encode()
    request = urllib.request.Request(f"{url}/images/import", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        operation_id = json.loads(response.read())["uuid"]
    deadline = time.monotonic() + 30
    while True:
        poll = urllib.request.Request(f"{url}/operations/{operation_id}", headers=headers)
        with urllib.request.urlopen(poll, timeout=10) as response:
            operation = json.loads(response.read())
        if operation["status"] in ("SUCCESS", "FAILED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert operation["status"] == "FAILED", operation
    assert "outside the directories allowed" in operation["error"]
