"""A child-process library: posix_spawn with pipes, reaped through its pidfd with wait4.

The OCI runtime's processes (`crun run`, `crun exec`) are spawned with `posix_spawn` (vfork+exec: it
never blocks the loop) in a session of their own, and reaped with `os.wait4` once their pidfd is
readable, so the result carries the kernel's rusage for the whole tree the runtime waited for;
asyncio's child watcher never sees these pids.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal as _signal
import time
from typing import Any

_SPAWN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def decode_status(status: int) -> tuple[int | None, int | None, bool]:
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status), os.WCOREDUMP(status)
    code = os.WEXITSTATUS(status)
    # OCI runtimes report a container killed by signal N as exit status 128+N.
    if code > 128 and code - 128 < 65:
        return code, code - 128, False
    return code, None, False


class _WriteProtocol(asyncio.streams.FlowControlMixin):
    def __init__(self) -> None:
        super().__init__()
        self._closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed


async def _reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    return reader


async def _writer(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.connect_write_pipe(_WriteProtocol, os.fdopen(fd, "wb", 0))
    return asyncio.StreamWriter(transport, proto, None, loop)


class Child:
    """A posix_spawn'ed process with pipes, reaped through its pidfd with wait4."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = time.monotonic()
        self._reaped: asyncio.Future[tuple[int, Any, float]] | None = None
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader
        self.stderr: asyncio.StreamReader

    @classmethod
    async def spawn(cls, argv: list[str], *, stdin: bool, pass_fds: list[int] | None = None) -> Child:
        pipes = {}
        fds_to_close = []
        try:
            if stdin:
                r, w = os.pipe2(os.O_CLOEXEC)
                pipes[0] = (r, w)
            for n in (1, 2):
                r, w = os.pipe2(os.O_CLOEXEC)
                pipes[n] = (r, w)
            actions: list[tuple[Any, ...]] = []
            if stdin:
                actions.append((os.POSIX_SPAWN_DUP2, pipes[0][0], 0))
            else:
                actions.append((os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0))
            actions.append((os.POSIX_SPAWN_DUP2, pipes[1][1], 1))
            actions.append((os.POSIX_SPAWN_DUP2, pipes[2][1], 2))
            for n, fd in enumerate(pass_fds or (), start=3):  # dup2 clears close-on-exec on the copy
                actions.append((os.POSIX_SPAWN_DUP2, fd, n))
            # posix_spawn is vfork+exec: it returns as soon as the child execs, so it does not block.
            pid = os.posix_spawn(  # noqa: ASYNC221
                argv[0], argv, _SPAWN_ENV, file_actions=actions, setsid=True, setsigmask=(),
                setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))
        except BaseException:
            for pair in pipes.values():
                for fd in pair:
                    os.close(fd)
            raise
        child = cls(pid)
        # Close the child's ends in the parent so EOF arrives when the sandbox closes its streams.
        if stdin:
            os.close(pipes[0][0])
            fds_to_close.append(pipes[0][1])
        os.close(pipes[1][1])
        os.close(pipes[2][1])
        try:
            if stdin:
                child.stdin = await _writer(pipes[0][1])
            child.stdout = await _reader(pipes[1][0])
            child.stderr = await _reader(pipes[2][0])
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, _signal.SIGKILL)
            raise
        child._start_reaper()
        return child

    def _start_reaper(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, Any, float]] = loop.create_future()
        self._reaped = fut
        pidfd = os.pidfd_open(self.pid)

        def ready() -> None:
            try:
                pid, status, ru = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError as exc:  # someone else reaped it: report what we can
                loop.remove_reader(pidfd)
                os.close(pidfd)
                if not fut.done():
                    fut.set_exception(exc)
                return
            if pid == 0:
                return
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not fut.done():
                fut.set_result((status, ru, time.monotonic() - self.started))

        loop.add_reader(pidfd, ready)

    @property
    def returncode_known(self) -> bool:
        return self._reaped is not None and self._reaped.done()

    async def reaped(self) -> tuple[int, Any, float]:
        assert self._reaped is not None
        return await asyncio.shield(self._reaped)

    def killpg(self, sig: int) -> None:
        if self.returncode_known:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
