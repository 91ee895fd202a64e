"""Reaching a home's engine service, starting it when nothing answers.

`ensure_service(home)` returns the status of a ready service of a usable version:

* something answers and is ready with our version → attach;
* nothing answers (no socket, or a dead service's stale one) → run `engine serve --detach` and wait for
  it. Racing starters each run one; the home lock picks the winner, the others hear "busy" and wait for
  the winner's socket (re-launching if the lock holder goes away without serving, e.g. a service that
  was shutting down);
* an older (or unordered) version → it is asked to stop at its first idle moment; once it has exited,
  ours starts. If it is still busy after `skew_wait` seconds its clients keep it, and we attach to it when
  the control API is compatible (with a warning), else say exactly what to do;
* a newer version → attach when compatible, else say what to do.

Every failure is an `EngineStartError` with one line: "the engine at H could not start: <reason>;
log: H/engine.log".
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from contree.service.control import (
    SERVICE_API,
    ControlConnection,
    ServiceGone,
    ServiceStatus,
    ServiceUnresponsive,
    package_version,
    skew,
)
from contree.service.daemon import EXIT_BUSY, EXIT_READY
from contree.service.paths import log_path, socket_path

log = logging.getLogger("contree.service")

START_TIMEOUT = 120.0  # crash recovery of a big store may take a while; the control surface says so
SKEW_WAIT = 5.0
# The lock is held but no socket answers: a service closing its engine (it unlinks its socket first; closing
# cancels running work with a 10 s grace), or an engine that is no service. Past this, it is the latter.
NON_SERVICE_HOLDER_WAIT = 20.0
POLL = 0.02


class Reached(NamedTuple):
    status: ServiceStatus
    started: bool  # this call started the service (its engine options applied)


class EngineStartError(Exception):
    def __init__(self, home: Path, reason: str) -> None:
        log_file = log_path(home)
        where = f"; log: {log_file}" if log_file.exists() else ""
        super().__init__(f"the engine at {home} could not start: {reason}{where}")
        self.home = home
        self.reason = reason


def service_command(home: Path, options: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "contree.service", "serve", "--home", str(home), "--detach", *options]


async def ensure_service(
    home: Path,
    *,
    version: str | None = None,
    start_timeout: float = START_TIMEOUT,
    skew_wait: float = SKEW_WAIT,
    options: Sequence[str] = (),
) -> Reached:
    """`options`: `engine serve` options (engine settings) for a service this call starts."""
    version = version or package_version()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + start_timeout
    asked_to_retire = False
    started = False
    busy_since: float | None = None
    while True:
        conn = await _connect(home, deadline)
        if conn is not None:
            busy_since = None
            with conn:
                status = conn.status
                if status.state == "starting":
                    pass  # the winner of a race is opening the engine
                elif status.state == "stopping":
                    await _wait_stopping(conn, home, deadline)
                    continue
                else:
                    relation = skew(status.version, version)
                    if relation == "same":
                        return Reached(status, started)
                    if relation == "newer":
                        return Reached(_attach_other(status, version, newer=True), started)
                    if not asked_to_retire:
                        log.warning(
                            "the engine at %s runs contree-mcp %s; asking it to make way for %s",
                            home, status.version, version,
                        )
                        status = await asyncio.to_thread(conn.stop, "idle")
                        asked_to_retire = True
                    exited = await asyncio.to_thread(conn.wait_exit, skew_wait)
                    if not exited:
                        return Reached(_attach_other(status, version, newer=False), started)
                    continue
        else:
            code, message = await _launch(home, options)
            if code == EXIT_READY:
                started = True
                continue
            if code != EXIT_BUSY:
                raise EngineStartError(home, message)
            # Another process holds the lock: a racing starter's service (its socket appears within
            # milliseconds), one that is shutting down (it goes away), or an engine that is no service.
            now = loop.time()
            busy_since = busy_since if busy_since is not None else now
            if now - busy_since > NON_SERVICE_HOLDER_WAIT:
                raise EngineStartError(
                    home,
                    "another process holds the engine lock but serves no socket (an older contree-mcp "
                    "or a serve-api running the engine in-process?); stop it or use another --home",
                )
        if loop.time() >= deadline:
            reason = f"the engine service did not become ready within {start_timeout:g} s"
            raise EngineStartError(home, reason)
        await asyncio.sleep(POLL)


async def _connect(home: Path, deadline: float) -> ControlConnection | None:
    """A connection to the running service; None when nothing answers (start one). A service that is
    alive but slow (a loaded machine) is waited for, never replaced."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await asyncio.to_thread(ControlConnection, home, pin=True)
        except ServiceGone:
            return None
        except ServiceUnresponsive as exc:
            if loop.time() >= deadline:
                raise EngineStartError(home, str(exc)) from None
            log.warning("%s; waiting for it", exc)
        except OSError as exc:
            reason = f"cannot reach {socket_path(home)}: {exc.strerror or exc}"
            raise EngineStartError(home, reason) from None


async def _wait_stopping(conn: ControlConnection, home: Path, deadline: float) -> None:
    """A service that is stopping keeps the lock until it has closed the engine: wait for its exit."""
    status = conn.status
    remaining = max(0.0, deadline - asyncio.get_running_loop().time())
    wait = min(remaining, SKEW_WAIT)
    if not await asyncio.to_thread(conn.wait_exit, wait):
        work = status.running_operations + status.pending_operations
        raise EngineStartError(
            home,
            f"the engine service (pid {status.pid}) is stopping and waits for {work} operations to end; "
            f"try again when it has stopped, or run `contree-mcp engine stop --now --home {home}`",
        )


def _attach_other(status: ServiceStatus, version: str, *, newer: bool) -> ServiceStatus:
    home = Path(status.home)
    if status.api != SERVICE_API:
        if newer:
            what = f"restart this session with contree-mcp {status.version} (or newer)"
        else:
            what = (
                f"it stops when its running work ends, or run `contree-mcp engine stop --now --home {home}`"
            )
        raise EngineStartError(
            home,
            f"the engine service runs contree-mcp {status.version}, which contree-mcp {version} cannot "
            f"use; {what}",
        )
    if newer:
        log.warning("the engine at %s runs the newer contree-mcp %s; using it", home, status.version)
    else:
        log.warning(
            "the engine at %s runs contree-mcp %s and is still busy; using it until it has made way "
            "(it stops when its running work ends)", home, status.version,
        )
    return status


async def _launch(home: Path, options: Sequence[str]) -> tuple[int, str]:
    """Run `engine serve --detach` to completion: (exit status, its one-line message)."""
    started = time.monotonic()
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    try:
        proc = await asyncio.create_subprocess_exec(
            *service_command(home, options),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise EngineStartError(home, f"cannot run {sys.executable}: {exc.strerror}") from None
    out, err = await proc.communicate()
    code = proc.returncode if proc.returncode is not None else 1
    lines = (err or out).decode("utf-8", "replace").strip().splitlines()
    message = lines[-1] if lines else f"exit status {code}"
    if code == EXIT_READY:
        log.info("started the engine service at %s in %.0f ms", home, (time.monotonic() - started) * 1000)
    elif code not in (EXIT_BUSY,) and not message:
        message = f"exit status {code}"
    return code, message
