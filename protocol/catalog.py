"""Paginated, version-gated listings (tools, resources, templates, prompts), encoded once and cached.

A listing shows what the asked revision can carry: entries registered `since` a later revision stay
hidden from older ones, and a 2026-07-28 page is a complete, cacheable stateless result.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from typing import Any

from protocol import versions
from protocol.errors import InvalidParams
from protocol.messages import (
    ListPromptsResult,
    ListResourcesResult,
    ListResourceTemplatesResult,
    ListToolsResult,
    PromptArgumentWire,
    PromptWire,
    ResourceTemplateWire,
    ResourceWire,
    ToolAnnotationsWire,
    ToolWire,
    encode,
)
from protocol.registry import PromptDef, Registry, ResourceDef, TemplateDef, ToolDef
from protocol.stateless import ResultEnvelope

KINDS = ("tools", "resources", "resources/templates", "prompts")


def tool_wire(tool: ToolDef, version: str) -> ToolWire:
    structured = versions.has_structured(version)
    icons = versions.has_icons(version)
    annotations = None
    if tool.annotations is not None and versions.has_annotations(version):
        a = tool.annotations
        annotations = ToolAnnotationsWire(
            title=a.title or (None if structured else tool.title),
            read_only_hint=a.read_only,
            destructive_hint=a.destructive,
            idempotent_hint=a.idempotent,
            open_world_hint=a.open_world,
        )
    return ToolWire(
        name=tool.name,
        title=tool.title if structured else None,
        description=tool.description,
        input_schema=tool.input_schema,
        output_schema=tool.output_schema if structured else None,
        annotations=annotations,
        icons=tool.icons if icons else None,
        execution=tool.execution if versions.has_execution(version) else None,
    )


def resource_wire(res: ResourceDef, version: str) -> ResourceWire:
    return ResourceWire(
        uri=res.uri,
        name=res.name,
        title=res.title if versions.has_structured(version) else None,
        description=res.description,
        mime_type=res.mime_type,
        size=res.size,
        icons=res.icons if versions.has_icons(version) else None,
    )


def template_wire(tpl: TemplateDef, version: str) -> ResourceTemplateWire:
    return ResourceTemplateWire(
        uri_template=tpl.uri_template,
        name=tpl.name,
        title=tpl.title if versions.has_structured(version) else None,
        description=tpl.description,
        mime_type=tpl.mime_type,
        icons=tpl.icons if versions.has_icons(version) else None,
    )


def prompt_wire(prompt: PromptDef, version: str) -> PromptWire:
    titled = versions.has_structured(version)
    return PromptWire(
        name=prompt.name,
        title=prompt.title if titled else None,
        description=prompt.description,
        arguments=[
            PromptArgumentWire(a.name, a.title if titled else None, a.description, a.required)
            for a in prompt.arguments
        ]
        or None,
        icons=prompt.icons if versions.has_icons(version) else None,
    )


class Catalog:
    """Pages are cached per (kind, version, offset) and rebuilt when the registry's generation moves."""

    def __init__(
        self, registry: Registry, page_size: int = 100, envelope: ResultEnvelope | None = None
    ) -> None:
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.registry = registry
        self.page_size = page_size
        self.envelope = envelope
        self._generation = -1
        self._pages: dict[tuple[str, str, int], bytes] = {}
        self._names_cache: dict[tuple[str, str], list[str]] = {}
        self._digests: dict[tuple[str, str], str] = {}

    def page(self, kind: str, version: str, cursor: Any) -> bytes:
        """The encoded result object for one page; a bad cursor raises InvalidParams (-32602)."""
        if self._generation != self.registry.generation:
            self._pages.clear()
            self._names_cache.clear()
            self._digests.clear()
            self._generation = self.registry.generation
        offset = 0 if cursor is None else self._offset(kind, version, cursor)
        key = (kind, version, offset)
        cached = self._pages.get(key)
        if cached is None:
            cached = self._pages[key] = self._build(kind, version, offset)
        return cached

    def _names(self, kind: str, version: str) -> list[str]:
        names = self._names_cache.get((kind, version))
        if names is None:
            r = self.registry
            table: dict[str, Any]
            if kind == "tools":
                table = r.tools
            elif kind == "resources":
                table = r.resources
            elif kind == "resources/templates":
                table = r.templates
            else:
                table = r.prompts
            names = [n for n, d in table.items() if d.since is None or d.since <= version]
            self._names_cache[(kind, version)] = names
        return names

    def _digest(self, kind: str, version: str) -> str:
        digest = self._digests.get((kind, version))
        if digest is None:
            joined = "\0".join(self._names(kind, version)).encode()
            digest = f"{zlib.crc32(joined) ^ self.registry.generation:08x}"
            self._digests[(kind, version)] = digest
        return digest

    def _cursor(self, kind: str, version: str, offset: int) -> str:
        raw = f"{kind}|{offset}|{self._digest(kind, version)}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def _offset(self, kind: str, version: str, cursor: Any) -> int:
        bad = InvalidParams("Invalid cursor", data={"cursor": cursor})
        if not isinstance(cursor, str) or not cursor or len(cursor) > 200:
            raise bad
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            c_kind, c_offset, c_digest = raw.split("|")
            offset = int(c_offset)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise bad from None
        names = self._names(kind, version)
        if c_kind != kind or c_digest != self._digest(kind, version) or not 0 < offset < len(names):
            raise bad
        return offset

    def _build(self, kind: str, version: str, offset: int) -> bytes:
        r = self.registry
        end = offset + self.page_size
        names = self._names(kind, version)
        chunk = names[offset:end]
        nxt = self._cursor(kind, version, end) if end < len(names) else None
        result: Any
        if kind == "tools":
            result = ListToolsResult([tool_wire(r.tools[n], version) for n in chunk], nxt)
        elif kind == "resources":
            result = ListResourcesResult([resource_wire(r.resources[n], version) for n in chunk], nxt)
        elif kind == "resources/templates":
            result = ListResourceTemplatesResult([template_wire(r.templates[n], version) for n in chunk], nxt)
        else:
            result = ListPromptsResult([prompt_wire(r.prompts[n], version) for n in chunk], nxt)
        body = encode(result)
        if versions.is_modern(version) and self.envelope is not None:
            # Every page of a listing shares one scope (SEP-2549); the registry says how long it keeps.
            return self.envelope.wrap(body, r.list_cache)
        return body
