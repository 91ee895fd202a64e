"""The server's own version (it reports its own, never an SDK's)."""

from __future__ import annotations

from contree.version import VERSION as __version__

__all__ = ["__version__"]
