"""Host prerequisites shared by the test packages that drive the embedded engine: a missing one fails the
test with the Debian package to install (never a silent skip)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def require_engine_host(root_reason: str) -> None:
    """Root (else fail with `root_reason`), crun and busybox (on PATH or in /bin)."""
    if os.geteuid() != 0:
        pytest.fail(root_reason)
    for binary, package in (("crun", "crun"), ("busybox", "busybox-static")):
        if shutil.which(binary) is None and not Path(f"/bin/{binary}").exists():
            pytest.fail(f"{binary} not found: install the Debian package {package}")
