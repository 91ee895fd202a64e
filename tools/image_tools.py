"""list_images, get_image, set_tag."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from contree.api import Model
from contree.backend import ImageQuery
from protocol.registry import Registry, RequestContext, ToolAnnotations
from tools.bounds import MAX_OFFSET
from tools.errors import backend_errors
from tools.models import ImageListOutput, ImageOutput
from tools.params import ImageRef
from tools.refs import validate_tag
from tools.state import ServerState


class ListImagesParams(Model):
    limit: Annotated[int, Meta(ge=1, le=1000, description="Maximum number of images to return.")] = 100
    offset: Annotated[int, Meta(ge=0, le=MAX_OFFSET, description="Number of images to skip (paging).")] = 0
    tagged: Annotated[bool, Meta(description="Only images that carry a tag.")] = False
    tag_prefix: Annotated[
        str | None,
        Meta(description="Only images whose tag starts with this prefix, e.g. 'common/' or 'python'."),
    ] = None
    since: Annotated[
        str | None,
        Meta(description="Created after: ISO 8601, unix seconds or an interval ago (600s, 15m, 2h, 3d, 1w)."),
    ] = None
    until: Annotated[str | None, Meta(description="Created before: same formats as 'since'.")] = None


class GetImageParams(Model):
    image: ImageRef


class SetTagParams(Model):
    image_uuid: Annotated[
        str, Meta(description="The image to tag: a UUID (a 'tag:<tag>' or bare tag is resolved first).")
    ]
    tag: Annotated[
        str | None,
        Meta(description="New tag (moves here if another image held it). null or '' removes all tags."),
    ] = None
    remove_tag: Annotated[
        str | None, Meta(description="Remove just this one tag from the image (ignores 'tag').")
    ] = None


FREE = "Free (no VM)."


def register_list(registry: Registry, state: ServerState) -> None:
    guidance = state.guidance_now()
    search = (
        f'list_images(tagged=true) lists this engine\'s images (e.g. "{guidance.shell_image()}").'
        if guidance.local
        else 'list_images(tag_prefix="common/") finds shared, ready-made environments.'
    )

    @registry.tool(
        name="list_images",
        title="List images",
        description=f"""List available container images. {FREE}

TL;DR: PURPOSE: find an existing image before importing or building one. COST: free, no {state.sandbox_word}.

USAGE:
- {search}
- list_images(tagged=true) hides the untagged intermediate images of earlier runs.
- since/until accept ISO 8601, unix seconds or intervals (600s, 15m, 2h, 3d, 1w).

RETURNS: {{images: [{{uuid, tag, created_at, operation_uuid}}]}}

GUIDES:
- [ESSENTIAL] contree://guide/workflow
- [USEFUL] contree://guide/tagging""",
        annotations=ToolAnnotations(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    async def list_images(params: ListImagesParams, ctx: RequestContext) -> ImageListOutput:
        prefix = params.tag_prefix or None
        sent_prefix = prefix.rstrip(":/.") if prefix else None
        query = ImageQuery(
            limit=params.limit,
            offset=params.offset,
            tagged=params.tagged or bool(sent_prefix),
            tag=sent_prefix or None,
            since=params.since,
            until=params.until,
        )
        with backend_errors("list_images"):
            return ImageListOutput(images=await state.images.list_images(query, ctx.principal, prefix))


def register_get_tag(registry: Registry, state: ServerState) -> None:
    example = state.guidance_now().shell_image()

    @registry.tool(
        name="get_image",
        title="Get image",
        description=f"""Get image details by UUID or tag. {FREE}

TL;DR: PURPOSE: resolve a tag to its UUID or check that an image exists. COST: free.

USAGE:
- get_image(image="{example}"), get_image(image="tag:{example}") or a UUID.

RETURNS: {{uuid, tag, created_at, operation_uuid}}

GUIDES:
- [USEFUL] contree://guide/reference""",
        annotations=ToolAnnotations(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    async def get_image(params: GetImageParams, ctx: RequestContext) -> ImageOutput:
        with backend_errors(f"Image {params.image!r}"):
            return await state.images.get(params.image, ctx.principal)

    @registry.tool(
        name="set_tag",
        title="Tag an image",
        description=f"""Set or remove tag for container image. {FREE}

TL;DR: PURPOSE: name an image so it can be found and reused. COST: free.

USAGE:
- set_tag(image_uuid="<uuid>", tag="myproject/dev-env/debian:bookworm") right after a successful
  disposable=false run. A tag is unique: it moves from whichever image held it.
- set_tag(image_uuid="<uuid>", tag=null) removes all tags; remove_tag="<tag>" removes one.
- Tags: letters, digits, '_' and '-', separated by ':', '/' or '.'; at most 256 characters.

RETURNS: {{uuid, tag, created_at, operation_uuid}}

GUIDES:
- [ESSENTIAL] contree://guide/tagging""",
        annotations=ToolAnnotations(read_only=False, destructive=True, idempotent=True, open_world=False),
    )
    async def set_tag(params: SetTagParams, ctx: RequestContext) -> ImageOutput:
        with backend_errors(f"Image {params.image_uuid!r}"):
            uuid = await state.images.resolve(params.image_uuid, ctx.principal)
            if params.remove_tag:
                return await state.images.delete_tag(uuid, validate_tag(params.remove_tag), ctx.principal)
            if params.tag:
                return await state.images.set_tag(uuid, validate_tag(params.tag), ctx.principal)
            return await state.images.delete_tag(uuid, None, ctx.principal)
