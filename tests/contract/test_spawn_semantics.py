"""Backend contract: every InstanceSpawnRequest field behaves as CONTREE-API §8 says."""

from __future__ import annotations

import base64

import pytest

from contree import api
from contree.backend import Backend
from contree.errors import BadRequest, NotFound

from .conftest import result_of, run, stderr_of, stdout_of

pytestmark = pytest.mark.engine


async def test_shell_true_inherits_image_env_and_env_wins(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, 'echo "$IMAGE_VAR $MINE"', env={"MINE": "mine"}, disposable=True)
    assert stdout_of(resp) == "from-image mine\n"
    removed = await run(backend, busybox, 'echo "[$IMAGE_VAR]"', env={"IMAGE_VAR": None}, disposable=True)
    assert stdout_of(removed) == "[]\n"


async def test_shell_false_gets_only_request_env_and_args(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "env", shell=False, env={"ONLY": "1"}, disposable=True)
    lines = set(stdout_of(resp).split())
    assert "ONLY=1" in lines
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in lines
    assert not any(line.startswith("IMAGE_VAR=") for line in lines)
    echo = await run(backend, busybox, "echo", shell=False, args=["a b", "c"], disposable=True)
    assert stdout_of(echo) == "a b c\n"


async def test_cwd_is_created_and_preserve_cwd(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "pwd; cd /; touch /x", cwd="/work/deep", preserve_cwd=True)
    assert stdout_of(resp) == "/work/deep\n"
    assert resp.result_image_uuid
    again = await run(backend, resp.result_image_uuid, "pwd", disposable=True)
    assert stdout_of(again) == "/work/deep\n"
    default = await run(backend, busybox, "pwd", disposable=True)
    assert stdout_of(default) == "/\n"


async def test_preserve_env_written_into_result_image(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "true", env={"TOOL_HOME": "/opt/tool", "IMAGE_VAR": ""},
                     preserve_env=True)
    assert resp.result_image_uuid and resp.result_image_uuid != busybox
    again = await run(backend, resp.result_image_uuid, 'echo "$TOOL_HOME [$IMAGE_VAR]"', disposable=True)
    assert stdout_of(again) == "/opt/tool []\n"


async def test_uid_gid_and_hostname(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "id -u; id -g; hostname", uid=1000, gid=1001, hostname="box1",
                     disposable=True)
    assert stdout_of(resp) == "1000\n1001\nbox1\n"
    default = await run(backend, busybox, "hostname", disposable=True)
    assert stdout_of(default) == "linuxkit\n"


async def test_stdin_ascii_and_base64(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "cat", stdin=api.ClosableStreamRepr(value="hello\n"), disposable=True)
    assert stdout_of(resp) == "hello\n"
    raw = bytes(range(256))
    b64 = base64.b64encode(raw).decode()
    binary = await run(backend, busybox, "cat", stdin=api.ClosableStreamRepr(value=b64, encoding="base64"),
                       disposable=True)
    out = result_of(binary).stdout
    assert out is not None and out.encoding == "base64"
    assert api.decode_stream(out) == raw


async def test_unread_stdin_does_not_stall_the_timeout(backend: Backend, busybox: str) -> None:
    big = base64.b64encode(b"x" * 300_000).decode()
    resp = await run(backend, busybox, "sleep 30", timeout=1, disposable=True,
                     stdin=api.ClosableStreamRepr(value=big, encoding="base64"))
    state = result_of(resp).state
    assert state is not None and state.timed_out
    assert resp.duration is not None and resp.duration < 10


async def test_timeout_kills_and_marks(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "echo started; sleep 30", timeout=1, disposable=True)
    assert resp.status == "SUCCESS"
    state = result_of(resp).state
    assert state is not None and state.timed_out and state.exit_code == -1 and state.signal == 9
    assert stdout_of(resp) == "started\n"
    assert resp.duration is not None and resp.duration < 10
    shutdown = [e async for e in backend.events(resp.uuid) if e.type == "shutdown"]
    assert shutdown[0].data["reason"] == "timeout"


async def test_truncate_output_at(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "head -c 5000 /dev/zero | tr '\\0' a; echo err >&2",
                     truncate_output_at=100, disposable=True)
    out = result_of(resp).stdout
    assert out is not None and out.truncated and out.value == "a" * 100
    assert stderr_of(resp) == "err\n"
    trunc = [e async for e in backend.events(resp.uuid) if e.type == "truncated"]
    assert [e.data for e in trunc] == [{"stream": "stdout", "bytes_emitted": 100, "bytes_dropped": 4900}]


async def test_networking_disabled_has_only_loopback(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "ls /sys/class/net", networking=api.InstanceNetworking(enabled=False),
                     disposable=True)
    assert stdout_of(resp).split() == ["lo"]
    assert not [e async for e in backend.events(resp.uuid) if e.type == "network"]


async def test_max_layer_bytes_fails_the_run(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "head -c 100000 /dev/zero > /big",
                     resources_limits=api.InstanceResourcesLimits(max_layer_bytes=1000))
    assert resp.status == "FAILED"
    assert resp.result_image_uuid is None
    assert "max_layer_bytes" in (resp.error or "")


async def test_max_layer_bytes_stops_a_runaway_writer(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "while true; do head -c 100000 /dev/zero >> /grow; done",
                     resources_limits=api.InstanceResourcesLimits(max_layer_bytes=1_000_000), timeout=30)
    assert resp.status == "FAILED"
    assert "max_layer_bytes" in (resp.error or "")
    assert resp.duration is not None and resp.duration < 20


async def test_spawn_failure_is_failed_with_reason(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "true", cwd="/etc/passwd")
    assert resp.status == "FAILED"
    assert resp.error and "cwd" in resp.error
    assert resp.result_image_uuid is None
    events = [e async for e in backend.events(resp.uuid)]
    assert [e.type for e in events][-2:] == ["shutdown", "completion"]
    assert events[-2].data["reason"] == "spawn_failed"
    assert any(e.type == "stderr" and e.spid == 0 for e in events)


async def test_missing_executable_is_failed_with_clear_error(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "/no/such/binary", shell=False, disposable=True)
    assert resp.status == "FAILED"
    assert resp.error and "/no/such/binary" in resp.error and "not found" in resp.error
    bad_shell = await run(backend, busybox, "true", env={"SHELL": "/bin/bash"}, disposable=True)
    assert bad_shell.status == "FAILED" and "/bin/bash" in (bad_shell.error or "")
    relative = await run(backend, busybox, "ls", shell=False, args=["/"], disposable=True)
    assert relative.status == "SUCCESS" and "bin" in stdout_of(relative).split()


async def test_unknown_image_is_404(backend: Backend) -> None:
    with pytest.raises(NotFound):
        missing = "00000000-0000-4000-8000-000000000000"
        await backend.spawn(api.InstanceSpawnRequest(command="true", image=missing))
    with pytest.raises(NotFound):
        await backend.spawn(api.InstanceSpawnRequest(command="true", image="tag:no/such:tag"))


@pytest.mark.parametrize(
    "fields",
    [
        {"image": "not a uuid"},
        {"cwd": "relative/dir"},
        {"truncate_output_at": api.MAX_TRUNCATE_OUTPUT_AT + 1},
        {"timeout": 0},
        {"uid": 65536},  # beyond the sandbox's user-namespace range: refused up front, not FAILED later
        {"gid": 70000},
    ],
)
async def test_bad_request_is_400(backend: Backend, busybox: str, fields: dict[str, object]) -> None:
    request = {"command": "true", "image": busybox, **fields}
    with pytest.raises(BadRequest):
        await backend.spawn(api.InstanceSpawnRequest(**request))  # type: ignore[arg-type]
