"""A throwaway non-root user who installed the project the way the README says, for the tests of what a
normal user meets (the rootless engine).

`rootless_user` (one per session, it takes ~10 s): `useradd --create-home` (which also gives the user the
next free subordinate id range), a venv of the user's own made with Debian's python3, and the project
installed into it as the user from a wheel built from this checkout (with its dependencies' wheels, so
the user's pip needs no index). At the end, whatever happened: the user's engine services are stopped,
every process left of the user (or of its subordinate ids) is killed through a pidfd, and
`userdel --remove` deletes the account, its home and its subordinate ranges.

A missing prerequisite fails the test naming the Debian package, never skips it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.service_util import service_homes, stop_service

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"
PREREQUISITES = (
    ("useradd", "passwd"), ("userdel", "passwd"), ("newuidmap", "uidmap"), ("newgidmap", "uidmap"),
    ("crun", "crun"), ("pasta", "passt"), ("iptables-restore", "iptables"), ("ip", "iproute2"),
    ("busybox", "busybox-static"), ("unshare", "util-linux"), ("nsenter", "util-linux"),
    ("prlimit", "util-linux"), ("setpriv", "util-linux"),
)
USER_PATH = "/usr/local/bin:/usr/bin:/bin"  # a login's PATH: no /usr/sbin, as for most users


def require_rootless_prerequisites() -> None:
    if os.geteuid() != 0:
        pytest.fail("the rootless tests create a throwaway user and need root")
    for binary, package in PREREQUISITES:
        if shutil.which(binary) is None and not any(Path(d, binary).exists() for d in ("/usr/sbin", "/sbin",
                                                                                         "/bin")):
            pytest.fail(f"{binary} not found: install the Debian package {package}")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.fail(f"{SYSTEM_PYTHON} cannot make venvs: install the Debian package python3-venv")


@dataclass
class RootlessUser:
    name: str
    uid: int
    gid: int
    home: Path

    @property
    def venv(self) -> Path:
        return self.home / "venv"

    @property
    def engine_home(self) -> Path:
        """The default engine home of `contree-mcp` for this user."""
        return self.home / ".local" / "share" / "contree-mcp"

    @property
    def contree_mcp(self) -> str:
        return str(self.venv / "bin" / "contree-mcp")

    def env(self, **extra: str) -> dict[str, str]:
        """A login-like environment: no Contree settings, the user's own HOME and PATH; never a shared
        engine service this machine may run (only the test that starts one points at it)."""
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "PATH": USER_PATH,
                "LANG": "C.UTF-8", "CONTREE_ENGINE_IDLE_EXIT": "120s", "PYTHONUNBUFFERED": "1",
                "CONTREE_ENGINE_SYSTEM_SOCKET": "off", **extra}

    def as_user(self, argv: Sequence[str], *, groups: bool = False) -> list[str]:
        """`argv` run as this user, for launchers that take a command line: no supplementary groups, or
        (`groups`) those /etc/group gives the user, as a login would."""
        return ["/usr/bin/setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                "--init-groups" if groups else "--clear-groups", "--", *argv]

    def run(self, argv: Sequence[str], *, timeout: float = 300, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(list(argv), user=self.uid, group=self.gid, extra_groups=[], cwd=self.home,
                             env=self.env(**(env or {})), capture_output=True, text=True, timeout=timeout,
                             check=False)
        if check and res.returncode != 0:
            pytest.fail(f"{' '.join(argv)} as {self.name} failed ({res.returncode}): "
                        f"{res.stderr or res.stdout}")
        return res

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`contree-mcp <args>` as the user runs it."""
        return self.run([self.contree_mcp, *args], timeout=timeout, check=check)

    def subordinate(self, file: str) -> tuple[int, int]:
        for line in Path("/etc", file).read_text().splitlines():
            owner, _, rest = line.partition(":")
            if owner == self.name:
                start, _, count = rest.partition(":")
                return int(start), int(count)
        raise AssertionError(f"useradd gave {self.name} no range in /etc/{file}")

    def owns(self, uid: int) -> bool:
        if uid == self.uid:
            return True
        try:
            start, count = self.subordinate("subuid")
        except AssertionError:  # made without subordinate ids
            return False
        return start <= uid < start + count

    def kill_all(self, patience: float = 30.0) -> None:
        """SIGKILL every process running as the user or one of its subordinate ids, each through a
        pidfd whose owner is checked after it was opened (never a pid that could have been recycled)."""
        deadline = time.monotonic() + patience
        while True:
            found = 0
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    pidfd = os.pidfd_open(int(entry))
                except OSError:
                    continue
                try:
                    if self.owns(_real_uid(int(entry))):
                        found += 1
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except (OSError, ValueError):
                    pass
                finally:
                    os.close(pidfd)
            if not found or time.monotonic() > deadline:
                return
            time.sleep(0.1)


def _real_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise ValueError("no Uid line")


def build_wheelhouse(target: Path) -> None:
    """Wheels of this checkout and of its dependencies in `target` (a copy of its files, new ones too but
    not what git ignores, is built, so the checkout gets no build/ directory)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout
    source = target.parent / "source"
    source.mkdir()
    for name in files.decode().split("\0"):
        if name and (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(target), str(source)],
                         capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0:
        pytest.fail(f"building the project's wheels failed: {res.stderr[-2000:]}")
    shutil.rmtree(source)


@contextlib.contextmanager
def throwaway_rootless_user(*, subordinate_ids: bool = True) -> Iterator[RootlessUser]:
    """`subordinate_ids=False`: a user `useradd` gave no subordinate range (the single-id fallback)."""
    require_rootless_prerequisites()
    shared = Path(tempfile.mkdtemp(prefix="contree-wheels-", dir="/var/tmp"))
    shared.chmod(0o755)
    name = f"ctr{secrets.token_hex(4)}"
    created = False
    try:
        wheels = shared / "wheels"
        wheels.mkdir(mode=0o755)
        build_wheelhouse(wheels)
        for path in wheels.iterdir():
            path.chmod(0o644)
        counts = [] if subordinate_ids else ["-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0"]
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", *counts, name], check=True,
                       capture_output=True)
        created = True
        pw = pwd.getpwnam(name)
        user = RootlessUser(name=name, uid=pw.pw_uid, gid=pw.pw_gid, home=Path(pw.pw_dir))
        user.run([SYSTEM_PYTHON, "-m", "venv", str(user.venv)])
        user.run([str(user.venv / "bin" / "pip"), "install", "-q", "--no-index", "--find-links", str(wheels),
                  "contree-mcp"])
        yield user
    finally:
        if created:
            pw = pwd.getpwnam(name)
            user = RootlessUser(name=name, uid=pw.pw_uid, gid=pw.pw_gid, home=Path(pw.pw_dir))
            for home in service_homes(user.home, depth=6):
                with contextlib.suppress(Exception):
                    stop_service(home, timeout=20)
            user.kill_all()
            res = subprocess.run(["userdel", "--force", "--remove", name], capture_output=True, text=True,
                                 check=False)
            if res.returncode not in (0, 12):  # 12: the mail spool was missing
                raise AssertionError(f"userdel {name} failed: {res.stderr}")
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture(scope="session")
def rootless_user() -> Iterator[RootlessUser]:
    with throwaway_rootless_user() as user:
        yield user
