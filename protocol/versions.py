"""Protocol revisions this server negotiates and the wire features each one gates."""

from __future__ import annotations

V2024_11_05 = "2024-11-05"
V2025_03_26 = "2025-03-26"
V2025_06_18 = "2025-06-18"
V2025_11_25 = "2025-11-25"

SUPPORTED: tuple[str, ...] = (V2024_11_05, V2025_03_26, V2025_06_18, V2025_11_25)
LATEST = V2025_11_25


def negotiate(requested: object) -> str:
    """Echo a supported revision; answer anything else with our latest (the client decides)."""
    if isinstance(requested, str) and requested in SUPPORTED:
        return requested
    return LATEST


# Revision strings are ISO dates, so string comparison orders them.
def has_annotations(version: str) -> bool:
    """Tool annotations, audio content, progress `message`, `completions` capability."""
    return version >= V2025_03_26


def has_structured(version: str) -> bool:
    """outputSchema, structuredContent, title fields, resource_link, _meta."""
    return version >= V2025_06_18


def has_icons(version: str) -> bool:
    """icons, Implementation.description/websiteUrl, execution."""
    return version >= V2025_11_25


def allows_batches(version: str | None) -> bool:
    """Batches were removed in 2025-06-18; before initialize the version is unknown."""
    return version is None or version < V2025_06_18
