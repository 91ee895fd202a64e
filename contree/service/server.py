"""`EngineService`: the embedded engine hosted once per home for every client, on `home/engine.sock`.

Start-up order matters for racing starters: the home lock first (the loser reports "busy" and its client
attaches to the winner), then the socket (a stale one of a dead service is replaced by an atomic rename,
so clients can tell "starting" from "nobody"), then the engine (crash recovery may take a while; the
control surface already answers `starting`). Shut-down is the reverse: the socket goes first, while the
lock is still held, so a successor never loses its socket to our clean-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from aiohttp import web

from contree.engine.local import LocalEngine
from contree.engine.runtime import rootless
from contree.engine.storage.home import prepare_home
from contree.errors import Conflict
from contree.service.app import build_service_app
from contree.service.control import (
    SERVICE_API,
    ClientInfo,
    ServiceState,
    ServiceStatus,
    StopMode,
    package_version,
)
from contree.service.daemon import startup_reason
from contree.service.idle import IdleClock, engine_blockers
from contree.service.paths import LOG_NAME, SocketAddress, address, log_path, socket_path

log = logging.getLogger("contree.service")

DEFAULT_IDLE_EXIT = 600.0
CHECK_INTERVAL = 0.25
SHUTDOWN_TIMEOUT = 3.0  # open event streams are cut after this long once the engine has closed
EXIT_BUSY = 3  # `engine serve` when another engine holds the home

Report = Callable[[Literal["ready", "busy", "error"], str], None]
_STOP_RANK = {"idle": 0, "drain": 1, "now": 2}


def _no_report(kind: str, message: str) -> None:
    return None


class EngineService:
    """Hosts `engine` (a `LocalEngine` of `home`) until stopped, idle for `idle_exit` seconds or
    signalled. `created_home`: the home did not exist before this start, so a failed start removes
    what it made (keeping the log it points to). `socket`: listen there instead of `home/engine.sock`
    (the machine's shared service, `contree.service.system`); `socket_group`: the gid whose members may
    connect (mode 0660), else the socket is the owner's alone (0600)."""

    def __init__(
        self,
        home: Path,
        *,
        idle_exit: float | None = DEFAULT_IDLE_EXIT,
        version: str | None = None,
        engine: LocalEngine | None = None,
        created_home: bool = False,
        handle_signals: bool = True,
        api: int = SERVICE_API,
        socket: Path | None = None,
        socket_group: int | None = None,
    ) -> None:
        self.home = Path(home)
        self.socket = Path(socket) if socket is not None else socket_path(self.home)
        self.socket_group = socket_group
        self._socket_lock = -1
        # A shared service reads local image archives for no one: a client's own roots are only
        # honoured for clients of the service's own uid (app.py).
        self.engine = engine if engine is not None else LocalEngine(
            self.home, import_roots=() if socket_group is not None else None)
        self.version = version or package_version()
        self.api = api  # only version-skew tests report another level
        self.created_home = created_home
        self.handle_signals = handle_signals  # False when hosted inside another program (tests)
        self.state: ServiceState = "starting"
        self.engine_open = False
        self.started_at = time.time()
        self.clients: dict[object, ClientInfo] = {}
        self.stop_mode: StopMode | None = None
        self.closing = asyncio.Event()  # set when the service begins to shut down: attach streams end
        self._wake = asyncio.Event()
        self._engine_blockers = engine_blockers(self.engine)
        self.idle = IdleClock([self._clients_blocker, *self._engine_blockers], idle_exit)
        self._address: SocketAddress | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ state

    def _clients_blocker(self) -> str | None:
        return f"{len(self.clients)} clients attached" if self.clients else None

    def wake(self) -> None:
        self._wake.set()

    def request_stop(self, mode: StopMode) -> None:
        """Stop (`now`), stop once running work is done (`drain`), or at the first moment no operation
        runs (`idle`). A stronger request upgrades a weaker one, never the reverse."""
        if self.stop_mode is None or _STOP_RANK[mode] > _STOP_RANK[self.stop_mode]:
            self.stop_mode = mode
            if mode == "idle":
                self.state = "retiring" if self.state == "ready" else self.state
            elif self.state != "starting":
                self.state = "stopping"
            log.info("stop requested (%s)", mode)
        self.wake()

    def status(self) -> ServiceStatus:
        queue = self.engine.queue
        return ServiceStatus(
            version=self.version,
            api=self.api,
            pid=rootless.host_pid(),  # a rootless engine runs in a pid namespace of its own
            home=str(self.home),
            socket=str(self.socket),
            log=str(log_path(self.home)),
            state=self.state,
            started_at=self.started_at,
            uptime=time.time() - self.started_at,
            clients=list(self.clients.values()),
            running_operations=queue.running() if queue is not None else 0,
            pending_operations=queue.pending() if queue is not None else 0,
            idle_exit=self.idle.idle_exit,
            idle_for=self.idle.idle_for,
            busy=self.idle.reasons(),
        )

    # ------------------------------------------------------------------ life

    async def serve(self, report: Report = _no_report) -> int:
        """Lock the home, listen, open the engine, serve until stopped. Returns the exit status."""
        log.info("contree-mcp %s engine service starting at %s (pid %d)", self.version, self.home,
                 os.getpid())
        try:
            prepare_home(self.home)  # private (0700, ours) before the lock and the socket go into it
            await self.engine.lock_home()
            if self.socket != socket_path(self.home):
                self._lock_socket()
        except Conflict as exc:
            report("busy", exc.message)
            return EXIT_BUSY
        except OSError as exc:
            report("error", startup_reason(exc))
            return 1
        try:
            await self._listen()
            await self.engine.start()
        except Exception as exc:
            log.error("the engine could not start", exc_info=True)
            await self._abort_start()
            report("error", startup_reason(exc))
            return 1
        except BaseException:
            await self._abort_start()
            raise
        self.engine_open = True
        # a stop asked for while the engine opened takes effect now
        if self.stop_mode is None:
            self.state = "ready"
        elif self.stop_mode == "idle":
            self.state = "retiring"
        else:
            self.state = "stopping"
        log.info("contree-mcp %s engine service ready at %s (pid %d)", self.version, self.home, os.getpid())
        report("ready", str(self.socket))
        if self.handle_signals:
            self._handle_signals()
        try:
            await self._run_until_stopped()
        finally:
            await self._shutdown()
        return 0

    def _lock_socket(self) -> None:
        """A socket outside the home is held by a lock file beside it: the home lock cannot stop another
        home's service from taking the same path."""
        if not self.socket.parent.is_dir():
            self.socket.parent.mkdir(parents=True)
            self.socket.parent.chmod(0o711)  # members traverse it to the socket; nobody lists it
        path = self.socket.with_name(self.socket.name + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Conflict(f"another engine service listens on {self.socket}") from None
        self._socket_lock = fd

    async def _listen(self) -> None:
        """Bind a fresh socket beside the final path, make it 0600 (0660 to `socket_group`), then rename
        it over the final path (replacing a dead service's socket atomically)."""
        self._address = address(self.socket)
        tmp = SocketAddress(self.socket.parent, f".{self.socket.name}.{secrets.token_hex(6)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp.path)
            if self.socket_group is None:
                os.chmod(tmp.path, 0o600)
            else:
                os.chown(tmp.path, -1, self.socket_group)
                os.chmod(tmp.path, 0o660)
            os.rename(tmp.path, self._address.path)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp.path)
            raise
        finally:
            tmp.close()
        runner = web.AppRunner(build_service_app(self), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        self._runner = runner
        await runner.setup()
        await web.SockSite(runner, sock).start()

    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        self.request_stop("now")

    async def _run_until_stopped(self) -> None:
        while True:
            self.idle.check()
            mode = self.stop_mode
            if mode == "now":
                return
            if mode in ("drain", "idle") and not any(b() for b in self._engine_blockers):
                log.info("no running work left: stopping (%s)", mode)
                return
            if mode is None and self.idle.expired():
                log.info("idle for %.0f s: stopping", self.idle.idle_for or 0)
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CHECK_INTERVAL)

    async def _shutdown(self) -> None:
        self.state = "stopping"
        self.closing.set()
        self._unlink_socket()  # while we still hold the lock: the path cannot be a successor's yet
        try:
            await self.engine.close()  # cancels what still runs; sandboxes, mounts and rules go here
        except Exception:
            log.exception("closing the engine failed")
        finally:
            self.engine_open = False
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
            if self._address is not None:
                self._address.close()
        log.info("engine service stopped")

    async def _abort_start(self) -> None:
        self.closing.set()
        self._unlink_socket()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(Exception):
            await self.engine.close()
        if self._address is not None:
            self._address.close()
        if self.created_home:
            _remove_fresh_home(self.home)

    def _unlink_socket(self) -> None:
        if self._address is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._address.path)
        if self._socket_lock >= 0:  # after the unlink: a successor then binds a path that is free
            os.close(self._socket_lock)
            self._socket_lock = -1


def _remove_fresh_home(home: Path) -> None:
    """A home this failed start created keeps only its log (the error message points there), or goes
    away when there is none; nothing is removed while anything is still mounted below it."""
    if _mounted_below(home):
        log.warning("not cleaning %s: something is still mounted below it", home)
        return
    for entry in home.iterdir():
        if entry.name == LOG_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    with contextlib.suppress(OSError):  # gone entirely unless the log is there
        home.rmdir()


def _mounted_below(path: Path) -> bool:
    prefix = str(path.resolve()).rstrip("/") + "/"
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4].startswith(prefix) for line in f)
    except OSError:
        return True

