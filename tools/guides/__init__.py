"""What the server tells agents, rendered for the backend in use:

    *.md             the guide sections, the reference's seven then ours (get_guide, contree://guide/<section>)
    guidance.py      Guidance: `{{VALUES}}` and `<!-- if flag -->` blocks filled in for this backend
    catalog.py       describe_images(backend) -> Catalog: what each tagged image holds (shell, python…)
    instructions.py  instructions(guidance): `initialize.instructions`

This module loads the sections (GUIDES, guide_text), shared by get_guide and the resources."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from tools.guides.guidance import Guidance

GUIDES: tuple[str, ...] = (
    "workflow", "reference", "quickstart", "state", "async", "tagging", "errors", "sandboxes",
)


@cache
def _raw(section: str) -> str:
    # beside this file (importlib.resources would cost every start a few ms of imports for the same)
    return Path(__file__).with_name(f"{section}.md").read_text(encoding="utf-8")


def guide_text(section: str, guidance: Guidance | str) -> str:
    """The guide as this server should describe itself (`tools.guides.guidance`): its images, its examples.
    A bare backend kind renders it for that backend without knowing the images."""
    if isinstance(guidance, str):
        guidance = Guidance(backend_kind=guidance)
    return guidance.render(_raw(section))
