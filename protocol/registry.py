"""The registry `tools/` fills: tools, resources, resource templates, prompts and completions.

See docs/contracts.md §1. Schemas are derived from the handlers' msgspec types once, at registration.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import typing
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import unquote

import msgspec

from protocol import headers, schema
from protocol.content import Content, ResourceContents, TextContent
from protocol.context import RequestContext
from protocol.errors import CallFailed, InvalidParams, McpError, ResourceNotFound, ToolError
from protocol.messages import CallToolResult, GetPromptResult, Icon, PromptMessage
from protocol.stateless import NO_CACHE, CacheHint

__all__ = [
    "CacheHint",
    "PromptArgument",
    "PromptDef",
    "Registry",
    "RequestContext",
    "ResourceDef",
    "TemplateDef",
    "ToolAnnotations",
    "ToolDef",
    "ToolResult",
]

TaskSupport = Literal["forbidden", "optional", "required"]
CachePolicy = CacheHint | Callable[[dict[str, str]], CacheHint]

log = logging.getLogger("protocol.registry")


class ToolAnnotations(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Behaviour hints (clients treat them as untrusted). None = not stated."""

    title: str | None = None
    read_only: bool | None = None
    destructive: bool | None = None
    idempotent: bool | None = None
    open_world: bool | None = None


class PromptArgument(msgspec.Struct):
    name: str
    description: str | None = None
    required: bool = False
    title: str | None = None


class ToolResult(msgspec.Struct, kw_only=True):
    """Full control over a tools/call result (content blocks, structured value, error flag)."""

    content: list[Content]
    structured: Any = None
    is_error: bool = False


ToolFn = Callable[..., Awaitable[Any]]


class ToolDef(msgspec.Struct, kw_only=True):
    name: str
    title: str | None
    description: str
    annotations: ToolAnnotations | None
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    fn: ToolFn
    params_type: Any  # a Struct type, dict (raw arguments) or None (no parameters)
    wrap_result: bool
    icons: list[Icon] | None = None
    execution: dict[str, Any] | None = None  # 2025-11-25's `execution` member, passed through as given
    tasks: TaskSupport = "forbidden"  # the 2026-07-28 Tasks extension
    since: str | None = None  # listed and callable from this revision on (None: every revision)
    mirrored: tuple[headers.HeaderParam, ...] = ()  # `x-mcp-header` arguments


class ResourceDef(msgspec.Struct, kw_only=True):
    uri: str
    name: str
    title: str | None
    description: str | None
    mime_type: str | None
    fn: Callable[..., Awaitable[Any]]
    size: int | None = None
    icons: list[Icon] | None = None
    cache: CachePolicy = NO_CACHE
    since: str | None = None


class TemplateDef(msgspec.Struct, kw_only=True):
    uri_template: str
    name: str
    title: str | None
    description: str | None
    mime_type: str | None
    fn: Callable[..., Awaitable[Any]]
    pattern: re.Pattern[str]
    variables: list[str]
    icons: list[Icon] | None = None
    cache: CachePolicy = NO_CACHE
    since: str | None = None


class PromptDef(msgspec.Struct, kw_only=True):
    name: str
    title: str | None
    description: str | None
    arguments: list[PromptArgument]
    fn: Callable[..., Awaitable[Any]]
    icons: list[Icon] | None = None
    since: str | None = None


class ReadOutcome(msgspec.Struct, frozen=True):
    """What resources/read produced: the contents and how long a client may keep them."""

    contents: list[ResourceContents]
    cache: CacheHint = NO_CACHE


CompletionFn = Callable[[RequestContext, str, dict[str, str]], Awaitable[list[str]]]

_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_TEMPLATE_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def compile_template(uri_template: str) -> tuple[re.Pattern[str], list[str]]:
    """`{path}` as the last variable spans slashes (may be empty); every other variable is one segment."""
    names = _TEMPLATE_VAR.findall(uri_template)
    parts: list[str] = []
    pos = 0
    for i, m in enumerate(_TEMPLATE_VAR.finditer(uri_template)):
        parts.append(re.escape(uri_template[pos : m.start()]))
        name = m.group(1)
        spans = name == "path" and i == len(names) - 1
        parts.append(f"(?P<{name}>.*)" if spans else f"(?P<{name}>[^/]+)")
        pos = m.end()
    parts.append(re.escape(uri_template[pos:]))
    return re.compile("".join(parts), re.DOTALL), names


def to_json_text(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


class Registry:
    def __init__(
        self,
        name: str,
        version: str | None = None,
        *,
        instructions: str | None = None,
        title: str | None = None,
        description: str | None = None,
        website_url: str | None = None,
        announce_list_changes: bool = False,
        list_cache: CacheHint = CacheHint(300_000, "public"),
        schemas: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """`schemas`: the JSON Schemas derived from handler types, by `schema.type_key`; given, it is
        read before deriving one and filled with what had to be derived (a server may keep it between
        starts: deriving costs milliseconds per tool)."""
        self.name = name
        self.version = version
        self.instructions = instructions
        self.title = title
        self.description = description
        self.website_url = website_url
        # True: capabilities declare listChanged and sessions get notifications/<kind>/list_changed.
        self.announce_list_changes = announce_list_changes
        # Caching hint of every listing page (2026-07-28): the same for every caller, hence public.
        self.list_cache = list_cache
        self.tools: dict[str, ToolDef] = {}
        self.resources: dict[str, ResourceDef] = {}
        self.templates: dict[str, TemplateDef] = {}
        self.prompts: dict[str, PromptDef] = {}
        self.completions: dict[tuple[str, str, str], CompletionFn] = {}
        # Bumped on every change so listing caches know they are stale.
        self.generation = 0
        self._listeners: list[Callable[[str], None]] = []
        self.schemas = schemas

    # ------------------------------------------------------------ registration

    def tool(
        self,
        name: str,
        *,
        description: str,
        title: str | None = None,
        annotations: ToolAnnotations | None = None,
        input_schema: dict[str, Any] | None = None,
        output_schema: dict[str, Any] | None = None,
        icons: list[Icon] | None = None,
        execution: dict[str, Any] | None = None,
        tasks: TaskSupport = "forbidden",
        since: str | None = None,
    ) -> Callable[[ToolFn], ToolFn]:
        """Register a tool. `tasks`: whether a 2026-07-28 call may become a task (Tasks extension);
        `since`: the first revision that lists it."""
        if not _TOOL_NAME.fullmatch(name):
            raise ValueError(f"tool name {name!r} must be 1-128 characters of [A-Za-z0-9_.-]")
        # Types defined in the registering function (not at module level) resolve through its locals.
        localns = dict(sys._getframe(1).f_locals)

        def decorate(fn: ToolFn) -> ToolFn:
            if name in self.tools:
                raise ValueError(f"tool {name!r} registered twice")
            hints = typing.get_type_hints(fn, localns=localns)
            params = [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.name != "ctx" and hints.get(p.name) is not RequestContext
            ]
            params_type: Any = hints.get(params[0].name, dict) if params else None
            if params_type is None:
                in_schema = input_schema or {"type": "object", "additionalProperties": False}
            elif isinstance(params_type, type) and issubclass(params_type, msgspec.Struct):
                in_schema = input_schema or self._derived("input", params_type, schema.input_schema)
            else:
                params_type = dict
                in_schema = input_schema or {"type": "object"}
            ret = hints.get("return", ToolResult)
            wrap = not (isinstance(ret, type) and issubclass(ret, msgspec.Struct))
            out_schema = output_schema
            if out_schema is None and ret is not ToolResult and ret is not Any:
                kind = "wrapped output" if wrap else "output"
                out_schema = self._derived(kind, ret, lambda tp: schema.output_schema(tp, wrap=wrap))
            self.tools[name] = ToolDef(
                name=name,
                title=title,
                description=description,
                annotations=annotations,
                input_schema=in_schema,
                output_schema=out_schema,
                fn=fn,
                params_type=params_type,
                wrap_result=wrap,
                icons=icons,
                execution=execution,
                tasks=tasks,
                since=since,
                mirrored=headers.mirrored_params(in_schema),
            )
            self._changed("tools")
            return fn

        return decorate

    def _derived(self, kind: str, tp: Any, derive: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        if self.schemas is None:
            return derive(tp)
        key = f"{kind} {schema.type_key(tp)}"
        found = self.schemas.get(key)
        if found is None:
            found = self.schemas[key] = derive(tp)
        return found

    def resource(
        self,
        uri: str,
        *,
        name: str,
        title: str | None = None,
        description: str | None = None,
        mime_type: str | None = None,
        size: int | None = None,
        icons: list[Icon] | None = None,
        cache: CachePolicy = NO_CACHE,
        since: str | None = None,
    ) -> Callable[[ToolFn], ToolFn]:
        """Register a static resource; `cache` is its caching hint (2026-07-28), `since` as for tools."""

        def decorate(fn: ToolFn) -> ToolFn:
            self.resources[uri] = ResourceDef(
                uri=uri,
                name=name,
                title=title,
                description=description,
                mime_type=mime_type,
                fn=fn,
                size=size,
                icons=icons,
                cache=cache,
                since=since,
            )
            self._changed("resources")
            return fn

        return decorate

    def resource_template(
        self,
        uri_template: str,
        *,
        name: str,
        title: str | None = None,
        description: str | None = None,
        mime_type: str | None = None,
        icons: list[Icon] | None = None,
        cache: CachePolicy = NO_CACHE,
        since: str | None = None,
    ) -> Callable[[ToolFn], ToolFn]:
        """Register a URI template; `cache` may be a function of the matched variables (an image read by
        UUID is immutable, one by tag is not)."""
        pattern, variables = compile_template(uri_template)

        def decorate(fn: ToolFn) -> ToolFn:
            self.templates[uri_template] = TemplateDef(
                uri_template=uri_template,
                name=name,
                title=title,
                description=description,
                mime_type=mime_type,
                fn=fn,
                pattern=pattern,
                variables=variables,
                icons=icons,
                cache=cache,
                since=since,
            )
            self._changed("resources")
            return fn

        return decorate

    def prompt(
        self,
        name: str,
        *,
        description: str | None = None,
        title: str | None = None,
        arguments: list[PromptArgument] | None = None,
        icons: list[Icon] | None = None,
        since: str | None = None,
    ) -> Callable[[ToolFn], ToolFn]:
        def decorate(fn: ToolFn) -> ToolFn:
            self.prompts[name] = PromptDef(
                name=name,
                title=title,
                description=description,
                arguments=list(arguments or []),
                fn=fn,
                icons=icons,
                since=since,
            )
            self._changed("prompts")
            return fn

        return decorate

    def completion(
        self, ref_type: str, ref_name: str, argument: str
    ) -> Callable[[CompletionFn], CompletionFn]:
        if ref_type not in ("ref/prompt", "ref/resource"):
            raise ValueError(f"completion ref type must be ref/prompt or ref/resource, not {ref_type!r}")

        def decorate(fn: CompletionFn) -> CompletionFn:
            self.completions[(ref_type, ref_name, argument)] = fn
            return fn

        return decorate

    # ------------------------------------------------------------ change notification

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(kind)` runs after tools/resources/prompts change (kind = that word)."""
        self._listeners.append(listener)

    def list_changed(self, kind: str) -> None:
        """Tell servers that a list changed outside registration (e.g. a dynamic resource set)."""
        self._changed(kind)

    def _changed(self, kind: str) -> None:
        self.generation += 1
        for listener in self._listeners:
            listener(kind)

    # ------------------------------------------------------------ invocation

    def visible_tool(self, name: str, version: str) -> ToolDef | None:
        tool = self.tools.get(name)
        if tool is None or (tool.since is not None and tool.since > version):
            return None
        return tool

    async def call_tool(self, name: str, arguments: dict[str, Any], ctx: RequestContext) -> CallToolResult:
        tool = self.tools.get(name)
        if tool is None or (tool.since is not None and tool.since > ctx.protocol_version):
            raise InvalidParams(f"Unknown tool: {name}", data={"name": name})
        try:
            if tool.params_type is None:
                value = await tool.fn(ctx)
            elif tool.params_type is dict:
                value = await tool.fn(arguments, ctx)
            else:
                params = msgspec.convert(arguments, tool.params_type, strict=False)
                value = await tool.fn(params, ctx)
        except msgspec.ValidationError as exc:
            return _tool_error(name, f"invalid arguments: {exc}")
        except CallFailed:
            raise
        except (ToolError, McpError) as exc:  # expected failures (incl. a client refusing a request)
            return _tool_error(name, exc.message)
        except Exception as exc:
            log.exception("tool %s failed", name)
            return _tool_error(name, str(exc) or type(exc).__name__)
        if isinstance(value, ToolResult):
            return CallToolResult(value.content, value.structured, value.is_error)
        if tool.output_schema is None:
            return CallToolResult([TextContent(to_json_text(value))])
        builtins = msgspec.to_builtins(value)
        text = to_json_text(builtins)
        structured = {"result": builtins} if tool.wrap_result else builtins
        return CallToolResult([TextContent(text)], structured)

    def find_resource(self, uri: str) -> tuple[ResourceDef | TemplateDef, dict[str, str]]:
        """The resource or template serving `uri` and the template's variables (ResourceNotFound if none)."""
        static = self.resources.get(uri)
        if static is not None:
            return static, {}
        for template in self.templates.values():
            m = template.pattern.fullmatch(uri)
            if m is not None:
                return template, {k: unquote(v) for k, v in m.groupdict().items()}
        raise ResourceNotFound(uri)

    async def read(self, uri: str, ctx: RequestContext) -> ReadOutcome:
        found, variables = self.find_resource(uri)
        if found.since is not None and found.since > ctx.protocol_version:
            raise ResourceNotFound(uri)
        value = await found.fn(ctx, **variables)
        mime_type = found.mime_type
        contents: list[ResourceContents]
        if isinstance(value, str):
            contents = [ResourceContents(uri, mime_type, text=value)]
        elif isinstance(value, bytes | bytearray):
            contents = [ResourceContents.from_bytes(uri, bytes(value), mime_type)]
        elif isinstance(value, ResourceContents):
            contents = [value]
        else:
            contents = list(value)
        cache = found.cache if isinstance(found.cache, CacheHint) else found.cache(variables)
        return ReadOutcome(contents, cache)

    async def read_resource(self, uri: str, ctx: RequestContext) -> list[ResourceContents]:
        return (await self.read(uri, ctx)).contents

    async def get_prompt(self, name: str, arguments: dict[str, str], ctx: RequestContext) -> GetPromptResult:
        prompt = self.prompts.get(name)
        if prompt is None or (prompt.since is not None and prompt.since > ctx.protocol_version):
            raise InvalidParams(f"Unknown prompt: {name}", data={"name": name})
        missing = [a.name for a in prompt.arguments if a.required and not arguments.get(a.name)]
        if missing:
            raise InvalidParams(f"Missing required arguments for prompt {name}: {', '.join(missing)}")
        declared = {a.name for a in prompt.arguments}
        kwargs = {k: v for k, v in arguments.items() if k in declared}
        value = await prompt.fn(ctx, **kwargs)
        if isinstance(value, GetPromptResult):
            return value
        if isinstance(value, str):
            value = [PromptMessage("user", TextContent(value))]
        return GetPromptResult(list(value), prompt.description)

    async def complete(
        self,
        ref_type: str,
        ref_name: str,
        argument: str,
        value: str,
        context_args: dict[str, str],
        ctx: RequestContext,
    ) -> list[str]:
        if ref_type == "ref/prompt":
            known = ref_name in self.prompts
        elif ref_type == "ref/resource":
            known = ref_name in self.templates or ref_name in self.resources
        else:
            raise InvalidParams(f"Unknown reference type: {ref_type}")
        if not known:
            raise InvalidParams(f"Unknown reference: {ref_type} {ref_name}")
        fn = self.completions.get((ref_type, ref_name, argument))
        if fn is None:
            return []
        return list(await fn(ctx, value, context_args))[:100]


def _tool_error(name: str, message: str) -> CallToolResult:
    return CallToolResult([TextContent(f"Error executing tool {name}: {message}")], is_error=True)
