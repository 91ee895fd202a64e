"""Protocol revisions this server speaks, the two eras, the wire features each revision gates, log levels.

Handshake era (2024-11-05 … 2025-11-25): `initialize` negotiates one revision for the connection.
Stateless era (2026-07-28): every request names its revision in `_meta` (or the HTTP header); the server
answers each request on its own.
"""

from __future__ import annotations

V2024_11_05 = "2024-11-05"
V2025_03_26 = "2025-03-26"
V2025_06_18 = "2025-06-18"
V2025_11_25 = "2025-11-25"
V2026_07_28 = "2026-07-28"

# What `initialize` negotiates (oldest first).
SUPPORTED: tuple[str, ...] = (V2024_11_05, V2025_03_26, V2025_06_18, V2025_11_25)
LATEST = V2025_11_25
# What a request's `_meta` may name (oldest first).
MODERN: tuple[str, ...] = (V2026_07_28,)
# `server/discover`'s supportedVersions and the `supported` list of -32022: both eras, newest first, so a
# dual-era client can pick either (the spec's own example lists a handshake revision there too).
ADVERTISED: list[str] = [*reversed(MODERN), *reversed(SUPPORTED)]

LEVELS: dict[str, int] = {
    "debug": 0,
    "info": 1,
    "notice": 2,
    "warning": 3,
    "error": 4,
    "critical": 5,
    "alert": 6,
    "emergency": 7,
}


def negotiate(requested: object) -> str:
    """Echo a supported handshake revision; answer anything else with our latest (the client decides)."""
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
    """icons, Implementation.description/websiteUrl."""
    return version >= V2025_11_25


def has_execution(version: str) -> bool:
    """Tool `execution` (the experimental tasks of 2025-11-25; 2026-07-28 moved tasks to an extension)."""
    return version == V2025_11_25


def is_modern(version: str) -> bool:
    """resultType on every result, caching hints, serverInfo in result `_meta`, input-required results."""
    return version >= V2026_07_28


def allows_batches(version: str | None) -> bool:
    """Batches were removed in 2025-06-18; before initialize the version is unknown."""
    return version is None or version < V2025_06_18
