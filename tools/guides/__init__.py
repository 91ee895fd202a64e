"""The seven guide sections (markdown files beside this module), shared by get_guide and the resources."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from tools.guidance import Guidance

GUIDES: tuple[str, ...] = ("workflow", "reference", "quickstart", "state", "async", "tagging", "errors")


@cache
def _raw(section: str) -> str:
    # beside this file (importlib.resources would cost every start a few ms of imports for the same)
    return Path(__file__).with_name(f"{section}.md").read_text(encoding="utf-8")


def guide_text(section: str, guidance: Guidance | str) -> str:
    """The guide as this server should describe itself (`tools.guidance`): its images, its examples.
    A bare backend kind renders it for that backend without knowing the images."""
    if isinstance(guidance, str):
        guidance = Guidance(backend_kind=guidance)
    return guidance.render(_raw(section))
