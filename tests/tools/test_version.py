"""The version the server reports is pyproject.toml's, and finding it reads no package metadata."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from contree.service.control import package_version
from contree.version import VERSION
from tools.version import __version__

ROOT = Path(__file__).resolve().parents[2]


def test_the_version_is_pyprojects() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    assert VERSION == __version__ == package_version() == declared


def test_importing_the_cli_reads_no_package_metadata() -> None:
    # importlib.metadata scans sys.path for distributions: ~25 ms of every start, for a constant
    probe = "import sys, tools.cli; print('importlib.metadata' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
