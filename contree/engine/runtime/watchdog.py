"""A process beside the engine's that outlives it: sandboxes die with their deadline and with the engine.

Sandboxes run in processes of their own (the OCI runtime, in a session of its own) that survive the
process hosting `LocalEngine`, whatever that process is (an MCP server, the engine service, a test).
The kernel has nothing that ends them with it: PDEATHSIG follows the runtime's parent thread, not the
engine, and only ends the runtime, whose container lives on; a cgroup or pid namespace must still be
killed by someone. So each engine starts one small watchdog (`python -m contree.engine.runtime.watchdog`, in
its own session, ~11 MB, heavy imports only when it has work) holding a pidfd of the engine's process
and the read end of a pipe on which the engine announces each sandbox's deadline:

* the engine process dies (SIGKILL, OOM kill, a crash): the pidfd turns readable and the watchdog does
  at once what the next start on that home would do, `spawn_recover.release_dead_engine`: every
  sandbox killed; cgroups, runtime state, bundles, rootfs binds, network namespaces, iptables chains
  and the overlay mounts in the home released;
* a sandbox outlives its deadline by `GRACE` seconds while the engine process lives (stopped, or its
  event loop stuck): the watchdog kills the sandbox's cgroup, the engine finds it dead when it resumes;
* the engine closes: it says `stop` and the watchdog exits without touching anything.

What it did is appended to `<home>/watchdog.log`.

If the watchdog itself dies, the engine starts a new one at its next message (and tells it every
deadline still pending). Only a SIGKILL of both at once leaves the clean-up to the next start.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

GRACE = 5.0  # seconds past a deadline before the watchdog kills what the engine did not
LOG_NAME = "watchdog.log"  # in the home: what the watchdog did (rarely anything)


class Watchdog:
    """The engine's side: starts the watchdog process and tells it the sandboxes' deadlines."""

    def __init__(self, *, engine_id: str, cgroup_parent: str, home: Path, runtime_root: Path | None = None
                 ) -> None:
        self.settings = {"engine_id": engine_id, "cgroup_parent": cgroup_parent, "home": os.fspath(home),
                         "runtime_root": os.fspath(runtime_root or "")}
        self._deadlines: dict[str, float] = {}  # sandbox id -> time.monotonic() deadline
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, *, engine_id: str, cgroup_parent: str, home: Path, runtime_root: Path | None = None
              ) -> Watchdog:
        dog = cls(engine_id=engine_id, cgroup_parent=cgroup_parent, home=home, runtime_root=runtime_root)
        dog._spawn()
        return dog

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _spawn(self) -> None:
        # Its own log in the home, not the engine's stderr: a pipe held by the watchdog would keep the
        # reader of a dead engine's stderr (an MCP client, a test) waiting for EOF.
        logfile = os.open(Path(self.settings["home"]) / LOG_NAME,
                          os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        engine = os.pidfd_open(os.getpid())  # this process, whatever hosts the engine
        try:
            package_root = Path(__file__).resolve().parents[3]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_root), env.get("PYTHONPATH")) if p)
            settings = json.dumps({**self.settings, "pidfd": engine})
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "contree.engine.runtime.watchdog", settings], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=logfile, pass_fds=(engine,), start_new_session=True,
                cwd="/", env=env, bufsize=0)
        finally:
            os.close(engine)
            os.close(logfile)
        assert self._proc.stdin is not None
        os.set_blocking(self._proc.stdin.fileno(), False)  # a stopped watchdog never blocks the engine
        for sid, at in self._deadlines.items():
            self._send(f"deadline {sid} {at!r}")

    def _send(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        try:
            if proc.poll() is not None:
                raise BrokenPipeError
            if proc.stdin.write(f"{line}\n".encode()) is None:
                raise BlockingIOError
        except BlockingIOError:
            # Its pipe is full (stopped, or far behind): this deadline is only the engine's to keep.
            log.warning("the engine's watchdog (pid %d) does not read its pipe; %r dropped", proc.pid, line)
        except (BrokenPipeError, ValueError):
            log.error("the engine's watchdog (pid %d) died (status %s); starting a new one", proc.pid,
                      proc.poll())
            self._proc = None
            self._spawn()

    def deadline(self, sandbox_id: str, at: float) -> None:
        """Sandbox `sandbox_id` must be dead by `at` (time.monotonic(), the system's CLOCK_MONOTONIC)."""
        self._deadlines[sandbox_id] = at
        self._send(f"deadline {sandbox_id} {at!r}")

    def done(self, sandbox_id: str) -> None:
        """The sandbox is gone (its engine cleaned it up)."""
        if self._deadlines.pop(sandbox_id, None) is not None:
            self._send(f"done {sandbox_id}")

    def stop(self) -> None:
        """The engine closed cleanly: the watchdog exits without doing anything (reaped by subprocess's
        own bookkeeping if it has not exited yet)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.stdin is None:
            return
        deadline = time.monotonic() + 1.0
        while True:
            try:
                if proc.stdin.write(b"stop\n") is not None:
                    break
            except BlockingIOError:
                pass
            except BrokenPipeError:
                break
            if time.monotonic() > deadline:
                break  # stuck: it then waits for this process to exit and finds nothing left to release
            time.sleep(0.01)  # its pipe is full: let it catch up
        proc.stdin.close()
        proc.poll()


# ---------------------------------------------------------------------- the watchdog process


class _Watch:
    def __init__(self, settings: dict[str, object]) -> None:
        self.engine_id = str(settings["engine_id"])
        self.cgroup_parent = str(settings["cgroup_parent"])
        self.home = Path(str(settings["home"]))
        self.pidfd = int(str(settings["pidfd"]))
        self.runtime_root = str(settings.get("runtime_root") or "")
        self.deadlines: dict[str, float] = {}
        self.pending = b""

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        poller.register(0, select.POLLIN)
        while True:
            wait = None
            if self.deadlines:
                wait = max(0, int((min(self.deadlines.values()) + GRACE - time.monotonic()) * 1000) + 1)
            ready = {fd for fd, _ in poller.poll(wait)}
            if self.pidfd in ready or self._engine_gone():
                self._release()
                return
            if 0 in ready:
                data = os.read(0, 65536)
                if not data:
                    poller.unregister(0)  # closed without `stop`: keep watching the engine itself
                elif self._commands(data):
                    return
            self._enforce()

    def _engine_gone(self) -> bool:
        return bool(select.select([self.pidfd], [], [], 0)[0])

    def _commands(self, data: bytes) -> bool:
        """Apply complete lines; True on `stop`."""
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            word, _, rest = line.decode().partition(" ")
            if word == "stop":
                return True
            if word == "deadline":
                sid, _, at = rest.partition(" ")
                self.deadlines[sid] = float(at)
            elif word == "done":
                self.deadlines.pop(rest, None)
        return False

    def _enforce(self) -> None:
        now = time.monotonic()
        late = [sid for sid, at in self.deadlines.items() if at + GRACE <= now]
        if not late:
            return
        from contree.engine.runtime import hostcheck, rootless
        from contree.engine.runtime.cgroups import CgroupManager
        from contree.engine.runtime.rootless.limits import RuntimeStateKiller

        cgroups: CgroupManager | RuntimeStateKiller
        if rootless.active() and not self.cgroup_parent:  # no cgroup: the init, from the runtime's state
            cgroups = RuntimeStateKiller(Path(self.runtime_root))
        else:
            cgroups = CgroupManager(hostcheck.detect(), self.cgroup_parent)
        for sid in late:
            del self.deadlines[sid]
            if cgroups.exists(sid):
                log.warning("engine %s: sandbox %s outlived its deadline by %.0f s; killed it",
                            self.engine_id, sid, GRACE)
                cgroups.kill_all(sid, signal.SIGKILL)

    def _release(self) -> None:
        from contree.engine.runtime import rootless
        from contree.engine.runtime.recovery import release_dead_engine

        if rootless.active():
            return  # the engine's pid and mount namespaces end everything (and this process) with it

        actions = release_dead_engine(self.engine_id, self.home)
        if actions:
            log.warning("engine %s died; released what it left: %s", self.engine_id, "; ".join(actions))


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # ends with the engine, never with its terminal or service
    logging.raiseExceptions = False  # a full disk must not stop the clean-up
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    _Watch(json.loads(argv[1])).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
