"""The Contree REST API served over aiohttp.web for any `Backend` (`build_app`, `main`)."""

from contree.rest.app import build_app
from contree.rest.serve import main

__all__ = ["build_app", "main"]
