"""Engine fixtures for the end-to-end sync test: the tool tests' own, re-exported."""

from __future__ import annotations

from tests.tools.conftest import engine_home, workdir

__all__ = ["engine_home", "workdir"]
