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

import msgspec

from contree import api
from contree.backend import Backend, LineageReader
from contree.errors import BackendError
from contree.timeparse import isoformat
from tools.stores.sqlite_cache import SqliteCache

MAX_WALK = 50
COMMAND_CHARS = 200  # an entry's command is shown up to this many characters


class LineageEntry(api.Model, omit_defaults=True):
    """What made one image: its operation, the command (or the registry it was imported from), when."""

    operation_id: str | None = None
    command: str | None = None
    registry_url: str | None = None
    created_at: str | None = None
    tag: str | None = None


class LineageData(api.Model, omit_defaults=True):
    """The viewed image's own record: how it was made (a recorded edge, or the engine's)."""

    parent_image: str | None = None
    operation_id: str | None = None
    kind: str | None = None
    registry_url: str | None = None
    tag: str | None = None
    command: str | None = None
    created_at: str | None = None  # ISO 8601


class LineageView(api.Model):
    image: str
    parent: str | None = None
    children: list[str] = msgspec.field(default_factory=list)
    descendants: list[str] = msgspec.field(default_factory=list)
    ancestors: list[str] = msgspec.field(default_factory=list)
    root: str | None = None
    depth: int = 0
    is_known: bool = False
    data: LineageData | None = None
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

    def record(
        self,
        principal: str,
        image: str,
        parent: str | None,
        *,
        kind: str,
        operation_id: str | None = None,
        registry_url: str | None = None,
        tag: str | None = None,
        command: str | None = None,
    ) -> None:
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
                operation_id,
                kind,
                registry_url,
                tag,
                now,
                now,
                command,
            ),
        )

    def row(self, principal: str, image: str) -> LineageData | None:
        found = self._sql.one(
            "SELECT parent, operation_id, kind, registry_url, tag, command, created_at FROM lineage"
            " WHERE principal=? AND image=?",
            (principal, image),
        )
        if found is None:
            return None
        parent, operation_id, kind, registry_url, tag, command, created_at = found
        return LineageData(
            parent_image=parent,
            operation_id=operation_id,
            kind=kind,
            registry_url=registry_url,
            tag=tag,
            command=command,
            created_at=isoformat(created_at),
        )

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

    def __init__(self, backend: Backend, store: EdgeStore, *, native: bool = True) -> None:
        self._backend = backend
        self._store = store
        # native=False: per-principal recorded edges even on the embedded engine, whose own lineage spans
        # every principal's images (used when operations are scoped per principal)
        self._reader = backend if native and isinstance(backend, LineageReader) else None

    def observe(self, op: api.OperationSummary, principal: str | None = None) -> None:
        """Record the edge a terminal operation implies (no-op when nothing new was made). A listed
        summary has no metadata: its edge is recorded without the command or the registry."""
        if op.status != "SUCCESS":
            return
        full = op if isinstance(op, api.OperationResponse) else None
        result = op.result_image_uuid or (full.result.image if full is not None and full.result else None)
        if not result:
            return
        key = principal or ""
        if op.kind == "image_import":
            meta = full.import_metadata() if full is not None else None
            self._store.record(
                key,
                result,
                None,
                operation_id=op.uuid,
                kind="image_import",
                registry_url=meta.registry.url if meta is not None and meta.registry is not None else None,
                tag=meta.tag if meta is not None else None,
            )
            return
        source = op.image_uuid
        if source and source != result:
            self._store.record(key, source, None, kind="image")
            self._store.record(
                key, result, source, operation_id=op.uuid, kind="instance", command=command_of(full)
            )

    async def view(self, image: str, principal: str | None = None) -> LineageView:
        if self._reader is not None:
            return await self._native_view(self._reader, image)
        return self._recorded_view(image, principal or "")

    async def _native_view(self, reader: LineageReader, image: str) -> LineageView:
        lineage = await reader.image_lineage(image)
        parent = lineage.parent.uuid if lineage.parent is not None else None
        ancestors = [a.uuid for a in lineage.ancestors]
        children = [c.uuid for c in lineage.children]
        descendants = await self._walk_children(reader, children)
        view = LineageView(
            image=image,
            parent=parent,
            children=children,
            descendants=descendants,
            ancestors=ancestors,
            root=lineage.root.uuid,
            depth=lineage.depth,
            is_known=True,
            data=None,
        )
        for uuid in dict.fromkeys([image, *ancestors, *children, *descendants]):
            view.entries[uuid] = await self._native_entry(uuid)
        own = view.entries[image]
        view.data = LineageData(
            parent_image=parent, operation_id=own.operation_id, command=own.command, created_at=own.created_at
        )
        return view

    async def _native_entry(self, uuid: str) -> LineageEntry:
        """An image's tag, time and creating operation (its command), from the backend's records."""
        try:
            image = await self._backend.get_image(uuid)
        except BackendError:
            return LineageEntry()
        entry = LineageEntry(operation_id=image.operation_uuid, created_at=image.created_at, tag=image.tag)
        if entry.operation_id:
            try:
                op = await self._backend.get_operation(entry.operation_id)
            except BackendError:
                return entry
            entry.command = command_of(op, image=uuid)
            meta = op.import_metadata()
            if meta is not None and meta.registry is not None:
                entry.registry_url = meta.registry.url
        return entry

    async def _walk_children(self, reader: LineageReader, children: list[str]) -> list[str]:
        found: list[str] = []
        queue = list(children)
        while queue and len(found) < MAX_WALK:
            child = queue.pop(0)
            if child in found:
                continue
            found.append(child)
            queue.extend(c.uuid for c in (await reader.image_lineage(child)).children)
        return found

    def _recorded_view(self, image: str, principal: str) -> LineageView:
        row = self._store.row(principal, image)
        ancestors: list[str] = []
        seen = {image}
        current = row.parent_image if row else None
        while current and current not in seen and len(ancestors) < MAX_WALK:
            ancestors.append(current)
            seen.add(current)
            parent_row = self._store.row(principal, current)
            current = parent_row.parent_image if parent_row else None
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
                    operation_id=found.operation_id,
                    command=found.command,
                    registry_url=found.registry_url,
                    created_at=found.created_at,
                    tag=found.tag,
                )
        return view

    def close(self) -> None:
        self._store.close()


class _SandboxRan(msgspec.Struct):
    """What a long-lived sandbox's record keeps of the commands run in it (`sandbox_run._record_sandbox`)."""

    commands: list[str] = msgspec.field(default_factory=list)
    snapshot_commands: dict[str, int] = msgspec.field(default_factory=dict)  # image -> commands before it


class _Command(msgspec.Struct):
    """What lineage reads of an instance's request echo: the command, never its env or files."""

    command: str | None = None
    args: list[str] = msgspec.field(default_factory=list)
    sandbox: _SandboxRan | None = None


def command_of(op: api.OperationResponse | None, image: str | None = None) -> str | None:
    """The command an instance operation ran (never its env or files), cut to COMMAND_CHARS. For a
    long-lived sandbox: the commands run in it before `image` (a snapshot of it) was taken."""
    if op is None or op.kind != "instance" or not op.metadata:
        return None
    try:
        ran = msgspec.convert(op.metadata, _Command)  # reads a few keys, not the whole echo
    except msgspec.ValidationError:
        return None
    if ran.sandbox is not None:
        return sandbox_commands(ran.sandbox, image)
    if ran.command is None:
        return None
    command = " ".join([ran.command, *ran.args]) if ran.args else ran.command
    return _cut(command)


def sandbox_commands(sandbox: _SandboxRan, image: str | None = None) -> str:
    """'sandbox: cmd1; cmd2; …' — what ran in a sandbox before `image` was taken from it (all so far
    when `image` is not one of its snapshots)."""
    commands = sandbox.commands
    taken = sandbox.snapshot_commands.get(image or "")
    if taken is not None:
        commands = commands[:taken]
    return _cut("sandbox: " + ("; ".join(commands) if commands else "(no commands)"))


def _cut(command: str) -> str:
    return command if len(command) <= COMMAND_CHARS else command[: COMMAND_CHARS - 1] + "…"
