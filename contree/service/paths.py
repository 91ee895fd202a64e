"""Where an engine home keeps its service's socket and log, and how to reach a socket whose path is too
long for `sockaddr_un` (108 bytes): through `/proc/self/fd/<home fd>/engine.sock`."""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_NAME = "engine.sock"
LOG_NAME = "engine.log"
SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes including the terminating NUL


def socket_path(home: Path) -> Path:
    return home / SOCKET_NAME


def address(socket: Path) -> SocketAddress:
    """A `SocketAddress` of any socket path (a shared service's socket lives outside its home)."""
    return SocketAddress(socket.parent, socket.name)


def log_path(home: Path) -> Path:
    return home / LOG_NAME


class SocketAddress:
    """A path `bind`/`connect` accept for `home/<name>`: the path itself when it fits, else the same file
    reached through an open descriptor of `home` (kept open until `close`)."""

    def __init__(self, home: Path, name: str = SOCKET_NAME) -> None:
        self.real = home / name
        self._fd = -1
        if len(os.fsencode(self.real)) <= SUN_PATH_MAX:
            self.path = str(self.real)
        else:
            self._fd = os.open(home, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.path = f"/proc/self/fd/{self._fd}/{name}"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SocketAddress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
