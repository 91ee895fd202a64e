"""The embedded engine's command-line entry points (library modules hold none).

`contree-mcp engine check` → `check_main`, `contree-mcp images bootstrap` → `bootstrap_main` (dispatched
by `tools/cli.py`), and `python -m contree.engine.cli subids ensure|show` → `subids_main` (what `make
install-system` runs, before any Python package is installed). `contree-mcp images prune` lives in
`tools/maintenance.py`: it prunes the MCP server's own stores too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from contree.config import default_home
from contree.engine.runtime import subids
from contree.engine.storage.bootstrap import DEBIAN_MIRROR, KINDS, BootstrapError, bootstrap_images
from contree.engine.storage.store import Store

_HOME_HELP = "engine state directory (default: $CONTREE_ENGINE_HOME, else $XDG_DATA_HOME/contree-mcp)"


def check_main(argv: Sequence[str] | None = None) -> int:
    """`contree-mcp engine check --home DIR`: print the store's problems; exit 1 when there are any."""
    parser = argparse.ArgumentParser(prog="contree-mcp engine check", description=check_main.__doc__)
    parser.add_argument("--home", type=Path, default=default_home(), help=_HOME_HELP)
    parser.add_argument("--repair", action="store_true", help="run start-up recovery first (engine stopped)")
    args = parser.parse_args(argv)
    if not (args.home / "images.db").exists():
        print(f"no engine store at {args.home}", file=sys.stderr)
        return 1
    store = Store(args.home)
    try:
        if args.repair:
            for action in store.recover():
                print(f"repaired: {action}")
        problems = store.check()
    finally:
        store.close()
    for p in problems:
        print(p)
    if not problems:
        print(f"store at {args.home}: ok")
    return 1 if problems else 0


def bootstrap_main(argv: Sequence[str] | None = None) -> int:
    """`contree-mcp images bootstrap [--home DIR] [--only busybox|debian]`."""
    parser = argparse.ArgumentParser(prog="contree-mcp images bootstrap",
                                     description="Create the busybox:latest and debian:bookworm base images.")
    parser.add_argument("--home", type=Path, default=None, help=_HOME_HELP)
    parser.add_argument("--only", choices=KINDS, action="append", help="build only this image (repeatable)")
    parser.add_argument("--mirror", default=DEBIAN_MIRROR, help="Debian mirror for debian:bookworm")
    args = parser.parse_args(argv)
    store = Store(args.home or default_home())
    try:
        for image in bootstrap_images(store, tuple(args.only or KINDS), mirror=args.mirror):
            print(f"{image.tag}\t{image.uuid}")
    except BootstrapError as exc:
        print(f"bootstrap failed: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def subids_main(argv: Sequence[str] | None = None) -> int:
    """`python -m contree.engine.cli subids ensure|show`: the sandboxes' host id range."""
    parser = argparse.ArgumentParser(
        prog="python -m contree.engine.cli subids",
        description=f"The sandboxes' host id range ({subids.NAME} in /etc/subuid and /etc/subgid).")
    parser.add_argument("action", choices=["ensure", "show"],
                        help="ensure: allocate it if missing (root); show: print it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        found = subids.engine_range(allocate=args.action == "ensure")
    except subids.SubidError as exc:
        print(f"contree-engine ids: {exc}", file=sys.stderr)
        return 1
    last = found.size - 1
    print(f"{subids.NAME}: uids {found.uid}..{found.uid + last}, gids {found.gid}..{found.gid + last}")
    return 0


COMMANDS = {"check": check_main, "bootstrap": bootstrap_main, "subids": subids_main}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m contree.engine.cli {check,bootstrap,subids} …`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(f"usage: python -m contree.engine.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
