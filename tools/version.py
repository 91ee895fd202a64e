"""The installed package version (the server reports its own version, never an SDK's)."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    try:
        return metadata.version("contree-mcp")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "0.0.0+source"


__version__ = package_version()
