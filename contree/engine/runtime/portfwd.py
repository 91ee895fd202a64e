"""Exposed ports of a long-lived sandbox: a TCP forward from the host's loopback to a port in the sandbox.

Each forward listens on 127.0.0.1 only (never another address: `sandbox_api.LISTEN_HOST` is the one
place it is decided) on a port the kernel picks, and connects each accepted connection to 127.0.0.1:<port> (or
[::1]:<port>) *inside the sandbox's network namespace*: the outgoing socket is created by a thread that
entered that namespace through the pidfd of the sandbox's PID 1. So the same code serves root NAT
networking, rootless slirp4netns/pasta and a sandbox without networking (only `lo`), and a server that
listens on the sandbox's loopback only is reachable too. Traffic counts as the sandbox's activity (it
keeps an idle sandbox alive). Everything closes with the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from contree.errors import BadRequest, Conflict, NotFound, RateLimited
from contree.sandbox_api import LISTEN_HOST, PortForward

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
CHUNK = 65536
MAX_FORWARDS = 16  # per sandbox
MAX_CONNECTIONS = 256  # open at once, per forward


_libc: ctypes.CDLL | None = None


def _setns(fd: int, nstype: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetnsSockets:
    """Creates sockets inside one sandbox's network namespace, on a thread of its own that enters that
    namespace once and never leaves it: setns changes only the calling thread, nothing else ever runs
    on this one, and a rootless engine could not even go back (the host's namespace is not its own)."""

    def __init__(self, pidfd: Callable[[], int]) -> None:
        self._pidfd = pidfd
        self._pool: ThreadPoolExecutor | None = None
        self._entered = False

    def _make(self, family: int) -> socket.socket:
        if not self._entered:
            _setns(self._pidfd(), CLONE_NEWNET)
            self._entered = True
        return socket.socket(family, socket.SOCK_STREAM)

    async def socket_in(self, family: int) -> socket.socket:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="contree-netns")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._make, family)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class _Forward:
    def __init__(self, info: PortForward, server: asyncio.Server) -> None:
        self.info = info
        self.server = server
        self.tasks: set[asyncio.Task[None]] = set()


class PortForwards:
    """The exposed ports of one sandbox. `pidfd()` gives the sandbox's PID 1 (its network namespace);
    `activity()` is called on every accepted connection and every chunk moved."""

    def __init__(self, pidfd: Callable[[], int], activity: Callable[[], None], *,
                 limit: int = MAX_FORWARDS) -> None:
        self._sockets = NetnsSockets(pidfd)
        self._activity = activity
        self._limit = limit
        self._forwards: dict[int, _Forward] = {}
        self.closed = False

    def list(self) -> list[PortForward]:
        return [f.info for f in sorted(self._forwards.values(), key=lambda f: f.info.port)]

    async def expose(self, port: int) -> tuple[PortForward, bool]:
        """The forward of `port` (True when it was created now; an existing one is returned as is)."""
        if not 1 <= port <= 65535:
            raise BadRequest(f"port must be between 1 and 65535, got {port}")
        if self.closed:
            raise Conflict("the sandbox has stopped; its ports are closed")
        existing = self._forwards.get(port)
        if existing is not None:
            return existing.info, False
        if len(self._forwards) >= self._limit:
            raise RateLimited(f"a sandbox exposes at most {self._limit} ports; close one first")
        holder: list[_Forward] = []
        server = await asyncio.start_server(
            lambda r, w: self._accepted(holder[0], r, w), host=LISTEN_HOST, port=0,
            reuse_address=True, backlog=64)
        host_port = server.sockets[0].getsockname()[1]
        info = PortForward(port=port, host_port=host_port, url=f"http://{LISTEN_HOST}:{host_port}",
                           created_at=time.time())
        forward = _Forward(info, server)
        holder.append(forward)
        self._forwards[port] = forward
        return info, True

    async def close(self, port: int) -> None:
        forward = self._forwards.pop(port, None)
        if forward is None:
            raise NotFound(f"port {port} is not exposed")
        await self._shut(forward)

    async def close_all(self) -> None:
        self.closed = True
        forwards, self._forwards = list(self._forwards.values()), {}
        for forward in forwards:
            await self._shut(forward)
        self._sockets.close()

    @staticmethod
    async def _shut(forward: _Forward) -> None:
        forward.server.close()
        for task in list(forward.tasks):
            task.cancel()
        if forward.tasks:
            await asyncio.gather(*forward.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(forward.server.wait_closed(), 1.0)

    # ---- connections

    def _accepted(self, forward: _Forward, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
        if len(forward.tasks) >= MAX_CONNECTIONS or self.closed:
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(forward, reader, writer))
        forward.tasks.add(task)
        task.add_done_callback(forward.tasks.discard)

    async def _connect(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        last: OSError | None = None
        for family, address in ((socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port))):
            sock = await self._sockets.socket_in(family)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            return await asyncio.open_connection(sock=sock)
        assert last is not None
        raise last

    async def _serve(self, forward: _Forward, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        info = forward.info
        info.connections += 1
        info.open_connections += 1
        self._activity()
        inner_writer: asyncio.StreamWriter | None = None
        try:
            try:
                inner_reader, inner_writer = await self._connect(info.port)
            except OSError as exc:
                log.warning("a connection to port %d of a sandbox failed: %s", info.port, exc)
                return
            await asyncio.gather(self._pipe(reader, inner_writer, info, inbound=True),
                                 self._pipe(inner_reader, writer, info, inbound=False))
        finally:
            info.open_connections -= 1
            for w in (writer, inner_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(w.wait_closed(), 1.0)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: PortForward,
                    *, inbound: bool) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                writer.write(data)
                if inbound:
                    info.bytes_in += len(data)
                else:
                    info.bytes_out += len(data)
                self._activity()
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()  # half-close: the other direction may still be talking
