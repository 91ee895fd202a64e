"""Spawn semantics of CONTREE-API §8: from a request and the image config to the process to start.

Pure functions, no I/O: validation (400 on anything the API forbids), the argv/env/cwd rules for
`shell` true/false (`plan_for`), initial stdin, `preserve_env` / `preserve_cwd` results, injected-file
modes, and `SpawnFailed`, the error of an instance that could not start.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping

import msgspec

from contree import api
from contree.errors import BackendError, BadRequest

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TIMEOUT = 60
DEFAULT_SHELL = "/bin/sh"
_UUID = re.compile(api.UUID_PATTERN)
_TAG_SOURCE = re.compile(api.TAG_SOURCE_PATTERN)
_ENV_NAME = re.compile(r"^[^=\x00]+$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")


class SpawnFailed(Exception):
    """The instance could not be started; the message is the operation's error."""


def spawn_error(exc: BaseException) -> str:
    """The operation's error for a failure to start."""
    if isinstance(exc, BackendError):
        return f"spawn failed: {exc.message}"
    if isinstance(exc, SpawnFailed):
        return str(exc)
    return f"spawn failed: {exc}"


class ProcessPlan(msgspec.Struct, kw_only=True):
    """What actually runs: the argv (shell already wrapped), the full env, the resolved cwd and identity."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    shell: bool
    command: str
    args: list[str]


def resolve_timeout(requested: int | None, max_timeout: int) -> int:
    if requested is None:
        return min(DEFAULT_TIMEOUT, max_timeout)
    if requested < 1:
        raise BadRequest(f"timeout must be at least 1 second, got {requested}")
    return min(requested, max_timeout)


def check_truncate(value: int) -> int:
    if not 1 <= value <= api.MAX_TRUNCATE_OUTPUT_AT:
        limit = api.MAX_TRUNCATE_OUTPUT_AT
        raise BadRequest(f"truncate_output_at must be between 1 and {limit}, got {value}")
    return value


def check_image_source(image: str) -> None:
    if _UUID.match(image) or _TAG_SOURCE.match(image):
        return
    raise BadRequest(f"invalid image {image!r}: expected a UUID or tag:<name>")


def check_text(where: str, value: str) -> None:
    """Strings that become C strings (argv, environment, paths) would silently end at a NUL byte."""
    if "\x00" in value:
        # the value is not echoed: environment values may be secrets
        raise BadRequest(
            f"{where} contains a NUL byte (\\u0000), which no command line, environment or path can carry"
        )


def check_command(command: str, args: list[str]) -> None:
    if not command:
        raise BadRequest("command must not be empty")
    check_text("command", command)
    for i, arg in enumerate(args):
        check_text(f"args[{i}]", arg)


def check_cwd(cwd: str) -> None:
    check_text("cwd", cwd)
    if cwd and not cwd.startswith("/"):
        raise BadRequest(f"cwd must be an absolute path or empty, got {cwd!r}")


def check_env(env: Mapping[str, str | None] | None) -> None:
    for key, value in (env or {}).items():
        check_text("environment variable name", key)
        if not _ENV_NAME.match(key):
            raise BadRequest(f"invalid environment variable name {key!r}")
        if value is not None:
            check_text(f"environment variable {key}", value)


# No count, size or duration the API takes is larger (and SQLite stores nothing larger).
MAX_INT = 2**63 - 1


def check_int(name: str, value: int | None) -> None:
    if value is not None and value > MAX_INT:
        raise BadRequest(f"{name} must be at most {MAX_INT}, got {value}")


def check_hostname(hostname: str) -> None:
    if not _HOSTNAME.match(hostname):
        raise BadRequest(f"invalid hostname {hostname!r}")


def parse_mode(mode: str | None) -> int:
    """Permission bits from "0644", "644" or Python's oct() form "0o100644" (file-type bits dropped)."""
    if mode is None or mode == "":
        return 0o644
    text = mode.strip().lower()
    if text.startswith("0o"):
        text = text[2:]
    try:
        value = int(text, 8)
    except ValueError:
        raise BadRequest(f'invalid file mode {mode!r}: expected an octal string like "0644"') from None
    if value < 0:
        raise BadRequest(f"invalid file mode {mode!r}")
    return value & 0o7777


def check_file_path(path: str) -> str:
    if not path.startswith("/") or "\x00" in path:
        raise BadRequest(f"file path must be absolute, got {path!r}")
    norm = posixpath.normpath(path)
    if norm == "/":
        raise BadRequest(f"file path {path!r} names the root directory")
    return norm


def validate_request(request: api.InstanceSpawnRequest) -> None:
    """Everything about a spawn request that can be rejected before looking at images."""
    check_command(request.command, request.args)
    check_image_source(request.image)
    check_cwd(request.cwd)
    check_env(request.env)
    check_hostname(request.hostname)
    check_truncate(request.truncate_output_at)
    check_ids("", request.uid, request.gid)
    check_int("timeout", request.timeout)
    if request.resources_limits is not None:
        if request.resources_limits.max_layer_bytes < 1:
            raise BadRequest("resources_limits.max_layer_bytes must be >= 1")
        check_int("resources_limits.max_layer_bytes", request.resources_limits.max_layer_bytes)
    for path, entry in (request.files or {}).items():
        check_file_path(path)
        parse_mode(entry.mode)
        if not _UUID.match(entry.uuid) and not re.fullmatch(r"[0-9a-f]{64}", entry.uuid):
            raise BadRequest(f"files[{path!r}].uuid must be a file UUID, got {entry.uuid!r}")
        check_ids(f"files[{path!r}]: ", entry.uid, entry.gid)
    if request.stdin is not None:
        try:
            api.decode_stream(request.stdin)
        except ValueError as exc:
            raise BadRequest(f"stdin: {exc}") from None


# Sandboxes map container ids 0..65535 (the user namespace's range); larger ids cannot exist inside.
MAX_ID = 65535


def check_ids(where: str, uid: int, gid: int) -> None:
    if not (0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID):
        raise BadRequest(f"{where}uid and gid must be between 0 and {MAX_ID}")


def validate_exec(spec: api.ExecSpec) -> None:
    check_command(spec.command, spec.args)
    check_cwd(spec.cwd)
    check_env(spec.env)
    check_truncate(spec.truncate_output_at)
    check_ids("", spec.uid, spec.gid)
    if spec.stdin is not None:
        try:
            api.decode_stream(spec.stdin)
        except ValueError as exc:
            raise BadRequest(f"stdin: {exc}") from None


def merge_env(base: Mapping[str, str], overlay: Mapping[str, str | None] | None) -> dict[str, str]:
    """`overlay` over `base`; a null value removes the variable."""
    merged = dict(base)
    for key, value in (overlay or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def preserved_env(
    image_env: Mapping[str, str], request_env: Mapping[str, str | None] | None
) -> dict[str, str]:
    """The env written into the result image for `preserve_env`: empty strings and nulls remove."""
    merged = dict(image_env)
    for key, value in (request_env or {}).items():
        if value is None or value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def resolve_cwd(cwd: str, image_cwd: str | None) -> str:
    if cwd:
        return posixpath.normpath(cwd) if cwd != "/" else "/"
    return image_cwd or "/"


def plan_process(
    *,
    command: str,
    args: list[str],
    shell: bool,
    env: Mapping[str, str | None] | None,
    cwd: str,
    uid: int,
    gid: int,
    image_env: Mapping[str, str],
    image_cwd: str | None,
) -> ProcessPlan:
    """`shell=true`: `<SHELL or /bin/sh> -c command` with the image ENV under the request env.
    `shell=false`: `command args…` with only the request env (PATH defaulted)."""
    if shell:
        full_env = merge_env(image_env, env)
        full_env.setdefault("PATH", DEFAULT_PATH)
        shell_path = full_env.get("SHELL") or DEFAULT_SHELL
        argv = [shell_path, "-c", command]
    else:
        full_env = merge_env({}, env)
        full_env.setdefault("PATH", DEFAULT_PATH)
        argv = [command, *args]
    return ProcessPlan(
        argv=argv,
        env=full_env,
        cwd=resolve_cwd(cwd, image_cwd),
        uid=uid,
        gid=gid,
        shell=shell,
        command=argv[0],
        args=argv[1:],
    )


def plan_for(
    spec: api.InstanceSpawnRequest | api.ExecSpec, image_env: Mapping[str, str], image_cwd: str | None
) -> ProcessPlan:
    """The plan of a spawn request's process (spid 1) or of one exec'd into it."""
    return plan_process(
        command=spec.command, args=list(spec.args), shell=spec.shell, env=spec.env, cwd=spec.cwd,
        uid=spec.uid, gid=spec.gid, image_env=image_env, image_cwd=image_cwd,
    )


def initial_stdin(stdin: api.ClosableStreamRepr | None) -> tuple[bytes, bool]:
    """A process's first stdin bytes, and whether its stdin stays open after them."""
    data = api.decode_stream(stdin) if stdin is not None else b""
    return data, stdin is not None and not stdin.close


def env_dict(env: list[str]) -> dict[str, str]:
    """An image config's `KEY=value` list as a mapping (entries without `=` are dropped)."""
    out: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if sep:
            out[key] = value
    return out
