"""Root test configuration. Area conftests live beside their tests."""

from __future__ import annotations

import os

import pytest

from tests.service_util import TEST_IDLE_EXIT, service_homes, stop_service

os.environ.setdefault("CONTREE_ENGINE_IDLE_EXIT", TEST_IDLE_EXIT)

pytest_plugins = ["tests.rootless_env"]  # the session's throwaway non-root user (`rootless_user`)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop engine services that tests left running under this session's temporary directory."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    try:
        base = factory.getbasetemp()
    except (OSError, ValueError):
        return
    for home in service_homes(base):
        stop_service(home)
