"""`contree-mcp serve-api`: argument handling, the loopback rule, and serving a Backend on a real port."""

from __future__ import annotations

import asyncio

import pytest

from contree.client import RemoteBackend
from contree.errors import Unauthorized
from contree.rest.serve import is_loopback, main, parse_listen, serve
from tests.rest.fake_backend import FakeBackend


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
