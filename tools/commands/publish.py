"""`contree-mcp images publish|unpublish|published`: the operator shares images with every HTTP principal.

With `--http-tokens-file` a principal sees its own images plus shared ones (`tools.stores.image_scope`): those
carrying a backend tag and those published here. Publishing records the image's UUID (a tag is resolved
first, so the image stays shared when the tag moves on) in the same database the server reads, so it
takes effect at once, also while the server runs. The embedded engine's store is read directly (no
engine lock is taken), a Contree backend through its API.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from contree.config import ConfigError, open_backend, resolve_backend_config
from contree.engine.storage.store import Store
from contree.errors import BackendError
from protocol.errors import ToolError
from tools.cli import backend_flags
from tools.refs import split_ref
from tools.stores.image_scope import SCHEMA, ImageScope, PublishedImages
from tools.stores.owners import OperationOwners
from tools.stores.sqlite_cache import SqliteCache
from tools.version import __version__


def build_parser(verb: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"contree-mcp images {verb}", description=description)
    if verb != "published":
        p.add_argument("images", nargs="+", metavar="IMAGE", help="image UUID, 'tag:<tag>' or a bare tag")
    p.add_argument("--backend", choices=("local", "contree"), default=None, help="as for the server")
    p.add_argument("--home", type=Path, default=None, help="engine state directory (as the server's)")
    p.add_argument("--url", default=None, help="Contree API URL (env CONTREE_URL)")
    p.add_argument("--token", default=None, help="Contree API token (env CONTREE_TOKEN)")
    p.add_argument("--profile", default=None, help="auth.ini profile (env CONTREE_PROFILE)")
    p.add_argument("--project", default=None, help="Nebius project id (env CONTREE_PROJECT)")
    p.add_argument("--auth-type", choices=("iam", "jwt"), default=None)
    p.add_argument("--cache-general", type=Path, default=None, help="the server's --cache-general, if given")
    return p


async def _resolve_all(args: argparse.Namespace, refs: list[str], *, check: bool) -> tuple[Path, list[str]]:
    """(the scope database, the UUIDs of `refs`); with `check`, each must exist on the backend (an image
    that is gone can still be unpublished by UUID)."""
    config = resolve_backend_config(backend_flags(args), dict(os.environ))
    cache_dir = (config.home if config.kind == "local" else config.config_home) / "mcp"
    database = args.cache_general or cache_dir / "operations.db"
    pending = [ref for ref in refs if check or split_ref(ref)[0] is None]
    if not pending:
        return database, [str(split_ref(ref)[0]) for ref in refs]
    if config.kind == "local":
        if not (config.home / "images.db").exists():
            raise ConfigError(f"no engine state at {config.home}: pass --home")
        store = Store(config.home)
        try:
            found = {ref: await asyncio.to_thread(_resolve_in_store, store, ref) for ref in pending}
        finally:
            store.close()
    else:
        backend = await open_backend(config, user_agent=f"contree-mcp/{__version__}")
        try:
            scope = ImageScope(backend, None, OperationOwners(None))
            found = {ref: (await scope.get(ref, None)).uuid for ref in pending}
        finally:
            await backend.close()
    return database, [found.get(ref) or str(split_ref(ref)[0]) for ref in refs]


def _resolve_in_store(store: Store, ref: str) -> str:
    uuid, tag = split_ref(ref)
    return store.get(uuid).uuid if uuid is not None else store.resolve_tag(tag or "")


def _run(verb: str, description: str, argv: Sequence[str] | None) -> int:
    args = build_parser(verb, description).parse_args(argv)
    refs: list[str] = list(getattr(args, "images", []))
    try:
        database, uuids = asyncio.run(_resolve_all(args, refs, check=verb == "publish"))
    except (BackendError, ToolError) as exc:
        print(f"contree-mcp images {verb}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"contree-mcp images {verb}: {exc}", file=sys.stderr)
        return 2
    sql = SqliteCache(database, SCHEMA)
    published = PublishedImages(sql)
    try:
        for ref, uuid in zip(refs, uuids, strict=True):
            if verb == "publish":
                published.add(uuid)
                print(f"published\t{uuid}\t{ref}")
            elif published.remove(uuid):
                print(f"unpublished\t{uuid}\t{ref}")
            else:
                print(f"not published\t{uuid}\t{ref}")
        if verb == "published":
            for uuid in published.all():
                print(uuid)
    finally:
        sql.close()
    return 0


def publish_main(argv: Sequence[str] | None = None) -> int:
    return _run(
        "publish",
        "Share images with every principal of an HTTP server run with --http-tokens-file "
        "(images carrying a tag set by the operator are shared already).",
        argv,
    )


def unpublish_main(argv: Sequence[str] | None = None) -> int:
    return _run("unpublish", "Stop sharing images published with 'contree-mcp images publish'.", argv)


def published_main(argv: Sequence[str] | None = None) -> int:
    return _run("published", "List the UUIDs of the published images.", argv)
