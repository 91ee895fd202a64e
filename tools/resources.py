"""Resources: the seven guides, the image/operation templates, full operation output, and completion."""

from __future__ import annotations

import base64
import datetime as dt
import stat
import urllib.parse
from typing import Any

import msgspec

from contree.backend import ImageQuery
from contree.errors import BackendError, NotFound
from protocol.content import ResourceContents
from protocol.errors import ResourceNotFound
from protocol.registry import CacheHint, Registry, RequestContext
from tools.convert import as_dict, decode_stream, operation_output
from tools.guides import GUIDES, guide_text
from tools.inspect_tools import decode_text, normalize_dir, read_bounded
from tools.prompts import PROMPTS
from tools.refs import is_uuid, resolve_image
from tools.state import ServerState

STREAMS = ("stdout", "stderr")
# 2026-07-28 caching hints. Guides ship with the server: the same for everyone.
GUIDE_CACHE = CacheHint(3_600_000, "public")
# An image never changes once made, so what is read from it by UUID stays true; by tag it may move.
IMAGE_CACHE = CacheHint(86_400_000, "private")


def image_cache(variables: dict[str, str]) -> CacheHint:
    return IMAGE_CACHE if is_uuid(variables.get("image", "")) else CacheHint()


async def _resolve(state: ServerState, uri: str, image: str) -> str:
    try:
        return await resolve_image(state.backend, image)
    except Exception as exc:
        raise ResourceNotFound(uri, f"Image not found: {image} ({exc})") from None


def ls_line(item: dict[str, Any]) -> str:
    mode = int(item.get("mode") or 0)
    size = int(item.get("size") or 0)
    when = dt.datetime.fromtimestamp(int(item.get("mtime") or 0), dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    name = str(item.get("path") or "")
    line = f"{stat.filemode(mode)} {size:>10} {when} {name}"
    if item.get("is_symlink") and item.get("symlink_to"):
        line += f" -> {item['symlink_to']}"
    return line


def parse_stream(spec: str) -> tuple[str, int, int | None]:
    """`stdout?offset=N&limit=M` → (stream, offset, limit)."""
    name, _, query = spec.partition("?")
    args = urllib.parse.parse_qs(query)

    def number(key: str) -> int | None:
        values = args.get(key)
        if not values:
            return None
        try:
            return max(0, int(values[0]))
        except ValueError:
            return None

    return name, number("offset") or 0, number("limit")


async def stream_bytes(state: ServerState, operation_id: str, stream: str) -> bytes:
    """The whole recorded stream of the main process, from the operation's event log."""
    chunks: list[bytes] = []
    async for event in state.backend.events(operation_id, follow=False):
        data = as_dict(event)
        if data.get("type") != stream or data.get("spid", 1) not in (1, None):
            continue
        payload = as_dict(data.get("data"))
        value = payload.get("value") or ""
        chunks.append(base64.b64decode(value) if payload.get("encoding") == "base64" else value.encode())
    return b"".join(chunks)


def register_guides(registry: Registry, state: ServerState) -> None:
    for section in GUIDES:

        def make(name: str):
            async def read(ctx: RequestContext) -> str:
                return guide_text(name, state.backend_kind)

            return read

        registry.resource(
            f"contree://guide/{section}",
            name=section,
            title=f"Contree Guide: {section.capitalize()}",
            description=f"Guide section on {section}",
            mime_type="text/markdown",
            cache=GUIDE_CACHE,
        )(make(section))


def register_guide_template(registry: Registry, state: ServerState) -> None:
    """`contree://guide/{section}`: the same seven guides, addressable with completion of the section."""

    @registry.resource_template(
        "contree://guide/{section}",
        name="guide",
        title="Contree Guide",
        description="A guide section: workflow, reference, quickstart, state, async, tagging or errors.",
        mime_type="text/markdown",
        cache=GUIDE_CACHE,
    )
    async def guide(ctx: RequestContext, section: str) -> str:
        if section not in GUIDES:
            raise ResourceNotFound(f"contree://guide/{section}", f"Unknown guide section {section!r}")
        return guide_text(section, state.backend_kind)

    @registry.completion("ref/resource", "contree://guide/{section}", "section")
    async def sections(ctx: RequestContext, value: str, context_args: dict[str, str]) -> list[str]:
        return [s for s in GUIDES if s.startswith(value)]

    del guide, sections


def register_templates(registry: Registry, state: ServerState) -> None:
    @registry.resource_template(
        "contree://image/{image}/read/{path}",
        name="read_file",
        title="File in an image",
        description=(
            "A file of an image (UUID, tag:<tag> or bare tag; percent-encode '/' in tags as %2F). UTF-8 "
            "files "
            f"are returned as text, others as a base64 blob (application/octet-stream). At most "
            f"{state.read_max_bytes} bytes: a larger file comes with a second text item saying so; use the "
            "read_file tool with offset, or download."
        ),
        mime_type="text/plain",
        cache=image_cache,
    )
    async def read_file(ctx: RequestContext, image: str, path: str) -> list[ResourceContents]:
        uri = f"contree://image/{image}/read/{path}"
        uuid = await _resolve(state, uri, image)
        target = "/" + path.lstrip("/")
        try:
            data, more = await read_bounded(state.backend, uuid, target, 0, state.read_max_bytes)
        except BackendError as exc:
            raise ResourceNotFound(uri, f"Cannot read {target} in {image}: {exc}") from None
        text = decode_text(data, more)
        out = [
            ResourceContents(uri, "text/plain", text=text)
            if text is not None
            else ResourceContents.from_bytes(uri, data, "application/octet-stream")
        ]
        if more:
            out.append(
                ResourceContents(
                    uri + "#truncated",
                    "text/plain",
                    text=f"Truncated at {len(data)} bytes. Use read_file(image, path, offset={len(data)}) "
                    "or download() for the rest.",
                )
            )
        return out

    @registry.resource_template(
        "contree://image/{image}/ls/{path}",
        name="image_ls",
        title="Directory listing of an image",
        description="An `ls -l`-style listing of a directory in an image; `ls/` or `ls/.` lists the root.",
        mime_type="text/plain",
        cache=image_cache,
    )
    async def image_ls(ctx: RequestContext, image: str, path: str) -> str:
        uri = f"contree://image/{image}/ls/{path}"
        uuid = await _resolve(state, uri, image)
        directory = normalize_dir(path if path not in ("", ".") else "/")
        try:
            listing = as_dict(await state.backend.list_directory(uuid, directory))
        except BackendError as exc:
            raise ResourceNotFound(uri, f"Cannot list {directory} in {image}: {exc}") from None
        return "\n".join(ls_line(item) for item in listing.get("files") or [])

    @registry.resource_template(
        "contree://image/{image}/lineage",
        name="image_lineage",
        title="Lineage of an image",
        description=(
            "JSON {image, parent, children (direct), descendants, ancestors (nearest first), root, depth, "
            "is_known, data}. Tags are resolved first."
        ),
        mime_type="application/json",
    )
    async def image_lineage(ctx: RequestContext, image: str) -> str:
        uri = f"contree://image/{image}/lineage"
        uuid = await _resolve(state, uri, image)
        view = await state.lineage.view(uuid, ctx.principal)
        return msgspec.json.format(msgspec.json.encode(view), indent=2).decode()

    @registry.resource_template(
        "contree://operations/instance/{operation_id}",
        name="instance_operation",
        title="A run",
        description=(
            "JSON {state, error, result_image, result_tag, exit_code, timed_out, stdout, stderr, "
            "stdout_truncated, "
            "stderr_truncated, resources} of a run (output as kept in the operation record)."
        ),
        mime_type="application/json",
    )
    async def instance_operation(ctx: RequestContext, operation_id: str) -> str:
        uri = f"contree://operations/instance/{operation_id}"
        op = await _operation(uri, operation_id, ctx.principal, kind="instance", word="instance")
        out = operation_output(op, cap=state.cap_for(operation_id))
        doc: dict[str, Any] = {"state": out.status}
        for key in ("error", "result_image", "result_tag", "exit_code"):
            value = getattr(out, key)
            if value is not None:
                doc[key] = value
        doc.update(
            timed_out=out.timed_out,
            stdout=out.stdout,
            stderr=out.stderr,
            stdout_truncated=out.stdout_truncated,
            stderr_truncated=out.stderr_truncated,
            stdout_resource=out.stdout_resource,
            stderr_resource=out.stderr_resource,
        )
        if out.resources is not None:
            doc["resources"] = msgspec.to_builtins(out.resources)
        return msgspec.json.format(msgspec.json.encode(doc), indent=2).decode()

    @registry.resource_template(
        "contree://operations/instance/{operation_id}/{stream}",
        name="instance_output",
        title="Full output of a run",
        description=(
            "The complete recorded stdout or stderr of a run, read from its event log: "
            "contree://operations/instance/<id>/stdout (or /stderr). Page with ?offset=<bytes>&limit=<bytes> "
            f"(default limit {state.read_max_bytes}); a page shorter than the limit is the last one."
        ),
        mime_type="text/plain",
    )
    async def instance_output(ctx: RequestContext, operation_id: str, stream: str) -> list[ResourceContents]:
        uri = f"contree://operations/instance/{operation_id}/{stream}"
        name, offset, limit = parse_stream(stream)
        if name not in STREAMS:
            raise ResourceNotFound(uri, f"Unknown stream {name!r}: use stdout or stderr")
        op = await _operation(uri, operation_id, ctx.principal, kind="instance", word="instance")
        try:
            data = await stream_bytes(state, operation_id, name)
        except BackendError:
            # no event log (e.g. a CANCELLED op): fall back to what the record kept
            kept, _ = decode_stream(as_dict(as_dict(op.get("metadata")).get("result")).get(name))
            data = kept.encode()
        page = data[offset : offset + (limit or state.read_max_bytes)]
        text = decode_text(page, True)
        if text is None:
            return [ResourceContents.from_bytes(uri, page, "application/octet-stream")]
        return [ResourceContents(uri, "text/plain", text=text)]

    @registry.resource_template(
        "contree://operations/import/{operation_id}",
        name="import_operation",
        title="An image import",
        description="Text: STATE, then RESULT_IMAGE, RESULT_TAG, REGISTRY_URL and ERROR lines when known.",
        mime_type="text/plain",
    )
    async def import_operation(ctx: RequestContext, operation_id: str) -> str:
        uri = f"contree://operations/import/{operation_id}"
        op = await _operation(uri, operation_id, ctx.principal, kind="image_import", word="import")
        result = as_dict(op.get("result"))
        registry_url = as_dict(as_dict(op.get("metadata")).get("registry")).get("url")
        lines = [f"STATE: {op.get('status')}"]
        if result.get("image"):
            lines.append(f"RESULT_IMAGE: {result['image']}")
        if result.get("tag"):
            lines.append(f"RESULT_TAG: {result['tag']}")
        if registry_url:
            lines.append(f"REGISTRY_URL: {registry_url}")
        if op.get("error"):
            lines.append(f"ERROR:\n{op['error']}")
        return "\n".join(lines)

    async def _operation(
        uri: str, operation_id: str, principal: str | None, *, kind: str, word: str
    ) -> dict[str, Any]:
        """The operation this principal may see, of `kind` (else not found, naming it an `word` one)."""
        try:
            state.owners.require(principal, operation_id)
            op = as_dict(await state.backend.get_operation(operation_id))
        except NotFound:
            raise ResourceNotFound(uri, f"Operation not found: {operation_id}") from None
        except BackendError as exc:
            raise ResourceNotFound(uri, f"Operation {operation_id}: {exc}") from None
        if op.get("kind") != kind:
            raise ResourceNotFound(
                uri, f"Operation {operation_id} is not an {word} operation (kind={op.get('kind')})"
            )
        return op

    del read_file, image_ls, image_lineage, instance_operation, instance_output, import_operation


def register_completions(registry: Registry, state: ServerState) -> None:
    async def image_tags(ctx: RequestContext, value: str, context_args: dict[str, str]) -> list[str]:
        prefix = value[4:] if value.startswith("tag:") else value
        query = ImageQuery(limit=100, tagged=True, tag=prefix.rstrip(":/.") or None)
        try:
            images = await state.backend.list_images(query)
        except BackendError:
            return []
        tags = sorted({t for i in images if (t := as_dict(i).get("tag")) and t.startswith(prefix)})
        return [("tag:" + t) if value.startswith("tag:") else t for t in tags]

    for template in (
        "contree://image/{image}/read/{path}",
        "contree://image/{image}/ls/{path}",
        "contree://image/{image}/lineage",
    ):
        registry.completion("ref/resource", template, "image")(image_tags)
    for name, _, args in PROMPTS:
        for arg, _, default in args:
            if arg == "image":
                registry.completion("ref/prompt", name, arg)(image_tags)
            elif default:

                def make(d: str):
                    async def complete(
                        ctx: RequestContext, value: str, context_args: dict[str, str]
                    ) -> list[str]:
                        return [d] if d.startswith(value) else []

                    return complete

                registry.completion("ref/prompt", name, arg)(make(default))
    registry.completion("ref/prompt", "prepare-environment", "base")(image_tags)
