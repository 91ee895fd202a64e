"""delete_image: give an image's disk back (beyond the reference's 19 tools; the name shadows none)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from contree.api import Model
from contree.backend import EngineAdmin
from contree.errors import BackendError, Conflict, NotFound
from protocol.errors import ToolError
from protocol.registry import Registry, RequestContext, ToolAnnotations
from tools.errors import backend_errors
from tools.refs import resolve_image
from tools.state import ServerState

CLOUD_HINT = (
    "The Contree cloud API cannot delete images: remove the image's tag with "
    'set_tag(image_uuid=<uuid>, tag="") and the service garbage-collects untagged images itself.'
)


class DeleteImageParams(Model):
    image: Annotated[str, Meta(description="The image to delete: a UUID (or 'tag:<tag>', which is refused).")]


class DeleteImageOutput(Model):
    uuid: str
    deleted: bool
    freed_bytes: int


def register(registry: Registry, state: ServerState) -> None:
    @registry.tool(
        name="delete_image",
        title="Delete an image",
        description="""Delete an image and free the disk only it used. Free (no VM).

TL;DR: PURPOSE: reclaim disk from an image you no longer need. COST: free; cannot be undone.

USAGE:
- delete_image(image="<uuid>"). Refused for an image with a tag (remove it first with
  set_tag(image_uuid="<uuid>", tag="")), one a queued or running operation uses, and the parent of
  another image (delete the children first): lineage stays whole.
- Layers other images share are kept. Whole-home clean-up: `contree-mcp images prune --untagged`.

RETURNS: {uuid, deleted, freed_bytes}

GUIDES:
- [USEFUL] contree://guide/state""",
        annotations=ToolAnnotations(read_only=False, destructive=True, idempotent=False, open_world=False),
    )
    async def delete_image(params: DeleteImageParams, ctx: RequestContext) -> DeleteImageOutput:
        backend = state.backend
        with backend_errors(f"Image {params.image!r}"):
            uuid = await resolve_image(backend, params.image)
            image = await backend.get_image(uuid)
        if state.owners.scoped:
            # Only an image made by one of this client's own operations is its to delete.
            made_by = image.operation_uuid
            if not made_by or not state.owners.visible(ctx.principal, made_by):
                raise ToolError(f"Image {uuid} was not made by this client's operations: not deleted")
        if not isinstance(backend, EngineAdmin) or not state.disk_admin:
            raise ToolError(CLOUD_HINT)
        try:
            freed = await backend.delete_image(uuid)
        except NotFound:
            state.disk_admin = False  # the image exists (read above): this server has no deletion
            raise ToolError(CLOUD_HINT) from None
        except Conflict as exc:
            raise ToolError(f"Image {uuid} was not deleted: {exc.message}") from None
        except BackendError as exc:
            raise ToolError(f"Image {uuid}: {exc.message} (status {exc.status})") from None
        return DeleteImageOutput(uuid=uuid, deleted=True, freed_bytes=freed)

    del delete_image
