"""Image references as agents write them: UUID, `tag:<tag>` or a bare tag; validated before any URL."""

from __future__ import annotations

import re

from contree.backend import Backend
from protocol.errors import ToolError

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(?:[:/.][A-Za-z0-9_-]+)*$")
TAG_MAX = 256


def is_uuid(value: str) -> bool:
    return bool(UUID_RE.match(value))


def validate_tag(tag: str) -> str:
    if len(tag) > TAG_MAX or not TAG_RE.match(tag):
        raise ToolError(
            f"Invalid tag {tag!r}: tags start with a letter or digit, use [A-Za-z0-9_-] "
            "separated by ':', '/' or '.', at most 256 characters"
        )
    return tag


def validate_uuid(value: str, what: str = "image") -> str:
    if not is_uuid(value):
        raise ToolError(f"Invalid {what} UUID {value!r}: expected 8-4-4-4-12 hexadecimal digits")
    return value.lower()


def split_ref(ref: str) -> tuple[str | None, str | None]:
    """(uuid, tag) for a reference; exactly one is set. Raises ToolError on malformed input."""
    ref = ref.strip()
    if not ref:
        raise ToolError("Image reference is empty: pass a UUID, 'tag:<tag>' or a tag")
    if is_uuid(ref):
        return ref.lower(), None
    tag = ref[4:] if ref.startswith("tag:") else ref
    return None, validate_tag(tag)


async def resolve_image(backend: Backend, ref: str) -> str:
    """A UUID for any accepted reference form (the backend is asked only for tags)."""
    uuid, tag = split_ref(ref)
    if uuid is not None:
        return uuid
    assert tag is not None
    return await backend.resolve_tag(tag)
