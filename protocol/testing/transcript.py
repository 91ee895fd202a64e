"""Golden transcripts: replay over any transport, and record from or replay against a live stdio session.

The format and its normalisation are `transcript_format.py` (its names are re-exported here: tests and
scripts use this module).

    python -m protocol.testing.transcript record --out F.jsonl [--description TEXT] [--var NAME=VALUE ...]
        [--mask FIELD ...] [--lockstep] -- <server argv>
    python -m protocol.testing.transcript replay F.jsonl [...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

from protocol.testing.transcript_format import (
    SESSION_ID,
    State,
    Transcript,
    TranscriptError,
    TranscriptMismatch,
    desubstitute,
    dump,
    load,
    normalise,
    note_send,
    observe,
    substitute,
)

__all__ = [
    "SESSION_ID", "State", "StdioProcess", "Transcript", "TranscriptError", "TranscriptMismatch",
    "TranscriptTransport", "desubstitute", "dump", "load", "main", "normalise", "note_send", "observe",
    "record", "replay", "replay_stdio", "resolve_argv", "substitute",
]


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
