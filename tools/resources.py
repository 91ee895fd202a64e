"""Resources: the guides, the image/operation templates, full operation output, and completion."""

from __future__ import annotations

import datetime as dt
import stat
import urllib.parse
from collections.abc import Awaitable, Callable

import msgspec

from contree import api
from contree.errors import BackendError, BadRequest, NotFound
from protocol.content import ResourceContents
from protocol.errors import InvalidParams, ResourceNotFound
from protocol.registry import CacheHint, Registry, RequestContext
from tools import output
from tools.guides import GUIDES, guide_text
from tools.image_files import decode_text, normalize_dir, read_bounded
from tools.models import Resources
from tools.prompts import PROMPTS
from tools.refs import is_uuid
from tools.state import ServerState

# 2026-07-28 caching hints. Guides ship with the server: the same for everyone.
GUIDE_CACHE = CacheHint(3_600_000, "public")
# An image never changes once made, so what is read from it by UUID stays true; by tag it may move.
IMAGE_CACHE = CacheHint(86_400_000, "private")


class RunDocument(api.Model, omit_defaults=True):
    """`contree://operations/instance/<id>`: a run as JSON (fields that do not apply are left out)."""

    state: str
    error: str | None = None
    result_image: str | None = None
    result_tag: str | None = None
    exit_code: int | None = None
    timed_out: bool
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    stdout_bytes: int | None = None
    stderr_bytes: int | None = None
    stdout_tail: str | None = None
    stderr_tail: str | None = None
    stdout_resource: str | None = None
    stderr_resource: str | None = None
    hint: str | None = None
    resources: Resources | None = None


def image_cache(variables: dict[str, str]) -> CacheHint:
    return IMAGE_CACHE if is_uuid(variables.get("image", "")) else CacheHint()

async def _resolve(state: ServerState, ctx: RequestContext, uri: str, image: str) -> str:
    try:
        return await state.images.resolve(image, ctx.principal)
    except Exception as exc:
        raise ResourceNotFound(uri, f"Image not found: {image} ({exc})") from None


def ls_line(item: api.FileItem) -> str:
    when = dt.datetime.fromtimestamp(item.mtime, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    line = f"{stat.filemode(item.mode)} {item.size:>10} {when} {item.path}"
    if item.is_symlink and item.symlink_to:
        line += f" -> {item.symlink_to}"
    return line


def parse_stream(spec: str, max_limit: int) -> tuple[str, int, int | None]:
    """`stdout?offset=N&limit=M` → (stream, offset, limit or None); anything malformed is an error."""
    name, _, query = spec.partition("?")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise InvalidParams(f"malformed query {query!r}: use ?offset=<bytes>&limit=<bytes>") from None
    values: dict[str, int] = {}
    for key, raw in pairs:
        if key not in ("offset", "limit") or key in values:
            raise InvalidParams(f"unknown or repeated parameter {key!r}: only offset and limit")
        if not raw.isdigit():
            raise InvalidParams(f"{key} must be a non-negative integer, got {raw!r}")
        values[key] = int(raw)
    limit = values.get("limit")
    if limit is not None and not 1 <= limit <= max_limit:
        raise InvalidParams(f"limit must be between 1 and {max_limit} (the server's --read-max-bytes)")
    return name, values.get("offset", 0), limit


def register_guides(registry: Registry, state: ServerState) -> None:
    for section in GUIDES:

        def make(name: str) -> Callable[[RequestContext], Awaitable[str]]:
            async def read(ctx: RequestContext) -> str:
                return guide_text(name, await state.guidance())

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
    """`contree://guide/{section}`: the same guides, addressable with completion of the section."""

    @registry.resource_template(
        "contree://guide/{section}",
        name="guide",
        title="Contree Guide",
        description=(
            "A guide section: workflow, reference, quickstart, state, async, tagging, errors or sandboxes."
        ),
        mime_type="text/markdown",
        cache=GUIDE_CACHE,
    )
    async def guide(ctx: RequestContext, section: str) -> str:
        if section not in GUIDES:
            raise ResourceNotFound(f"contree://guide/{section}", f"Unknown guide section {section!r}")
        return guide_text(section, await state.guidance())

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
        uuid = await _resolve(state, ctx, uri, image)
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
        uuid = await _resolve(state, ctx, uri, image)
        directory = normalize_dir(path if path not in ("", ".") else "/")
        try:
            listing = await state.backend.list_directory(uuid, directory)
        except BackendError as exc:
            raise ResourceNotFound(uri, f"Cannot list {directory} in {image}: {exc}") from None
        return "\n".join(ls_line(item) for item in listing.files)

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
        uuid = await _resolve(state, ctx, uri, image)
        view = await state.lineage.view(uuid, ctx.principal)
        return msgspec.json.format(msgspec.json.encode(view), indent=2).decode()

    @registry.resource_template(
        "contree://operations/instance/{operation_id}",
        name="instance_operation",
        title="A run",
        description=(
            "JSON {state, error, result_image, result_tag, exit_code, timed_out, stdout, stderr, "
            "stdout_truncated, stderr_truncated, stdout_bytes, stderr_bytes, stdout_tail, stderr_tail, "
            "stdout_resource, stderr_resource, hint, resources} of a run: heads and tails of its output; "
            "the whole streams are at …/<operation_id>/stdout and …/stderr."
        ),
        mime_type="application/json",
    )
    async def instance_operation(ctx: RequestContext, operation_id: str) -> str:
        uri = f"contree://operations/instance/{operation_id}"
        op = await _operation(uri, operation_id, ctx.principal, kind="instance", word="instance")
        cap, budget = state.output_cap(state.cap_for(operation_id))
        out = await output.shape(state, op, cap=cap, budget=budget, with_resources=True)
        doc = RunDocument(
            state=out.status,
            error=out.error,
            result_image=out.result_image_uuid if out.status == "SUCCESS" else None,
            result_tag=out.result.tag if out.result else None,
            exit_code=out.exit_code,
            timed_out=out.timed_out,
            stdout=out.stdout,
            stderr=out.stderr,
            stdout_truncated=out.stdout_truncated,
            stderr_truncated=out.stderr_truncated,
            stdout_bytes=out.stdout_bytes,
            stderr_bytes=out.stderr_bytes,
            stdout_tail=out.stdout_tail,
            stderr_tail=out.stderr_tail,
            stdout_resource=out.stdout_resource,
            stderr_resource=out.stderr_resource,
            hint=out.hint,
            resources=out.resources,
        )
        return msgspec.json.format(msgspec.json.encode(doc), indent=2).decode()

    @registry.resource_template(
        "contree://operations/instance/{operation_id}/{stream}",
        name="instance_output",
        title="Full output of a run",
        description=(
            "The whole stdout or stderr of a run: contree://operations/instance/<id>/stdout (or /stderr). "
            "Page with ?offset=<bytes>&limit=<bytes> (default limit "
            f"{output.DEFAULT_PAGE}, at most {state.read_max_bytes}). A text page never ends inside a "
            "UTF-8 character, so it may hold fewer bytes than asked: continue at _meta.next_offset. "
            "Binary data comes as a base64 blob. _meta also has total_bytes, complete (the run ended) and "
            "dropped_bytes (output beyond the engine's per-run quota, not stored)."
        ),
        mime_type="text/plain",
    )
    async def instance_output(ctx: RequestContext, operation_id: str, stream: str) -> list[ResourceContents]:
        uri = f"contree://operations/instance/{operation_id}/{stream}"
        name, offset, limit = parse_stream(stream, max(state.read_max_bytes, output.DEFAULT_PAGE))
        if name not in output.STREAMS:
            raise ResourceNotFound(uri, f"Unknown stream {name!r}: use stdout or stderr")
        await _operation(uri, operation_id, ctx.principal, kind="instance", word="instance")
        try:
            page = await output.read_page(
                state,
                operation_id,
                name,
                offset=offset,
                limit=limit or output.DEFAULT_PAGE,
                json_budget=None if limit else output.DEFAULT_PAGE,
            )
        except (BadRequest, ValueError) as exc:
            raise InvalidParams(f"{uri}: {exc}") from None
        except BackendError as exc:
            raise ResourceNotFound(uri, f"Output of {operation_id}: {exc}") from None
        if page.text is None:
            return [ResourceContents.from_bytes(uri, page.data, "application/octet-stream", meta=page.meta())]
        return [ResourceContents(uri, "text/plain", text=page.text, meta=page.meta())]

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
        result = op.result or api.OperationResult()
        meta = op.import_metadata()
        lines = [f"STATE: {op.status}"]
        if result.image:
            lines.append(f"RESULT_IMAGE: {result.image}")
        if result.tag:
            lines.append(f"RESULT_TAG: {result.tag}")
        if meta is not None and meta.registry is not None and meta.registry.url:
            lines.append(f"REGISTRY_URL: {meta.registry.url}")
        if op.error:
            lines.append(f"ERROR:\n{op.error}")
        return "\n".join(lines)

    async def _operation(
        uri: str, operation_id: str, principal: str | None, *, kind: str, word: str
    ) -> api.OperationResponse:
        """The operation this principal may see, of `kind` (else not found, naming it an `word` one)."""
        try:
            state.owners.require(principal, operation_id)
            op = await state.backend.get_operation(operation_id)
        except NotFound:
            raise ResourceNotFound(uri, f"Operation not found: {operation_id}") from None
        except BackendError as exc:
            raise ResourceNotFound(uri, f"Operation {operation_id}: {exc}") from None
        if op.kind != kind:
            raise ResourceNotFound(
                uri, f"Operation {operation_id} is not an {word} operation (kind={op.kind})"
            )
        return op

    del read_file, image_ls, image_lineage, instance_operation, instance_output, import_operation


def register_completions(registry: Registry, state: ServerState) -> None:
    async def image_tags(ctx: RequestContext, value: str, context_args: dict[str, str]) -> list[str]:
        prefix = value[4:] if value.startswith("tag:") else value
        try:
            tags = await state.images.tags(prefix, ctx.principal)
        except BackendError:
            return []
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

                def make(d: str) -> Callable[[RequestContext, str, dict[str, str]], Awaitable[list[str]]]:
                    async def complete(
                        ctx: RequestContext, value: str, context_args: dict[str, str]
                    ) -> list[str]:
                        return [d] if d.startswith(value) else []

                    return complete

                registry.completion("ref/prompt", name, arg)(make(default))
    registry.completion("ref/prompt", "prepare-environment", "base")(image_tags)
