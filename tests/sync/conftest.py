"""Engine fixtures for the end-to-end sync test (the helpers are the tool tests' own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools.conftest import require_engine_host, seed_busybox


@pytest.fixture
def engine_home(tmp_path: Path) -> Path:
    require_engine_host()
    home = tmp_path / "engine"
    seed_busybox(home)
    return home


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path
