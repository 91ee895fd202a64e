"""The seven guide sections (markdown files beside this module), shared by get_guide and the resources."""

from __future__ import annotations

from functools import cache
from importlib import resources

from tools.guidance import Guidance

GUIDES: tuple[str, ...] = ("workflow", "reference", "quickstart", "state", "async", "tagging", "errors")


@cache
def _raw(section: str) -> str:
    return resources.files("tools.guides").joinpath(f"{section}.md").read_text(encoding="utf-8")


def guide_text(section: str, guidance: Guidance | str) -> str:
    """The guide as this server should describe itself (`tools.guidance`): its images, its examples.
    A bare backend kind renders it for that backend without knowing the images."""
    if isinstance(guidance, str):
        guidance = Guidance(backend_kind=guidance)
    return guidance.render(_raw(section))
