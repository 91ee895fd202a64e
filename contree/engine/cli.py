"""The embedded engine's command-line entry points (library modules hold none).

`contree-mcp engine check` → `check_main` (readiness, root or rootless, then the store),
`contree-mcp images bootstrap` → `bootstrap_main` (dispatched
by `tools/cli.py`), and `python -m contree.engine.cli subids ensure|show` → `subids_main` (what `make
install-system` runs, before any Python package is installed). `contree-mcp images prune` lives in
`tools/commands/prune.py`: it prunes the MCP server's own stores too.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import sys
from collections.abc import Sequence
from pathlib import Path

from contree.config import default_home
from contree.engine.runtime import subids

# `make install-system` runs `subids ensure` with the system's python before any package is installed:
# this module imports only the standard library at the top; each command imports what it needs.

_HOME_HELP = "engine state directory (default: $CONTREE_ENGINE_HOME, else $XDG_DATA_HOME/contree-mcp)"


def check_main(argv: Sequence[str] | None = None) -> int:
    """`contree-mcp engine check [--home DIR] [--repair]`: exit 1 when something must be fixed."""
    parser = argparse.ArgumentParser(
        prog="contree-mcp engine check",
        description="Check that this user can run the embedded engine here (for a non-root user: the "
        "rootless engine's prerequisites, each with its fix), then the engine store in the home.")
    parser.add_argument("--home", type=Path, default=None, help=_HOME_HELP)
    parser.add_argument("--repair", action="store_true",
                        help="run the store's start-up recovery first (engine stopped)")
    args = parser.parse_args(argv)
    from contree.engine.runtime.rootless import check as readiness

    home = (args.home or default_home()).expanduser().absolute()
    if os.geteuid() == 0:
        print("engine readiness (root: sandboxes in the engine's own id range)")
        findings = readiness.root_findings()
    else:
        print(f"engine readiness (rootless, as {pwd.getpwuid(os.getuid()).pw_name}: docs/rootless.md)")
        findings = readiness.rootless_findings(home)
    for f in findings:
        print(f"  {f.status:<5} {f.what}: {f.detail}")
        if f.fix and f.status != readiness.OK:
            print(f"        fix: {f.fix}")
    failed = any(f.status == readiness.FAIL for f in findings)
    if not (home / "images.db").exists():
        print(f"no engine store at {home} yet")
        return 1 if failed else 0
    rootless = os.geteuid() != 0 and not failed
    if rootless:  # its files belong to the engine's ids: look at them from its namespace
        from contree.engine.runtime.rootless.namespaces import NamespaceError, enter

        try:
            enter(home)
        except (NamespaceError, OSError) as exc:
            print(f"store at {home}: not checked ({exc})")
            return 1
    return max(int(failed), check_store_main(["--home", str(home), *(["--repair"] if args.repair else [])]))


def check_store_main(argv: Sequence[str] | None = None) -> int:
    """The store part of `engine check`: print the store's problems; exit 1 when there are any."""
    parser = argparse.ArgumentParser(prog="contree-mcp engine check", description=check_store_main.__doc__)
    parser.add_argument("--home", type=Path, default=default_home(), help=_HOME_HELP)
    parser.add_argument("--repair", action="store_true", help="run start-up recovery first (engine stopped)")
    args = parser.parse_args(argv)
    if not (args.home / "images.db").exists():
        print(f"no engine store at {args.home}", file=sys.stderr)
        return 1
    from contree.engine.storage.store import Store

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
    from contree.engine.storage.bootstrap import DEBIAN_MIRROR, KINDS, BootstrapError, bootstrap_images
    from contree.engine.storage.store import Store

    parser.add_argument("--only", choices=KINDS, action="append", help="build only this image (repeatable)")
    parser.add_argument("--mirror", default=DEBIAN_MIRROR, help="Debian mirror for debian:bookworm")
    args = parser.parse_args(argv)
    home = args.home or default_home()
    if os.geteuid() != 0:  # a user's images live in the rootless engine's ids: build them in its namespace
        from contree.engine.runtime.rootless.namespaces import NamespaceError, enter

        try:
            enter(home)
        except (NamespaceError, OSError) as exc:
            print(f"bootstrap failed: cannot enter the rootless engine's namespaces: {exc}", file=sys.stderr)
            return 1
    store = Store(home)
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
