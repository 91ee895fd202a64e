"""Golden transcripts: load, normalise, replay over any transport, and record from a live stdio session.

Format (fixtures/transcripts/README.md): one JSON object per line, one of
  {"meta": {"description": str, "argv": [str, ...], "mask": [str, ...]}}   first line; "{python}" in argv =
                                  this interpreter; "{NAME}" = a per-run variable (e.g. {home}, {workdir})
                                  that the replayer supplies; "mask" names volatile fields (see below)
  {"send": <message>}             a client frame (object or batch array)
  {"send_raw": "<text>"}          a client line sent verbatim (malformed input)
  {"expect": [<message>, ...]}    the server frames caused since the last send, in order
  {"expect_unordered": [...]}     the same, in any order (concurrent work)
  {"sleep": <seconds>}
Volatile values are normalised to placeholders on both sides; in a `send`, the placeholders "<cursor>" and
"<server-id>" are replaced by the last nextCursor / server→client request id the server sent. Variables
("{workdir}") are substituted into sends and argv; their values become "{NAME}" again in server output.
Fields named in meta "mask" get the value "<masked>" wherever they occur, including inside JSON text blocks.

    python -m protocol.testing.transcript record --out F.jsonl [--description TEXT] [--var NAME=VALUE ...]
        [--mask FIELD ...] [--lockstep] -- <server argv>
    python -m protocol.testing.transcript replay F.jsonl [...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

CURSOR = "<cursor>"
SERVER_ID = "<server-id>"
VERSION = "<version>"
UUID = "<uuid>"
TIMESTAMP = "<timestamp>"
SESSION_ID = "<session-id>"
REQUEST_STATE = "<request-state>"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
MASKED = "<masked>"

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Seconds are optional: listings print minute-precision times ("2026-11-24 05:01 UTC").
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?")
STEP_KINDS = ("send", "send_raw", "expect", "expect_unordered", "sleep")


class TranscriptError(Exception):
    """A transcript file is malformed."""


class TranscriptMismatch(AssertionError):
    """The server did not produce what the transcript expects."""


@dataclass
class Step:
    kind: str
    value: Any
    line: int


@dataclass
class Transcript:
    path: Path
    description: str
    argv: list[str]
    steps: list[Step]
    mask: list[str] = field(default_factory=list)
    numbered_uuids: bool = False
    capture: list[str] = field(default_factory=list)


@dataclass
class State:
    """What the replayer or recorder learned from the server so far (for placeholders)."""

    cursor: str | None = None
    server_id: Any = None
    request_state: str | None = None  # the last input_required result's requestState (2026-07-28)
    cursors: set[str] = field(default_factory=set)  # every nextCursor seen (an error may echo one)
    literals: dict[str, str] = field(default_factory=dict)  # e.g. {session_id: "<session-id>"}
    variables: dict[str, str] = field(default_factory=dict)  # e.g. {"workdir": "/tmp/x/work"}
    mask: frozenset[str] = frozenset()  # field names whose values are volatile
    numbered_uuids: bool = False  # meta "uuids": "numbered"
    uuids: dict[str, str] = field(default_factory=dict)  # real UUID → "<uuid-N>"
    capture: frozenset[str] = frozenset()  # meta "capture": tools whose bare result is volatile
    calls: dict[Any, str] = field(default_factory=dict)  # request id → tool name (tools/call sent)
    captured: dict[str, Any] = field(default_factory=dict)  # "<tool-N>" → the value the server returned


def load(path: str | Path) -> Transcript:
    path = Path(path)
    description = ""
    argv: list[str] = []
    mask: list[str] = []
    numbered = False
    capture: list[str] = []
    steps: list[Step] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            entry = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise TranscriptError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(entry, dict) or len(entry) != 1:
            raise TranscriptError(f"{path}:{number}: each line is an object with exactly one key")
        ((kind, value),) = entry.items()
        if kind == "meta":
            description = value.get("description", "")
            argv = list(value.get("argv", []))
            mask = list(value.get("mask", []))
            numbered = value.get("uuids") == "numbered"
            capture = list(value.get("capture", []))
        elif kind in STEP_KINDS:
            steps.append(Step(kind, value, number))
        else:
            raise TranscriptError(f"{path}:{number}: unknown key {kind!r}")
    return Transcript(path, description, argv, steps, mask, numbered, capture)


def dump(transcript_lines: Sequence[dict[str, Any]]) -> str:
    return "".join(msgspec.json.encode(line).decode() + "\n" for line in transcript_lines)


# ---------------------------------------------------------------- normalisation


def observe(message: Any, state: State) -> None:
    """Remember the values a later `send` may refer to by placeholder."""
    for m in message if isinstance(message, list) else [message]:
        if not isinstance(m, dict):
            continue
        result = m.get("result")
        if isinstance(result, dict) and isinstance(result.get("nextCursor"), str):
            state.cursor = result["nextCursor"]
            state.cursors.add(state.cursor)
        if isinstance(result, dict) and isinstance(result.get("requestState"), str):
            state.request_state = result["requestState"]
        if "method" in m and "id" in m:
            state.server_id = m["id"]


def note_send(message: Any, state: State) -> None:
    """Remember which tool each client request calls (for meta "capture")."""
    for m in message if isinstance(message, list) else [message]:
        if isinstance(m, dict) and m.get("method") == "tools/call" and "id" in m:
            state.calls[m["id"]] = str((m.get("params") or {}).get("name", ""))


def _capture(message: dict[str, Any], state: State) -> dict[str, Any]:
    """A tool result whose bare value is volatile (rsync's random state id) → "<tool-N>", usable in sends."""
    tool = state.calls.get(message.get("id")) if "method" not in message else None
    result = message.get("result")
    if tool not in state.capture or not isinstance(result, dict) or result.get("isError"):
        return message
    structured = result.get("structuredContent")
    if not isinstance(structured, dict) or "result" not in structured:
        return message
    value = structured["result"]
    placeholder = f"<{tool}-{len(state.captured) + 1}>"
    state.captured[placeholder] = value
    as_text = msgspec.json.encode(value).decode()
    content = [
        {**c, "text": placeholder} if isinstance(c, dict) and c.get("text") == as_text else c
        for c in result.get("content", [])
    ]
    result = {**result, "structuredContent": {**structured, "result": placeholder}, "content": content}
    return {**message, "result": result}


def normalise(message: Any, state: State) -> Any:
    """A copy of a server message with volatile values replaced by placeholders."""
    if isinstance(message, list):
        return [normalise(m, state) for m in message]
    if not isinstance(message, dict):
        return _scrub(message, state)
    if state.capture:
        message = _capture(message, state)
    out = {k: _scrub(v, state) for k, v in message.items()}
    if "method" in out and "id" in out:  # a server→client request: the id is the server's choice
        out["id"] = SERVER_ID
    error = out.get("error")
    data = error.get("data") if isinstance(error, dict) else None
    if isinstance(data, dict) and data.get("cursor") in state.cursors:
        data["cursor"] = CURSOR  # a stale cursor echoed back: its bytes depend on the registry's history
    result = out.get("result")
    if isinstance(result, dict):
        if isinstance(result.get("nextCursor"), str):
            result["nextCursor"] = CURSOR
        if isinstance(result.get("requestState"), str):
            result["requestState"] = REQUEST_STATE
        meta = result.get("_meta")
        for info in (result.get("serverInfo"), meta.get(SERVER_INFO_KEY) if isinstance(meta, dict) else None):
            if isinstance(info, dict) and "version" in info:
                info["version"] = VERSION
    return out


def _scrub(value: Any, state: State) -> Any:
    if isinstance(value, dict):
        return {
            _scrub_key(k, state): MASKED if k in state.mask else _scrub(v, state) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_scrub(v, state) for v in value]
    if isinstance(value, str):
        value = _unvariable(value, state)
        for literal, placeholder in state.literals.items():
            value = value.replace(literal, placeholder)
        if state.mask:
            value = _mask_text(value, state.mask)
        return _TIME_RE.sub(TIMESTAMP, _UUID_RE.sub(lambda m: _uuid_placeholder(m[0], state), value))
    return value


def _scrub_key(key: str, state: State) -> str:
    # Only numbered transcripts scrub keys: results keyed by operation id must replay under fresh ids.
    return _scrub(key, state) if state.numbered_uuids and isinstance(key, str) else key


def _uuid_placeholder(uuid: str, state: State) -> str:
    """`<uuid>`, or with numbered UUIDs `<uuid-N>` (N by first appearance), which a later send may use."""
    if not state.numbered_uuids:
        return UUID
    uuid = uuid.lower()
    if uuid not in state.uuids:
        state.uuids[uuid] = f"<uuid-{len(state.uuids) + 1}>"
    return state.uuids[uuid]


def _unvariable(value: str, state: State) -> str:
    # Longest first, so a variable inside another's value cannot split it.
    for name, real in sorted(state.variables.items(), key=lambda kv: -len(kv[1])):
        if real:
            value = value.replace(real, "{" + name + "}")
    return value


# A masked field as it appears in JSON text (tool results repeat their structured content as text).
_JSON_SCALAR = r'(?:"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)'


def _mask_text(text: str, mask: frozenset[str]) -> str:
    if '"' not in text:
        return text
    names = "|".join(re.escape(m) for m in sorted(mask))
    return re.sub(rf'("(?:{names})":\s*){_JSON_SCALAR}', rf'\1"{MASKED}"', text)


def substitute(message: Any, state: State) -> Any:
    """A client message with "<cursor>"/"<server-id>" replaced by the values the server sent."""
    if isinstance(message, list):
        return [substitute(m, state) for m in message]
    if isinstance(message, dict):
        return {k: substitute(v, state) for k, v in message.items()}
    if isinstance(message, str):
        if message in state.captured:
            return state.captured[message]
        for name, real in state.variables.items():
            message = message.replace("{" + name + "}", real)
        for real, placeholder in state.uuids.items():
            message = message.replace(placeholder, real)
    if message == CURSOR and state.cursor is not None:
        return state.cursor
    if message == REQUEST_STATE and state.request_state is not None:
        return state.request_state
    if message == SERVER_ID and state.server_id is not None:
        return state.server_id
    return message


def desubstitute(message: Any, state: State) -> Any:
    """The recorder's inverse of `substitute`: real cursor / server ids in a client message → placeholders."""
    if isinstance(message, list):
        return [desubstitute(m, state) for m in message]
    if not isinstance(message, dict):
        return message
    out = _unvariables(message, state)
    params = out.get("params")
    if isinstance(params, dict) and state.cursor is not None and params.get("cursor") == state.cursor:
        out["params"] = {**params, "cursor": CURSOR}
    params = out.get("params")
    if isinstance(params, dict) and state.request_state is not None:
        if params.get("requestState") == state.request_state:
            out["params"] = {**params, "requestState": REQUEST_STATE}
    if "method" not in out and "id" in out and state.server_id is not None and out["id"] == state.server_id:
        out["id"] = SERVER_ID
    return out


def _unvariables(value: Any, state: State) -> Any:
    if isinstance(value, dict):
        return {k: _unvariables(v, state) for k, v in value.items()}
    if isinstance(value, list):
        return [_unvariables(v, state) for v in value]
    for placeholder, real in state.captured.items():
        if type(value) is type(real) and value == real:
            return placeholder
    if not isinstance(value, str):
        return value
    value = _unvariable(value, state)
    for real, placeholder in state.uuids.items():  # only UUIDs the server sent first
        value = re.sub(re.escape(real), placeholder, value, flags=re.IGNORECASE)
    return value


# ---------------------------------------------------------------- replay


class TranscriptTransport(Protocol):
    """What the replayer needs from a transport (stdio here; Streamable HTTP in protocol/http tests)."""

    async def send(self, data: bytes) -> None: ...

    async def receive(self, wait: float) -> Any:
        """The next server frame, decoded; raise TimeoutError after `wait` seconds."""
        ...


async def replay(
    transcript: Transcript, transport: TranscriptTransport, *, state: State | None = None, wait: float = 10.0
) -> None:
    """Run the steps against `transport`; raises TranscriptMismatch at the first difference."""
    if state is None:
        state = State(
            mask=frozenset(transcript.mask),
            numbered_uuids=transcript.numbered_uuids,
            capture=frozenset(transcript.capture),
        )
    for step in transcript.steps:
        where = f"{transcript.path}:{step.line}"
        if step.kind == "send":
            message = substitute(step.value, state)
            note_send(message, state)
            await transport.send(msgspec.json.encode(message))
        elif step.kind == "send_raw":
            await transport.send(step.value.encode())
        elif step.kind == "sleep":
            await asyncio.sleep(float(step.value))
        else:
            expected = list(step.value)
            got: list[Any] = []
            for _ in expected:
                try:
                    message = await transport.receive(wait)
                except TimeoutError:
                    raise TranscriptMismatch(
                        f"{where}: timed out; expected {_show(expected)}\n got {_show(got)}"
                    ) from None
                observe(message, state)
                got.append(normalise(message, state))
            if step.kind == "expect_unordered":
                matches = _same_multiset(got, expected)
            else:
                matches = got == expected
            if not matches:
                raise TranscriptMismatch(
                    f"{where}: mismatch\nexpected {_show(expected)}\n     got {_show(got)}"
                )


def _same_multiset(a: list[Any], b: list[Any]) -> bool:
    key = msgspec.json.Encoder(order="sorted").encode
    return sorted(map(key, a)) == sorted(map(key, b))


def _show(messages: list[Any]) -> str:
    return msgspec.json.format(msgspec.json.encode(messages), indent=2).decode()


def resolve_argv(argv: Sequence[str], variables: dict[str, str] | None = None) -> list[str]:
    out = []
    for a in argv:
        for name, real in (variables or {}).items():
            a = a.replace("{" + name + "}", real)
        out.append(sys.executable if a == "{python}" else a)
    return out


class StdioProcess:
    """A server subprocess speaking NDJSON; implements TranscriptTransport."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        variables: dict[str, str] | None = None,
    ) -> StdioProcess:
        proc = await asyncio.create_subprocess_exec(
            *resolve_argv(argv, variables),
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,
        )
        return cls(proc)

    async def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data + b"\n")
        await self.proc.stdin.drain()

    async def receive(self, wait: float) -> Any:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), wait)
        if not line:
            raise TranscriptMismatch("the server closed stdout")
        return msgspec.json.decode(line)

    async def finish(self, wait: float = 5.0) -> bytes:
        """Close stdin; returns anything the server still printed. Raises unless it exits 0."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        rest = await asyncio.wait_for(self.proc.stdout.read(), wait)
        code = await asyncio.wait_for(self.proc.wait(), wait)
        if code != 0:
            raise TranscriptMismatch(f"the server exited with {code}")
        return rest

    async def kill(self, grace: float = 10.0) -> None:
        # SIGTERM first: a server holding resources (sandboxes, mounts, firewall rules) releases them.
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def replay_stdio(
    path: str | Path,
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    variables: dict[str, str] | None = None,
    wait: float = 10.0,
) -> None:
    """Replay one transcript against a fresh server started from its `meta.argv`; nothing may follow.
    `variables` supplies the "{NAME}" values the transcript's argv and sends use."""
    transcript = load(path)
    if not transcript.argv:
        raise TranscriptError(f"{path}: no meta.argv to start the server with")
    state = State(
        variables=dict(variables or {}),
        mask=frozenset(transcript.mask),
        numbered_uuids=transcript.numbered_uuids,
        capture=frozenset(transcript.capture),
    )
    proc = await StdioProcess.start(transcript.argv, cwd=cwd, env=env, variables=state.variables)
    try:
        await replay(transcript, proc, state=state, wait=wait)
        rest = await proc.finish()
        if rest.strip():
            raise TranscriptMismatch(f"{path}: unexpected output after the last step: {rest[:500]!r}")
    finally:
        await proc.kill()


# ---------------------------------------------------------------- record


async def record(
    argv: Sequence[str],
    description: str = "",
    *,
    variables: dict[str, str] | None = None,
    mask: Sequence[str] = (),
    lockstep: bool = False,
    numbered_uuids: bool = False,
    capture: Sequence[str] = (),
    cwd: str | Path | None = None,
) -> tuple[int, str]:
    """Proxy our stdin/stdout to a server subprocess; returns its exit code and the transcript text.
    `lockstep`: after each client request, wait for its response before reading the next client line (a
    scripted client then needs no sleeps, however long each call takes)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    state = State(
        variables=dict(variables or {}),
        mask=frozenset(mask),
        numbered_uuids=numbered_uuids,
        capture=frozenset(capture),
    )
    proc = await StdioProcess.start(argv, cwd=cwd, variables=state.variables)
    portable = ["{python}" if a == sys.executable else a for a in argv]
    meta: dict[str, Any] = {"description": description, "argv": portable}
    if mask:
        meta["mask"] = list(mask)
    if numbered_uuids:
        meta["uuids"] = "numbered"
    if capture:
        meta["capture"] = list(capture)
    lines: list[dict[str, Any]] = [{"meta": meta}]
    pending: list[Any] = []
    answered: dict[Any, asyncio.Event] = {}

    def flush() -> None:
        if pending:
            lines.append({"expect": list(pending)})
            pending.clear()

    async def pump_server() -> None:
        assert proc.proc.stdout is not None
        while line := await proc.proc.stdout.readline():
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            try:
                message = msgspec.json.decode(line)
            except msgspec.DecodeError:
                pending.append({"not-json": line.decode(errors="replace")})
                continue
            observe(message, state)
            pending.append(normalise(message, state))
            for m in message if isinstance(message, list) else [message]:
                if isinstance(m, dict) and "method" not in m and m.get("id") in answered:
                    answered[m["id"]].set()

    server_task = asyncio.create_task(pump_server())
    assert proc.proc.stdin is not None
    while line := await reader.readline():
        text = line.strip()
        if not text:
            continue
        flush()
        request_id = None
        try:
            message = substitute(msgspec.json.decode(text), state)  # scripted clients may use placeholders
        except msgspec.DecodeError:
            lines.append({"send_raw": text.decode(errors="replace")})
        else:
            if isinstance(message, dict) and list(message) == ["sleep"]:  # a scripted pause, kept as a step
                await asyncio.sleep(float(message["sleep"]))
                flush()
                lines.append({"sleep": message["sleep"]})
                continue
            lines.append({"send": desubstitute(message, state)})
            note_send(message, state)
            text = msgspec.json.encode(message)
            if lockstep and (request_id := _request_id(message)) is not None:
                answered[request_id] = asyncio.Event()
        proc.proc.stdin.write(text + b"\n")
        await proc.proc.stdin.drain()
        if request_id is not None:
            await asyncio.wait_for(answered[request_id].wait(), 600)
    proc.proc.stdin.close()
    await server_task
    code = await proc.proc.wait()
    flush()
    return code, dump(lines)


def _request_id(message: Any) -> Any:
    if isinstance(message, dict) and "method" in message and "id" in message:
        return message["id"]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protocol.testing.transcript",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="proxy a live stdio session and write a transcript")
    rec.add_argument("--out", required=True, type=Path)
    rec.add_argument("--description", default="")
    rec.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a {NAME} variable")
    rec.add_argument("--mask", action="append", default=[], metavar="FIELD", help="a volatile field name")
    rec.add_argument("--numbered-uuids", action="store_true", help="<uuid-N> placeholders sends may use")
    rec.add_argument("--capture", action="append", default=[], metavar="TOOL", help="a volatile tool result")
    rec.add_argument("--lockstep", action="store_true", help="wait for each response before the next line")
    rec.add_argument("--cwd", type=Path, default=None, help="the server's working directory")
    rec.add_argument("server", nargs="+", help="server argv (after --); use {python} for this interpreter")
    rep = sub.add_parser("replay", help="replay transcripts over stdio")
    rep.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        variables = dict(v.split("=", 1) for v in args.var)
        code, text = asyncio.run(
            record(
                args.server,
                args.description,
                variables=variables,
                mask=args.mask,
                lockstep=args.lockstep,
                numbered_uuids=args.numbered_uuids,
                capture=args.capture,
                cwd=args.cwd,
            )
        )
        args.out.write_text(text)
        return code
    failed = 0
    for path in args.files:
        try:
            asyncio.run(replay_stdio(path, env={**os.environ}))
            print(f"PASS {path}")
        except (TranscriptMismatch, TranscriptError) as exc:
            failed += 1
            print(f"FAIL {path}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
