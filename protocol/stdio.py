"""stdio transport: NDJSON on stdin/stdout, one writer, many requests in flight, exit on EOF."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

from protocol.errors import PARSE_ERROR
from protocol.events import Event, runs_handlers
from protocol.messages import encode_error
from protocol.server import Server
from protocol.types import Outgoing, Reply

log = logging.getLogger("protocol.stdio")

LINE_LIMIT = 64 * 1024 * 1024
WRITE_SLICE = 256 * 1024
IDLE_AFTER = 0.1  # seconds without a message after which a session without work in flight is idle
PIPE_SIZE = 1 << 20  # a large message (a page of output) then takes a few writes, not one per 64 KiB
_PARSE_ERROR = Reply(None, encode_error(None, PARSE_ERROR, "Parse error"))


class Writer(Protocol):
    def write(self, data: bytes) -> Any: ...
    async def drain(self) -> None: ...


class _FdWriter:
    """Blocking writes for a stdout that is a regular file (pipe transports refuse those)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    async def drain(self) -> None:
        return None


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    if _pollable(sys.stdin.fileno()):
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    else:
        # epoll refuses regular files and /dev/null (EPERM, raised later in a loop callback):
        # feed such inputs from a thread instead.
        threading.Thread(target=_feed_from_thread, args=(loop, reader), daemon=True).start()
    return reader


def _pollable(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))


def _feed_from_thread(loop: asyncio.AbstractEventLoop, reader: asyncio.StreamReader) -> None:
    fd = sys.stdin.fileno()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            loop.call_soon_threadsafe(reader.feed_eof)
            return
        loop.call_soon_threadsafe(reader.feed_data, chunk)


async def _stdout_writer() -> Writer:
    loop = asyncio.get_running_loop()
    fd = os.dup(sys.stdout.fileno())
    if stat.S_ISFIFO(os.fstat(fd).st_mode):
        with contextlib.suppress(OSError):  # above pipe-max-size, or the user's pipe quota is used up
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    # Anything else printed by mistake goes to stderr: stdout carries only protocol.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    try:
        pipe = os.fdopen(fd, "wb", buffering=0, closefd=False)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, pipe)
    except ValueError:
        return _FdWriter(fd)
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def serve_stdio(
    server: Server,
    reader: asyncio.StreamReader | None = None,
    writer: Writer | None = None,
    *,
    eof_grace: float = 0.5,
    idle: Callable[[], object] | None = None,
) -> None:
    """Serve one session until EOF; in-flight work gets `eof_grace` seconds, then is cancelled.
    `idle` is called once, when the session first has nothing to do: it has answered something (the
    handshake), everything it was sent is done, and nothing new came for IDLE_AFTER seconds. A server
    prepares there what later requests need, without delaying any request."""
    if reader is None:
        reader = await _stdin_reader()
    if writer is None:
        writer = await _stdout_writer()
    out = writer
    broken: list[BaseException] = []
    write_lock = asyncio.Lock()

    async def sink(message: Outgoing) -> None:
        if broken:
            return  # the client stopped reading; keep consuming stdin until EOF
        try:
            # One message at a time (the lock), so lines never interleave; a large one goes in slices with
            # a drain after each: asyncio's pipe transport moves its whole remaining buffer after every
            # partial write, which is quadratic for a message of megabytes (a page of output).
            async with write_lock:
                if len(message.data) < WRITE_SLICE:
                    out.write(message.data + b"\n")
                else:
                    view = memoryview(message.data)
                    for start in range(0, len(view), WRITE_SLICE):
                        out.write(view[start : start + WRITE_SLICE])
                        await out.drain()
                    out.write(b"\n")
                await out.drain()
        except (ConnectionError, OSError) as exc:
            broken.append(exc)
            log.warning("stdout is closed (%s); dropping further output", exc)
        answered.set()

    answered = asyncio.Event()
    session = server.create_session(transport="stdio")
    session.set_default_sink(sink)
    tasks: set[asyncio.Task[None]] = set()

    async def run(events: list[Event]) -> None:
        try:
            await session.run(events, sink)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dispatch failed")

    while True:
        try:
            if idle is None or not answered.is_set():
                line = await reader.readline()
            else:
                try:
                    async with asyncio.timeout(IDLE_AFTER):  # a cancelled readline consumes nothing
                        line = await reader.readline()
                except TimeoutError:
                    if not tasks:
                        ready, idle = idle, None
                        ready()
                    continue
        except ValueError:  # longer than LINE_LIMIT
            await sink(_PARSE_ERROR)
            continue
        except (ConnectionError, OSError):
            break
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        events = session.receive(line)
        if runs_handlers(events):
            task = asyncio.get_running_loop().create_task(run(events))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        else:
            # Quick methods, notifications (cancel!) and client responses are handled in line order.
            await run(events)
    if tasks:
        _done, pending = await asyncio.wait(list(tasks), timeout=eof_grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    await session.close()
    try:
        await out.drain()
    except (ConnectionError, OSError):
        pass


def run_stdio(server: Server) -> int:
    try:
        asyncio.run(serve_stdio(server))
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    return 0
