"""whoami and get_guide."""

from __future__ import annotations

import logging
from typing import Annotated

from msgspec import Meta

from contree.api import Model
from contree.backend import EngineAdmin
from contree.errors import BackendError, NotFound
from protocol.errors import ToolError
from protocol.registry import Registry, RequestContext, ToolAnnotations
from tools.errors import backend_errors
from tools.guides import GUIDES, guide_text
from tools.models import GuideOutput, WhoAmIOutput
from tools.state import ServerState
from tools.version import __version__

log = logging.getLogger(__name__)


class GuideParams(Model):
    section: Annotated[
        str, Meta(description="One of: workflow, reference, quickstart, state, async, tagging, errors.")
    ]


def register_whoami(registry: Registry, state: ServerState) -> None:
    @registry.tool(
        name="whoami",
        title="Who am I",
        description="""Introspect the current API token. Free (no VM).

TL;DR: PURPOSE: check permissions and limits (e.g. after a 403). COST: free.

USAGE:
- whoami(). On the embedded engine every permission is granted and the limits are the engine's own.

RETURNS: {token_uuid, token_expiration, permissions, limits (output_quota_bytes: output one run may
store), operations_stat, mcp_version, mcp_upgrade, backend, disk_usage (embedded engine: bytes of
images, layers, run output, uploads; reclaimable_bytes = what deleting unused untagged images frees)}

GUIDES:
- [USEFUL] contree://guide/errors""",
        annotations=ToolAnnotations(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    async def whoami(ctx: RequestContext) -> WhoAmIOutput:
        with backend_errors("whoami"):
            me = await state.backend.whoami()
        usage = None
        if isinstance(state.backend, EngineAdmin) and state.disk_admin:
            try:
                usage = await state.backend.disk_usage()
            except NotFound:
                state.disk_admin = False  # a server without the engine's extensions (the cloud)
            except BackendError as exc:
                log.debug("disk usage unavailable: %s", exc)
        return WhoAmIOutput(
            token_uuid=me.token_uuid,
            token_expiration=me.token_expiration,
            permissions=me.permissions,
            limits=me.limits,
            operations_stat=me.operations_stat,
            mcp_version=__version__,
            mcp_upgrade=None,
            backend=state.backend_kind,
            disk_usage=usage,
        )


def register_guide(registry: Registry, state: ServerState) -> None:
    @registry.tool(
        name="get_guide",
        title="Read a guide",
        description="""Get agent guide sections for Contree best practices. Free (no VM).

TL;DR: PURPOSE: learn the workflow before the first run. COST: free.

USAGE:
- get_guide(section="workflow"); sections: workflow, reference, quickstart, state, async, tagging, errors,
  sandboxes (long-lived sandboxes). The same text is at contree://guide/<section>.

RETURNS: {section, content, available_sections}

GUIDES:
- [ESSENTIAL] contree://guide/workflow""",
        annotations=ToolAnnotations(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    async def get_guide(params: GuideParams, ctx: RequestContext) -> GuideOutput:
        section = params.section.strip().lower()
        if section not in GUIDES:
            raise ToolError(
                f"Unknown guide section '{params.section}'. Available sections: {', '.join(sorted(GUIDES))}"
            )
        return GuideOutput(
            section=section,
            content=guide_text(section, await state.guidance()),
            available_sections=sorted(GUIDES),
        )
