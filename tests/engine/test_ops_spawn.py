"""Spawn semantics (CONTREE-API §8) as pure functions: shell/env/cwd rules, modes, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from contree import api
from contree.engine import spawn
from contree.engine.snapshots import find_executable
from contree.errors import BadRequest

IMG = "3f2a4c1e-0000-4000-8000-000000000001"


def plan(**kw: object) -> spawn.ProcessPlan:
    args: dict[str, object] = dict(command="echo hi", args=[], shell=True, env=None, cwd="", uid=0, gid=0,
                                   image_env={"LANG": "C", "PATH": "/img/bin"}, image_cwd=None)
    args.update(kw)
    return spawn.plan_process(**args)  # type: ignore[arg-type]


def test_shell_true_wraps_and_inherits_image_env() -> None:
    p = plan(env={"A": "1", "LANG": None})
    assert p.argv == ["/bin/sh", "-c", "echo hi"]
    assert p.env == {"PATH": "/img/bin", "A": "1"}


def test_shell_from_env_picks_the_shell() -> None:
    assert plan(env={"SHELL": "/bin/ash"}).argv[0] == "/bin/ash"


def test_shell_false_uses_only_request_env_with_default_path() -> None:
    p = plan(command="/bin/ls", args=["-l", "/"], shell=False, env={"A": "1"})
    assert p.argv == ["/bin/ls", "-l", "/"]
    assert p.env == {"A": "1", "PATH": spawn.DEFAULT_PATH}


def test_cwd_resolution() -> None:
    assert plan().cwd == "/"
    assert plan(image_cwd="/app").cwd == "/app"
    assert plan(cwd="/work/", image_cwd="/app").cwd == "/work"


def test_preserved_env_removes_empty_and_null() -> None:
    got = spawn.preserved_env({"A": "1", "B": "2", "C": "3"}, {"A": "", "B": None, "D": "4"})
    assert got == {"C": "3", "D": "4"}


@pytest.mark.parametrize(("text", "bits"), [("0644", 0o644), ("644", 0o644), ("0o100755", 0o755),
                                             ("4755", 0o4755), (None, 0o644)])
def test_parse_mode_forms(text: str | None, bits: int) -> None:
    assert spawn.parse_mode(text) == bits


def test_parse_mode_rejects_garbage() -> None:
    with pytest.raises(BadRequest):
        spawn.parse_mode("rwx")


def test_timeout_default_and_cap() -> None:
    assert spawn.resolve_timeout(None, 3600) == 60
    assert spawn.resolve_timeout(10_000, 3600) == 3600
    with pytest.raises(BadRequest):
        spawn.resolve_timeout(0, 3600)


@pytest.mark.parametrize(
    "change",
    [
        {"image": "not-an-image"},
        {"cwd": "relative"},
        {"truncate_output_at": 0},
        {"truncate_output_at": api.MAX_TRUNCATE_OUTPUT_AT + 1},
        {"files": {"rel/path": api.InjectedFile(uuid=IMG)}},
        {"files": {"/x": api.InjectedFile(uuid=IMG, mode="zzz")}},
        {"stdin": api.ClosableStreamRepr(value="!!!", encoding="base64")},
        {"env": {"A=B": "x"}},
        {"command": ""},
    ],
)
def test_bad_requests_are_400(change: dict[str, object]) -> None:
    fields: dict[str, object] = {"command": "true", "image": IMG}
    fields.update(change)
    with pytest.raises(BadRequest):
        spawn.validate_request(api.InstanceSpawnRequest(**fields))  # type: ignore[arg-type]


def test_tag_sources_are_valid() -> None:
    spawn.validate_request(api.InstanceSpawnRequest(command="true", image="tag:busybox:latest"))


def test_find_executable_resolves_inside_the_image_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "bin" / "data").write_bytes(b"x")
    (root / "bin" / "link").symlink_to("/bin/tool")  # absolute: must resolve in the image root
    (root / "bin" / "escape").symlink_to("/usr/bin/env")  # exists on the host, not in the image
    (root / "bin" / "dotdot").symlink_to("../../../../../../usr/bin/env")
    assert find_executable(root, "/bin/tool", "", "/")
    assert find_executable(root, "tool", "/usr/bin:/bin", "/")
    assert find_executable(root, "link", "/bin", "/")
    assert find_executable(root, "./tool", "", "/bin")
    assert not find_executable(root, "/bin/data", "", "/")  # not executable
    assert not find_executable(root, "/bin/escape", "", "/")
    assert not find_executable(root, "/bin/dotdot", "", "/")
    assert not find_executable(root, "env", "/usr/bin:/bin", "/")
