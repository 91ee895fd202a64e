"""`contree-init`, PID 1 of a long-lived sandbox, and the engine's end of its control socket.

A long-lived sandbox's main process is `native/contree-init.c`, a small static binary bound read-only
into the sandbox's own /dev (never into its filesystem layers) and started by the OCI runtime with the
engine's control socket on fd 3. `exec` into the sandbox then costs one message, a fork and an execve
inside the sandbox (about a millisecond) instead of a `crun exec` (20-30 ms here): a fork of PID 1 has
everything the runtime applied to it (namespaces, cgroup, seccomp, capabilities, no_new_privs, rlimits).
The same channel carries signals, and the pidfd of PID 1, through which the engine enters the
sandbox's network namespace for port forwards.

The binary comes with the package when `make install` built it (`native/contree-init`), else it is built
once per source version with the host's C compiler into the engine home (`binary_for(home)`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import signal as signals
import socket
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contree.engine.runtime.child import _reader, _writer  # the runtime's raw-pipe plumbing
from contree.engine.runtime.handles import ExitUsage, ProcessExit

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "native" / "contree-init.c"
PACKAGED = SOURCE.with_suffix("")  # built by `make install` next to its source
INIT_PATH = "/dev/.contree-init"  # where the sandbox sees it: /dev is the sandbox's own tmpfs
CONTROL_FD = 3
PROTOCOL_VERSION = 1
HELLO_TIMEOUT = 10.0

T_SPAWN, T_SIGNAL, T_SIGNAL_ALL = 1, 2, 3
T_HELLO, T_STARTED, T_FAILED, T_EXITED = 100, 101, 102, 103
F_STDIN = 1
F_GROUP = 1

_SPAWN = struct.Struct("=8I")
_SIGNAL = struct.Struct("=IIiI")
_HELLO = struct.Struct("=IIIi")
_STARTED = struct.Struct("=IIi")
_FAILED = struct.Struct("=IIiI")
_EXITED = struct.Struct("=IIiI9q")
_HEADER = struct.Struct("=II")

STAGES = {1: "fork", 2: "spec", 3: "descriptors", 4: "setgroups", 5: "setgid", 6: "setuid", 7: "chdir",
          8: "exec"}


class InitUnavailable(RuntimeError):
    """The init binary is not there and cannot be built here (the message says what to install)."""


class InitGone(ConnectionError):
    """The sandbox's PID 1 is gone (the sandbox ended) or never answered."""


# ---------------------------------------------------------------------- the binary


def _source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def build(dest: Path, *, compiler: str | None = None) -> Path:
    """Compile the init statically into `dest` (atomically: a half-written binary is never run)."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise InitUnavailable(
            "long-lived sandboxes need contree-init, which is built with a C compiler: install the Debian "
            "packages gcc and libc6-dev (or run `make install` in a checkout)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".contree-init-", dir=dest.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, "-static", "-O2", "-o", tmp, str(SOURCE)], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise InitUnavailable(
                f"building contree-init with {cc} failed (static linking needs libc6-dev): "
                f"{done.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dest


def binary_for(home: Path) -> Path:
    """The init binary: the packaged one when it is current, else a build for this source in `home`."""
    if PACKAGED.is_file() and PACKAGED.stat().st_mtime >= SOURCE.stat().st_mtime:
        return PACKAGED
    cached = Path(home) / "bin" / f"contree-init-{_source_digest()}"
    if cached.is_file():
        return cached
    log.info("building %s", cached)
    return build(cached)


def bind_mount(binary: Path) -> dict[str, Any]:
    """The OCI mount that shows the init inside the sandbox (read-only, in the sandbox's own /dev)."""
    return {"destination": INIT_PATH, "type": "bind", "source": str(binary),
            "options": ["bind", "ro", "nosuid", "nodev"]}


# ---------------------------------------------------------------------- processes


def _decode_exit(status: int, usage: tuple[int, ...]) -> ProcessExit:
    utime, stime, rss, minflt, majflt, inblock, oublock, nvcsw, nivcsw = usage
    code: int | None
    if os.WIFSIGNALED(status):
        code, sig, core = None, os.WTERMSIG(status), os.WCOREDUMP(status)
    else:
        code, sig, core = os.WEXITSTATUS(status), None, False
    return ProcessExit(exit_code=code, signal=sig, core_dump=core, usage=ExitUsage(
        user_time=utime / 1e6, system_time=stime / 1e6, max_rss_kb=rss, minor_faults=minflt,
        major_faults=majflt, inblock=inblock, oublock=oublock, voluntary_switches=nvcsw,
        involuntary_switches=nivcsw))


@dataclass
class InitProcess:
    """A process the init started: pipes like `RunningProcess`, `wait()`, `signal()`."""

    channel: InitChannel
    id: int
    pid: int  # inside the sandbox's pid namespace
    stdin: asyncio.StreamWriter | None
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader
    exited: asyncio.Future[ProcessExit]
    pidfd: int = -1

    @property
    def host_pid(self) -> int:
        return self.pid

    async def wait(self) -> ProcessExit:
        return await asyncio.shield(self.exited)

    def signal(self, sig: int) -> None:
        """Signal the process group the process leads (it runs in a session of its own)."""
        if not self.exited.done():
            self.channel.signal(self.id, sig)



class FailedToStart(Exception):
    def __init__(self, err: int, stage: str, argv0: str) -> None:
        self.errno = err
        self.stage = stage
        text = os.strerror(err) if err > 0 else "unknown error"
        if stage == "exec" and err == errno.ENOENT:
            message = f"{argv0!r} not found in the sandbox (or not executable)"
        elif stage == "chdir":
            message = f"cannot enter the working directory: {text}"
        elif stage == "fork" and err == errno.EAGAIN:
            message = "the sandbox's process limit is reached (fork: resource temporarily unavailable)"
        else:
            message = f"{stage} failed: {text}"
        super().__init__(message)


# ---------------------------------------------------------------------- the channel


class InitChannel:
    """The engine's end of a sandbox's control socket (one per sandbox, on the engine's event loop).

    Everything the init sends is untrusted once user processes run in the sandbox: messages are checked
    for size, descriptors are accepted only where one is expected (a pidfd), unknown ids are ignored."""

    def __init__(self) -> None:
        self.sock, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._child_end: socket.socket | None = child_end
        self.sock.setblocking(False)
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[tuple[int, int]]] = {}
        # Registered before the request is sent: a process may exit before its starter is back.
        self._exits: dict[int, asyncio.Future[ProcessExit]] = {}
        self._pidfds: dict[int, int] = {}
        self._hello: asyncio.Future[tuple[int, int]] | None = None
        self._reading = False
        self.closed = False
        self.pidfd = -1  # PID 1's, from the hello (before any user process could have run)
        self.pid = -1

    def child_fd(self) -> int:
        """The descriptor to hand the runtime (to become fd 3 of the init); close it after the spawn."""
        assert self._child_end is not None
        return self._child_end.fileno()

    def child_spawned(self) -> None:
        if self._child_end is not None:
            self._child_end.close()
            self._child_end = None

    def _start_reading(self) -> None:
        if not self._reading and not self.closed:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    async def hello(self, patience: float = HELLO_TIMEOUT) -> None:
        """Wait for the init's first message; InitGone when the sandbox ended before it."""
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        self._start_reading()
        try:
            self.pid, self.pidfd = await asyncio.wait_for(asyncio.shield(self._hello), patience)
        except TimeoutError:
            raise InitGone(f"contree-init did not start within {patience:.0f} s") from None

    # ---- receiving

    def _on_readable(self) -> None:
        while not self.closed:
            try:
                data, ancdata, _flags, _ = self.sock.recvmsg(
                    256, socket.CMSG_SPACE(4 * array.array("i").itemsize), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(f"control socket: {exc}")
                return
            fds = _fds_of(ancdata)
            if not data:
                for fd in fds:
                    os.close(fd)
                self._lost("contree-init exited")
                return
            try:
                self._dispatch(data, fds)
            except Exception:
                log.exception("a message from contree-init")
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _dispatch(self, data: bytes, fds: list[int]) -> None:
        if len(data) < _HEADER.size:
            raise ValueError(f"short message ({len(data)} bytes)")
        kind, ident = _HEADER.unpack_from(data)
        pidfd = fds.pop(0) if fds and kind in (T_HELLO, T_STARTED) else -1
        for fd in fds:  # nothing else may carry descriptors
            os.close(fd)
        if kind == T_HELLO and len(data) == _HELLO.size and self._hello is not None:
            _, _, version, pid = _HELLO.unpack(data)
            if self._hello.done():
                _close(pidfd)
                return
            if version != PROTOCOL_VERSION:
                _close(pidfd)
                self._hello.set_exception(InitGone(f"contree-init speaks version {version}, "
                                                   f"the engine {PROTOCOL_VERSION}"))
                return
            self._hello.set_result((pid, pidfd))
        elif kind == T_STARTED and len(data) == _STARTED.size and ident in self._pending:
            _, _, pid = _STARTED.unpack(data)
            future = self._pending.pop(ident)
            if pidfd >= 0:
                self._pidfds[ident] = pidfd
            if not future.done():
                future.set_result((pid, pidfd))
        elif kind == T_FAILED and len(data) == _FAILED.size and ident in self._pending:
            _, _, err, stage = _FAILED.unpack(data)
            future = self._pending.pop(ident)
            self._exits.pop(ident, None)
            if not future.done():
                future.set_exception(FailedToStart(err, STAGES.get(stage, str(stage)), ""))
        elif kind == T_EXITED and len(data) == _EXITED.size and ident in self._exits:
            fields = _EXITED.unpack(data)
            exited = self._exits.pop(ident)
            _close(self._pidfds.pop(ident, -1))
            if not exited.done():
                exited.set_result(_decode_exit(fields[2], fields[4:]))
        else:
            _close(pidfd)
            log.debug("ignored message %d (%d bytes) for id %d from contree-init", kind, len(data), ident)

    def _lost(self, why: str) -> None:
        """PID 1 is gone: whatever waits learns it; processes end as killed (the namespace died)."""
        gone = InitGone(why)
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(gone)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(gone)
        self._pending.clear()
        for exited in self._exits.values():
            if not exited.done():
                exited.set_result(ProcessExit(exit_code=None, signal=int(signals.SIGKILL)))
        self._exits.clear()
        self.close()

    # ---- sending

    async def _send(self, data: bytes, fds: list[int]) -> None:
        if self.closed:
            raise InitGone("the sandbox has ended")
        loop = asyncio.get_running_loop()
        while True:
            try:
                if fds:
                    self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    self.sock.send(data)
                return
            except BlockingIOError:
                await self._writable(loop)
            except OSError as exc:
                raise InitGone(f"the sandbox has ended ({exc.strerror})") from None

    async def _writable(self, loop: asyncio.AbstractEventLoop) -> None:
        ready: asyncio.Future[None] = loop.create_future()

        def writable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(self.sock.fileno(), writable)
        try:
            await ready
        finally:
            loop.remove_writer(self.sock.fileno())

    async def spawn(self, argv: list[str], env: list[str], cwd: str, uid: int, gid: int, *,
                    stdin: bool) -> InitProcess:
        """Start `argv` in the sandbox; its stdout/stderr (and stdin) are pipes to this process."""

        spec = b"\0".join(s.encode() for s in (cwd or "/", *argv, *env)) + b"\0"
        ident = self._next_id
        self._next_id += 1
        own: list[int] = []  # our ends, kept
        theirs: list[int] = []  # the child's ends, closed once sent
        memfd = os.memfd_create("contree-exec", os.MFD_CLOEXEC)
        theirs.append(memfd)
        try:
            view = memoryview(spec)
            while view:
                view = view[os.write(memfd, view):]
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            own.append(out_r)
            theirs.append(out_w)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            own.append(err_r)
            theirs.append(err_w)
            if stdin:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                own.append(in_w)
                theirs.append(in_r)
            loop = asyncio.get_running_loop()
            started: asyncio.Future[tuple[int, int]] = loop.create_future()
            exited: asyncio.Future[ProcessExit] = loop.create_future()
            self._pending[ident] = started
            self._exits[ident] = exited
            self._start_reading()
            header = _SPAWN.pack(T_SPAWN, ident, uid, gid, F_STDIN if stdin else 0, len(argv), len(env),
                                 len(spec))
            try:
                await self._send(header, theirs)
            except BaseException:
                self._pending.pop(ident, None)
                self._exits.pop(ident, None)
                raise
            for fd in theirs:
                os.close(fd)
            theirs = []
            try:
                pid, pidfd = await started
            except FailedToStart as exc:
                raise FailedToStart(exc.errno, exc.stage, argv[0]) from None
            except asyncio.CancelledError:
                self.signal(ident, signals.SIGKILL)  # after its spawn, in order: nobody would read it
                raise
            proc = InitProcess(channel=self, id=ident, pid=pid, pidfd=pidfd, stdin=None, exited=exited,
                               stdout=await _reader(out_r), stderr=await _reader(err_r))
            own = own[2:]
            if stdin:
                proc.stdin = await _writer(in_w)
                own = []
            return proc
        finally:
            for fd in (*theirs, *own):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def signal(self, ident: int, sig: int, *, group: bool = True) -> None:
        self._post(_SIGNAL.pack(T_SIGNAL, ident, sig, F_GROUP if group else 0))

    def signal_all(self, sig: int) -> None:
        """Every process of the sandbox but PID 1 (works without a cgroup too)."""
        self._post(_SIGNAL.pack(T_SIGNAL_ALL, 0, sig, 0))

    def _post(self, data: bytes) -> None:
        if self.closed:
            return
        with contextlib.suppress(OSError):  # a full buffer or a gone init: nothing left to signal then
            self.sock.send(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._reading:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._reading = False
        self.child_spawned()
        self.sock.close()
        _close(self.pidfd)
        self.pidfd = -1
        for fd in self._pidfds.values():
            _close(fd)
        self._pidfds.clear()


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
