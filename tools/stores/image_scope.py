"""Which images and tags each principal sees (issue 17, items 2 and 3).

With per-principal HTTP tokens (`--http-tokens-file`) a principal sees

* its own images: the results of operations it started through this server (runs with disposable=false,
  imports), known by the image's creating operation or recorded when the server saw the result (an import
  of an image that already existed keeps the first importer's operation);
* shared images: those carrying a backend tag, and those the operator published with
  `contree-mcp images publish`. Only the operator sets backend tags (`images bootstrap`, a stdio session,
  `serve-api`): a scoped principal's tags, including an import's, never reach the backend.

Anything else reads exactly like an image that does not exist, so its id cannot even be confirmed.
The tags a principal sets live in its own namespace: a reference resolves to the principal's tag first,
then to a shared one; a principal can neither move nor delete a shared tag or another principal's.
As on the backend, an image holds at most one tag per namespace and a tag names one image.

Unscoped servers (stdio, one token) pass everything through to the backend unchanged. The tables live in
SQLite beside the operation owners (`<home>/mcp/operations.db` by default), which every server process of
one engine home shares.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from contree import api
from contree.backend import Backend, ImageQuery
from contree.errors import NotFound
from protocol.errors import ToolError
from tools.convert import image_output
from tools.models import ImageOutput
from tools.refs import resolve_image, split_ref
from tools.stores.owners import OperationOwners
from tools.stores.sqlite_cache import SqliteCache

LIST_PAGE = 1000  # the API's maximum page
LIST_MAX_PAGES = 20

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS image_owner (principal TEXT NOT NULL, image TEXT NOT NULL,"
    " created_at REAL NOT NULL, PRIMARY KEY (principal, image))",
    "CREATE TABLE IF NOT EXISTS principal_tag (principal TEXT NOT NULL, tag TEXT NOT NULL,"
    " image TEXT NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (principal, tag))",
    "CREATE UNIQUE INDEX IF NOT EXISTS principal_tag_image ON principal_tag (principal, image)",
    "CREATE TABLE IF NOT EXISTS published_image (image TEXT PRIMARY KEY, published_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS pending_tag (operation_id TEXT PRIMARY KEY, principal TEXT NOT NULL,"
    " tag TEXT NOT NULL, created_at REAL NOT NULL)",
]


def image_not_found(uuid: str) -> NotFound:
    """The answer for an image that is hidden or missing: the same words for both."""
    return NotFound(f"image {uuid} not found")


def tag_not_found(tag: str) -> NotFound:
    return NotFound(f"tag {tag!r} not found")


class PublishedImages:
    """The operator's list of shared image UUIDs (`contree-mcp images publish`)."""

    def __init__(self, sql: SqliteCache) -> None:
        self._sql = sql

    def add(self, uuid: str) -> None:
        self._sql.write("INSERT OR IGNORE INTO published_image VALUES (?,?)", (uuid, time.time()))

    def remove(self, uuid: str) -> bool:
        found = self.contains(uuid)
        self._sql.write("DELETE FROM published_image WHERE image=?", (uuid,))
        return found

    def contains(self, uuid: str) -> bool:
        return self._sql.one("SELECT 1 FROM published_image WHERE image=?", (uuid,)) is not None

    def all(self) -> list[str]:
        return [r[0] for r in self._sql.all("SELECT image FROM published_image ORDER BY published_at")]


class ImageScope:
    def __init__(
        self, backend: Backend, path: Path | None, owners: OperationOwners, *, scoped: bool = False
    ) -> None:
        self.backend = backend
        self.scoped = scoped
        self._owners = owners
        self._sql = SqliteCache(path, SCHEMA)
        self.published = PublishedImages(self._sql)

    # ---- resolution and access -----------------------------------------------------------------------

    async def resolve(self, ref: str, principal: str | None) -> str:
        """The UUID `ref` names for this principal; hidden and missing images raise the same NotFound."""
        if not self.scoped:
            return await resolve_image(self.backend, ref)
        uuid, tag = split_ref(ref)
        if uuid is not None:
            await self.require(uuid, principal)
            return uuid
        assert tag is not None
        own = self._own_image(principal, tag)
        if own is None and await self._settle_pending(principal, tag):
            own = self._own_image(principal, tag)
        if own is not None:
            try:
                await self.require(own, principal)
            except NotFound:
                raise tag_not_found(tag) from None
            return own
        try:
            # a backend tag is a shared tag: its image is visible to everybody
            return await self.backend.resolve_tag(tag)
        except NotFound:
            raise tag_not_found(tag) from None

    async def require(self, uuid: str, principal: str | None) -> api.Image:
        """The backend's record of an image this principal may see (else NotFound)."""
        try:
            image = await self.backend.get_image(uuid)
        except NotFound:
            raise image_not_found(uuid) from None
        if self.scoped and not self._visible(image, principal):
            raise image_not_found(uuid)
        return image

    def _visible(self, image: api.Image, principal: str | None) -> bool:
        uuid = image.uuid
        if image.tag or self.published.contains(uuid) or self._owns(principal, uuid):
            return True
        op = image.operation_uuid
        if op and self._owners.visible(principal, op):
            self._sql.write(
                "INSERT OR IGNORE INTO image_owner VALUES (?,?,?)", (_key(principal), uuid, time.time())
            )
            return True
        return False

    def _owns(self, principal: str | None, uuid: str) -> bool:
        row = self._sql.one(
            "SELECT 1 FROM image_owner WHERE principal=? AND image=?", (_key(principal), uuid)
        )
        return row is not None

    def _own_image(self, principal: str | None, tag: str) -> str | None:
        row = self._sql.one(
            "SELECT image FROM principal_tag WHERE principal=? AND tag=?", (_key(principal), tag)
        )
        return str(row[0]) if row else None

    def _own_tag(self, principal: str | None, uuid: str) -> str | None:
        row = self._sql.one(
            "SELECT tag FROM principal_tag WHERE principal=? AND image=?", (_key(principal), uuid)
        )
        return str(row[0]) if row else None

    def view(self, image: api.Image, principal: str | None) -> ImageOutput:
        """The image as this principal sees it: its own tag first; another principal's operation hidden."""
        out = image_output(image)
        if not self.scoped:
            return out
        own_tag = self._own_tag(principal, out.uuid)
        op = out.operation_uuid
        return msgspec.structs.replace(
            out,
            tag=own_tag or out.tag,
            operation_uuid=op if op and self._owners.visible(principal, op) else None,
        )

    # ---- the tools -------------------------------------------------------------------------------------

    async def get(self, ref: str, principal: str | None) -> ImageOutput:
        uuid = await self.resolve(ref, principal)
        if not self.scoped:
            return image_output(await self.backend.get_image(uuid))
        return self.view(await self.require(uuid, principal), principal)

    async def list_images(
        self, query: ImageQuery, principal: str | None, prefix: str | None = None
    ) -> list[ImageOutput]:
        """`query`'s page as this principal sees it; `prefix` filters tags exactly (the backend's `tag` is
        the prefix with trailing separators stripped, so "common" also matches "commonx/…")."""
        if not self.scoped:
            out = [image_output(i) for i in await self.backend.list_images(query)]
            return [i for i in out if i.tag is not None and i.tag.startswith(prefix)] if prefix else out
        # Walk the backend's listing (newest first, its time filters applied) and keep what this principal
        # may see, so offset/limit count visible images only.
        owned_ops = self._owners.owned(principal)
        own = {
            r[0] for r in self._sql.all("SELECT image FROM image_owner WHERE principal=?", (_key(principal),))
        }
        own_tags = dict(
            self._sql.all("SELECT image, tag FROM principal_tag WHERE principal=?", (_key(principal),))
        )
        published = set(self.published.all())
        wanted = query.offset + query.limit
        found: list[ImageOutput] = []
        for page_number in range(LIST_MAX_PAGES):
            page = await self.backend.list_images(
                ImageQuery(
                    limit=LIST_PAGE,
                    offset=page_number * LIST_PAGE,
                    since=query.since,
                    until=query.until,
                    kind=query.kind,
                )
            )
            for raw in page:
                image = image_output(raw)
                op = image.operation_uuid
                mine = image.uuid in own or (op is not None and op in owned_ops)
                if mine and image.uuid not in own:
                    # kept beyond the operation record's retention
                    self._sql.write(
                        "INSERT OR IGNORE INTO image_owner VALUES (?,?,?)",
                        (_key(principal), image.uuid, time.time()),
                    )
                if not (mine or image.tag or image.uuid in published):
                    continue
                tag = own_tags.get(image.uuid) or image.tag
                if (query.tagged or prefix) and not tag:
                    continue
                if prefix and not (tag or "").startswith(prefix):
                    continue
                found.append(
                    msgspec.structs.replace(image, tag=tag, operation_uuid=op if op in owned_ops else None)
                )
            if len(found) >= wanted or len(page) < LIST_PAGE:
                break
        return found[query.offset : wanted]

    async def set_tag(self, uuid: str, tag: str, principal: str | None) -> ImageOutput:
        """Tag an image this principal sees; the tag moves from whichever image held it (in its namespace)."""
        if not self.scoped:
            return image_output(await self.backend.set_tag(uuid, tag))
        image = await self.require(uuid, principal)
        key = _key(principal)
        self._sql.write_many(
            [
                ("DELETE FROM principal_tag WHERE principal=? AND (tag=? OR image=?)", (key, tag, uuid)),
                ("INSERT INTO principal_tag VALUES (?,?,?,?)", (key, tag, uuid, time.time())),
            ]
        )
        return self.view(image, principal)

    async def delete_tag(self, uuid: str, tag: str | None, principal: str | None) -> ImageOutput:
        """Remove the principal's tag from the image (`tag` given: only that one, else NotFound)."""
        if not self.scoped:
            await self.backend.delete_tag(uuid, tag)
            return image_output(await self.backend.get_image(uuid))
        image = await self.require(uuid, principal)
        own = self._own_tag(principal, uuid)
        if tag is not None and own != tag:
            if image.tag == tag:
                raise ToolError(
                    f"{tag!r} is a shared tag set by the server's operator: it cannot be removed or moved "
                    "here. Tag your own image instead; your tags take precedence for you."
                )
            raise NotFound(f"image {uuid} has no tag {tag!r}")
        self._sql.write("DELETE FROM principal_tag WHERE principal=? AND image=?", (_key(principal), uuid))
        return self.view(image, principal)

    async def tags(self, prefix: str, principal: str | None) -> list[str]:
        """Tags starting with `prefix` this principal can resolve (its own and the shared ones)."""
        found: set[str] = set()
        if self.scoped:
            rows = self._sql.all("SELECT tag FROM principal_tag WHERE principal=?", (_key(principal),))
            found.update(r[0] for r in rows if r[0].startswith(prefix))
        query = ImageQuery(limit=100, tagged=True, tag=prefix.rstrip(":/.") or None)
        for image in await self.backend.list_images(query):
            if image.tag and image.tag.startswith(prefix):
                found.add(image.tag)
        return sorted(found)

    # ---- bookkeeping -----------------------------------------------------------------------------------

    def tag_after_import(self, operation_id: str, principal: str | None, tag: str) -> None:
        """A scoped import's tag: applied in the principal's namespace once the import succeeds."""
        self._sql.write(
            "INSERT OR REPLACE INTO pending_tag VALUES (?,?,?,?)",
            (operation_id, _key(principal), tag, time.time()),
        )

    async def _settle_pending(self, principal: str | None, tag: str) -> bool:
        """Apply `tag` if an import of this principal that asked for it has ended since (an import with
        wait=false that nobody looked at again); True when a tag was applied."""
        rows = self._sql.all(
            "SELECT operation_id FROM pending_tag WHERE principal=? AND tag=?", (_key(principal), tag)
        )
        applied = False
        for (op_id,) in rows:
            try:
                op = await self.backend.get_operation(op_id)
            except NotFound:  # gone: it will never tag anything
                self._sql.write("DELETE FROM pending_tag WHERE operation_id=?", (op_id,))
                continue
            if op.status == "SUCCESS":
                self.observe(op, principal)
                applied = True
            elif op.status in ("FAILED", "CANCELLED"):
                self._sql.write("DELETE FROM pending_tag WHERE operation_id=?", (op_id,))
        return applied

    def result_tag(self, operation_id: str, principal: str | None, image: str | None) -> str | None:
        """The principal's tag on an import's result (None unscoped: the backend reports its own)."""
        if not self.scoped or not image:
            return None
        return self._own_tag(principal, image)

    def observe(self, op: api.OperationSummary, principal: str | None) -> None:
        """Record the result image of a terminal operation of `principal` as its own."""
        if not self.scoped:
            return
        result = op.result_image_uuid
        if not result and isinstance(op, api.OperationResponse) and op.result is not None:
            result = op.result.image
        if op.status != "SUCCESS" or not result or not self._owners.visible(principal, op.uuid):
            return
        key = _key(principal)
        op_id = op.uuid
        # an unchanged run answers with its input image: that grants nothing new
        if op.kind == "image_import" or result != op.image_uuid:
            self._sql.write("INSERT OR IGNORE INTO image_owner VALUES (?,?,?)", (key, result, time.time()))
        pending = self._sql.one(
            "SELECT tag FROM pending_tag WHERE operation_id=? AND principal=?", (op_id, key)
        )
        if pending is not None:
            self._sql.write_many(
                [
                    (
                        "DELETE FROM principal_tag WHERE principal=? AND (tag=? OR image=?)",
                        (key, pending[0], result),
                    ),
                    ("INSERT INTO principal_tag VALUES (?,?,?,?)", (key, pending[0], result, time.time())),
                    ("DELETE FROM pending_tag WHERE operation_id=?", (op_id,)),
                ]
            )

    def prune(self, older_than_days: float) -> None:
        self._sql.delete_older("pending_tag", "created_at", older_than_days)

    def close(self) -> None:
        self._sql.close()


def _key(principal: str | None) -> str:
    return principal or ""
