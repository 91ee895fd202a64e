"""MCP content blocks (tool results, prompt messages) and resource contents, as msgspec Structs."""

from __future__ import annotations

import base64
from typing import Any, Literal

import msgspec

from protocol import versions


class Annotations(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    audience: list[Literal["user", "assistant"]] | None = None
    priority: float | None = None
    last_modified: str | None = None


class ResourceContents(msgspec.Struct, rename="camel", omit_defaults=True):
    """One `contents` item of resources/read: exactly one of `text` or `blob` (base64)."""

    uri: str
    mime_type: str | None = None
    text: str | None = None
    blob: str | None = None
    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")

    @classmethod
    def from_bytes(
        cls, uri: str, data: bytes, mime_type: str | None = None, meta: dict[str, Any] | None = None
    ) -> ResourceContents:
        return cls(uri, mime_type, blob=base64.b64encode(data).decode("ascii"), meta=meta)


class TextContent(msgspec.Struct, tag="text", tag_field="type", omit_defaults=True):
    text: str
    annotations: Annotations | None = None


class ImageContent(msgspec.Struct, tag="image", tag_field="type", rename="camel", omit_defaults=True):
    data: str  # base64
    mime_type: str
    annotations: Annotations | None = None

    @classmethod
    def from_bytes(cls, data: bytes, mime_type: str) -> ImageContent:
        return cls(base64.b64encode(data).decode("ascii"), mime_type)


class AudioContent(msgspec.Struct, tag="audio", tag_field="type", rename="camel", omit_defaults=True):
    data: str  # base64
    mime_type: str
    annotations: Annotations | None = None

    @classmethod
    def from_bytes(cls, data: bytes, mime_type: str) -> AudioContent:
        return cls(base64.b64encode(data).decode("ascii"), mime_type)


class ResourceLink(msgspec.Struct, tag="resource_link", tag_field="type", rename="camel", omit_defaults=True):
    uri: str
    name: str
    title: str | None = None
    description: str | None = None
    mime_type: str | None = None
    size: int | None = None
    annotations: Annotations | None = None


class EmbeddedResource(msgspec.Struct, tag="resource", tag_field="type", omit_defaults=True):
    resource: ResourceContents
    annotations: Annotations | None = None


Content = TextContent | ImageContent | AudioContent | ResourceLink | EmbeddedResource


def for_version(blocks: list[Content], version: str) -> list[Content]:
    """Replace blocks the negotiated revision cannot carry by a text block saying what they were."""
    if versions.has_structured(version):
        return blocks
    out: list[Content] = []
    for block in blocks:
        if isinstance(block, AudioContent) and not versions.has_annotations(version):
            out.append(
                TextContent(f"[audio content of type {block.mime_type} omitted: needs MCP 2025-03-26]")
            )
        elif isinstance(block, ResourceLink):
            out.append(
                TextContent(
                    f"Resource: {block.uri}" + (f" ({block.description})" if block.description else "")
                )
            )
        else:
            out.append(block)
    return out
