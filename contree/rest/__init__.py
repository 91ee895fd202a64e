"""The Contree REST API served over aiohttp.web for any `Backend` (`build_app`, `main`).

Both are imported on first use: clients import `contree.rest.sse` without paying for the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from contree.rest.app import build_app
    from contree.rest.serve import main

__all__ = ["build_app", "main"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from contree.rest.app import build_app

        return build_app
    if name == "main":
        from contree.rest.serve import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
