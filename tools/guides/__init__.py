"""The seven guide sections (markdown files beside this module), shared by get_guide and the resources."""

from __future__ import annotations

from functools import cache
from importlib import resources

GUIDES: tuple[str, ...] = ("workflow", "reference", "quickstart", "state", "async", "tagging", "errors")


@cache
def _raw(section: str) -> str:
    return resources.files("tools.guides").joinpath(f"{section}.md").read_text(encoding="utf-8")


def guide_text(section: str, backend_kind: str) -> str:
    """The guide as this server should describe itself: 'sandbox' locally, 'microVM' on the cloud."""
    return _raw(section).replace("{{SANDBOX}}", "sandbox" if backend_kind == "local" else "microVM")
