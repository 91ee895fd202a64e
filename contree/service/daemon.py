"""`engine serve --detach`: the service leaves its starter behind.

The process forks before any event loop or thread exists. The child starts a new session (no signal
meant for the starter's process group or terminal reaches it), puts stdin on /dev/null and stdout/stderr
on `home/engine.log`, and later writes one line to a pipe: `ready <socket>`, `busy <why>` or
`error <why>`. The parent relays that line (stdout for ready/busy, stderr for error) and exits 0, 3 or 1,
so a starter simply runs `engine serve --detach` to completion and never owns the long-lived process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import sys
from pathlib import Path

from contree.service.paths import log_path

LOG_ROTATE_BYTES = 4 << 20
EXIT_READY, EXIT_ERROR, EXIT_BUSY = 0, 1, 3


def startup_reason(exc: BaseException) -> str:
    """One line saying why the engine could not start (a traceback goes to the log only)."""
    message = getattr(exc, "message", None)  # BackendError
    if isinstance(message, str):
        text = message
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


class ReadyPipe:
    """The child's end: the first report is written, later ones are ignored."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def report(self, kind: str, message: str) -> None:
        if self.fd < 0:
            return
        line = f"{kind} {' '.join(message.split())}\n".encode("utf-8", "replace")
        with contextlib.suppress(OSError):  # the parent is gone (killed): nobody to tell
            os.write(self.fd, line)
        os.close(self.fd)
        self.fd = -1


class DetachError(Exception):
    """The home or its log cannot be prepared; nothing was started."""


def open_log(home: Path) -> int:
    """The service log (appending, 0600), rotated once it has grown past LOG_ROTATE_BYTES."""
    path = log_path(home)
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def detach(home: Path, *, timeout: float) -> ReadyPipe:
    """Fork; only the child returns. Raises DetachError (before forking) when the home is unusable."""
    from contree.engine.storage.home import prepare_home

    try:
        prepare_home(home)  # refused (another user's, reachable by others) before a log goes into it
        if _lock_is_held(home):
            # another engine holds the home (a racing starter's service, most often): say so at once,
            # without loading the engine only to learn it
            print(f"busy another engine holds {home}", flush=True)
            raise SystemExit(EXIT_BUSY)
        log_fd = open_log(home)
    except OSError as exc:  # UnsafeHome is one: its message names the fix
        raise DetachError(startup_reason(exc)) from None
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        os.close(write_fd)
        os.close(log_fd)
        os._exit(_relay(read_fd, home, timeout))
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    os.chdir("/")  # never pin the starter's working directory (a mount, a deleted checkout)
    os.umask(0o077)
    return ReadyPipe(write_fd)


def _lock_is_held(home: Path) -> bool:
    """Whether another process holds the home's engine lock. The test takes the lock for an instant: an
    engine starting just then waits out its lock grace and gets it."""
    fd = os.open(home / "engine.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the only descriptor of this open file releases a lock we took
    return False


def _relay(read_fd: int, home: Path, timeout: float) -> int:
    """The parent's side: wait for the child's line and pass it on."""
    data = b""
    ready, _, _ = select.select([read_fd], [], [], timeout)
    if ready:
        while chunk := os.read(read_fd, 4096):
            data += chunk
    line = data.decode("utf-8", "replace").strip()
    kind, _, message = line.partition(" ")
    if kind == "ready":
        print(line, flush=True)
        return EXIT_READY
    if kind == "busy":
        print(line, flush=True)
        return EXIT_BUSY
    if kind == "error":
        print(message, file=sys.stderr, flush=True)
        return EXIT_ERROR
    if not ready:
        print(f"not ready after {timeout:g} s", file=sys.stderr, flush=True)
    else:
        print("the engine process exited during start-up", file=sys.stderr, flush=True)
    return EXIT_ERROR
