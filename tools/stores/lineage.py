"""Image lineage: which image each image was made from.

The embedded engine stores `parent` with every image, so its view is authoritative
(`LocalEngine.image_lineage`). For a remote Contree, the backend has no parent concept: we record an edge
(result image ← source image) for every terminal operation the server learns about, in SQLite in the
cache directory, keyed per principal. Parent links are computed at read time, so a parent recorded
after its child is linked automatically (back-fill).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec

from contree.errors import BackendError
from contree.timeparse import isoformat
from tools.convert import as_dict
from tools.stores.sqlite_cache import SqliteCache

MAX_WALK = 50
COMMAND_CHARS = 200  # an entry's command is shown up to this many characters


class LineageEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What made one image: its operation, the command (or the registry it was imported from), when."""

    operation_id: str | None = None
    command: str | None = None
    registry_url: str | None = None
    created_at: str | None = None
    tag: str | None = None


class LineageView(msgspec.Struct, kw_only=True):
    image: str
    parent: str | None = None
    children: list[str] = msgspec.field(default_factory=list)
    descendants: list[str] = msgspec.field(default_factory=list)
    ancestors: list[str] = msgspec.field(default_factory=list)
    root: str | None = None
    depth: int = 0
    is_known: bool = False
    data: dict[str, Any] | None = None
    # every image named above → what made it, so branches can be told apart
    entries: dict[str, LineageEntry] = msgspec.field(default_factory=dict)


class EdgeStore:
    """SQLite edges `child → parent` with the creating operation; safe from any thread."""

    def __init__(self, path: Path | None) -> None:
        self._sql = SqliteCache(
            path,
            [
                "CREATE TABLE IF NOT EXISTS lineage (principal TEXT NOT NULL, image TEXT NOT NULL,"
                " parent TEXT, operation_id TEXT, kind TEXT, registry_url TEXT, tag TEXT,"
                " created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (principal, image))",
                "CREATE INDEX IF NOT EXISTS lineage_parent ON lineage (principal, parent)",
            ],
        )
        if "command" not in {row[1] for row in self._sql.all("PRAGMA table_info(lineage)")}:
            self._sql.write("ALTER TABLE lineage ADD COLUMN command TEXT")  # caches of older versions

    def record(self, principal: str, image: str, parent: str | None, **data: str | None) -> None:
        now = time.time()
        self._sql.write(
            "INSERT INTO lineage (principal, image, parent, operation_id, kind, registry_url, tag,"
            " created_at, updated_at, command) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (principal, image) DO UPDATE SET"
            " parent=COALESCE(excluded.parent, parent), operation_id=COALESCE(excluded.operation_id,"
            " operation_id), command=COALESCE(excluded.command, command), updated_at=excluded.updated_at",
            (
                principal,
                image,
                parent,
                data.get("operation_id"),
                data.get("kind"),
                data.get("registry_url"),
                data.get("tag"),
                now,
                now,
                data.get("command"),
            ),
        )

    def row(self, principal: str, image: str) -> dict[str, Any] | None:
        found = self._sql.one(
            "SELECT parent, operation_id, kind, registry_url, tag, command, created_at FROM lineage"
            " WHERE principal=? AND image=?",
            (principal, image),
        )
        if found is None:
            return None
        keys = ("parent_image", "operation_id", "kind", "registry_url", "tag", "command", "created_at")
        return {k: v for k, v in zip(keys, found, strict=True) if v is not None}

    def children(self, principal: str, image: str) -> list[str]:
        rows = self._sql.all(
            "SELECT image FROM lineage WHERE principal=? AND parent=? ORDER BY created_at", (principal, image)
        )
        return [r[0] for r in rows]

    def prune(self, older_than_days: float) -> None:
        """Retention by last use (`updated_at`), as COMPAT §15.39 requires."""
        self._sql.delete_older("lineage", "updated_at", older_than_days)

    def close(self) -> None:
        self._sql.close()


class Lineage:
    """Lineage for the tools: the backend's own records when it has them, else recorded edges."""

    def __init__(self, backend: Any, store: EdgeStore, *, native: bool = True) -> None:
        self._backend = backend
        self._store = store
        # native=False: per-principal recorded edges even on the embedded engine, whose own lineage spans
        # every principal's images (used when operations are scoped per principal)
        self._native = native and callable(getattr(backend, "image_lineage", None))

    def observe(self, op: Any, principal: str | None = None) -> None:
        """Record the edge a terminal operation implies (no-op when nothing new was made)."""
        data = as_dict(op)
        if data.get("status") != "SUCCESS":
            return
        result = data.get("result_image_uuid") or as_dict(data.get("result")).get("image")
        if not result:
            return
        key = principal or ""
        if data.get("kind") == "image_import":
            meta = as_dict(data.get("metadata"))
            registry = as_dict(meta.get("registry"))
            self._store.record(
                key,
                result,
                None,
                operation_id=data.get("uuid"),
                kind="image_import",
                registry_url=registry.get("url"),
                tag=meta.get("tag"),
            )
            return
        source = data.get("image_uuid")
        if source and source != result:
            command = command_of(data)
            self._store.record(key, source, None, kind="image")
            self._store.record(
                key, result, source, operation_id=data.get("uuid"), kind="instance", command=command
            )

    async def view(self, image: str, principal: str | None = None) -> LineageView:
        if self._native:
            return await self._native_view(image)
        return self._recorded_view(image, principal or "")

    async def _native_view(self, image: str) -> LineageView:
        raw = as_dict(await self._backend.image_lineage(image))
        parent = _uuid_of(raw.get("parent"))
        ancestors = [u for u in (_uuid_of(a) for a in raw.get("ancestors") or []) if u]
        if parent and not ancestors:
            ancestors = [parent]
        children = [u for u in (_uuid_of(c) for c in raw.get("children") or []) if u]
        descendants = [u for u in (_uuid_of(c) for c in raw.get("descendants") or []) if u]
        if not descendants:
            descendants = await self._walk_children(children)
        view = LineageView(
            image=image,
            parent=parent,
            children=children,
            descendants=descendants,
            ancestors=ancestors,
            root=_uuid_of(raw.get("root")) or (ancestors[-1] if ancestors else image),
            depth=int(raw.get("depth", len(ancestors))),
            is_known=bool(raw.get("is_known", True)),
            data=None,
        )
        for uuid in dict.fromkeys([image, *ancestors, *children, *descendants]):
            view.entries[uuid] = await self._native_entry(uuid)
        own = view.entries[image]
        view.data = {
            k: v
            for k, v in {
                "parent_image": parent,
                "operation_id": own.operation_id,
                "command": own.command,
                "created_at": own.created_at,
            }.items()
            if v is not None
        }
        return view

    async def _native_entry(self, uuid: str) -> LineageEntry:
        """An image's tag, time and creating operation (its command), from the backend's records."""
        try:
            image = as_dict(await self._backend.get_image(uuid))
        except BackendError:
            return LineageEntry()
        entry = LineageEntry(
            operation_id=image.get("operation_uuid"), created_at=image.get("created_at"), tag=image.get("tag")
        )
        if entry.operation_id:
            try:
                op = as_dict(await self._backend.get_operation(entry.operation_id))
            except BackendError:
                return entry
            entry.command = command_of(op)
            if op.get("kind") == "image_import":
                entry.registry_url = as_dict(as_dict(op.get("metadata")).get("registry")).get("url")
        return entry

    async def _walk_children(self, children: list[str]) -> list[str]:
        found: list[str] = []
        queue = list(children)
        while queue and len(found) < MAX_WALK:
            child = queue.pop(0)
            if child in found:
                continue
            found.append(child)
            sub = as_dict(await self._backend.image_lineage(child))
            queue.extend(u for u in (_uuid_of(c) for c in sub.get("children") or []) if u)
        return found

    def _recorded_view(self, image: str, principal: str) -> LineageView:
        row = self._store.row(principal, image)
        ancestors: list[str] = []
        seen = {image}
        current = row.get("parent_image") if row else None
        while current and current not in seen and len(ancestors) < MAX_WALK:
            ancestors.append(current)
            seen.add(current)
            parent_row = self._store.row(principal, current)
            current = parent_row.get("parent_image") if parent_row else None
        children = self._store.children(principal, image)
        descendants: list[str] = []
        queue = list(children)
        while queue and len(descendants) < MAX_WALK:
            child = queue.pop(0)
            if child in seen:
                continue
            seen.add(child)
            descendants.append(child)
            queue.extend(self._store.children(principal, child))
        known = row is not None
        view = LineageView(
            image=image,
            parent=ancestors[0] if ancestors else None,
            children=children,
            descendants=descendants,
            ancestors=ancestors,
            root=ancestors[-1] if ancestors else (image if known else None),
            depth=len(ancestors),
            is_known=known,
            data=row,
        )
        for uuid in dict.fromkeys([image, *ancestors, *children, *descendants]):
            found = row if uuid == image else self._store.row(principal, uuid)
            if found is not None:
                view.entries[uuid] = LineageEntry(
                    operation_id=found.get("operation_id"),
                    command=found.get("command"),
                    registry_url=found.get("registry_url"),
                    created_at=isoformat(found["created_at"]) if "created_at" in found else None,
                    tag=found.get("tag"),
                )
        if row is not None and "created_at" in row:
            row["created_at"] = isoformat(row["created_at"])
        return view

    def close(self) -> None:
        self._store.close()


def command_of(op: dict[str, Any]) -> str | None:
    """The command an instance operation ran (never its env or files), cut to COMMAND_CHARS."""
    meta = as_dict(op.get("metadata"))
    command = meta.get("command")
    if not isinstance(command, str) or op.get("kind") not in (None, "instance"):
        return None
    args = meta.get("args")
    if isinstance(args, list) and args:
        command = " ".join([command, *map(str, args)])
    return command if len(command) <= COMMAND_CHARS else command[: COMMAND_CHARS - 1] + "…"


def _uuid_of(value: Any) -> str | None:
    """Lineage entries may be UUID strings or image records."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return as_dict(value).get("uuid")
