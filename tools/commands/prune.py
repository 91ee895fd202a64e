"""`contree-mcp images prune`: give disk back from an engine home (safe beside a running server)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from contree.config import default_home
from contree.engine.prune import DEFAULT_KEEP, PruneReport, prune
from contree.timeparse import parse_interval
from tools.stores.dirstate import DirectoryStates


def _age(text: str) -> float:
    try:
        return parse_interval(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contree-mcp images prune",
        description="Free disk in the embedded engine's home: layers no image uses, output of runs that "
        "ended, uploads, sync chunks and directory states older than --older-than (default 7d) and, with "
        "--untagged, untagged images. Never deleted: an image with a tag, one a queued or running "
        "operation uses, an ancestor of an image that stays. Safe while a server uses the same home.",
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="engine state directory (default: $CONTREE_ENGINE_HOME, else $XDG_DATA_HOME/contree-mcp)",
    )
    parser.add_argument(
        "--older-than",
        type=_age,
        default=None,
        metavar="AGE",
        help="only what is older than AGE, e.g. 12h, 7d, 2w (images: any age when not given; the rest: 7d)",
    )
    parser.add_argument("--untagged", action="store_true", help="also delete untagged images")
    parser.add_argument("--dry-run", action="store_true", help="report what would be freed; delete nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def prune_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home: Path = args.home or default_home()
    if not (home / "images.db").exists():
        print(f"no engine store at {home}", file=sys.stderr)
        return 1
    report = prune(home, older_than=args.older_than, untagged=args.untagged, dry_run=args.dry_run)
    states = 0
    if not args.dry_run and (home / "mcp" / "files.db").exists():
        keep = DEFAULT_KEEP if args.older_than is None else args.older_than
        directory_states = DirectoryStates(home / "mcp" / "files.db")
        try:
            states = directory_states.prune(keep / 86400)
        finally:
            directory_states.close()
    if args.json:
        doc = msgspec.to_builtins(report) | {"directory_states": states, "total_bytes": report.total_bytes}
        print(msgspec.json.encode(doc).decode())
    else:
        print(describe(report, states))
    return 0


def describe(report: PruneReport, states: int) -> str:
    verb = "would free" if report.dry_run else "freed"
    lines = [
        f"images:    {len(report.images)} untagged",
        f"layers:    {report.layers} ({_size(report.layer_bytes)})",
        f"output:    {report.outputs} runs ({_size(report.output_bytes)})",
        f"uploads:   {report.uploads} ({_size(report.upload_bytes)})",
        f"chunks:    {report.chunks} ({_size(report.chunk_bytes)})",
    ]
    if not report.dry_run:
        lines.append(f"directory states: {states}")
    lines.append(f"{verb} {_size(report.total_bytes)}")
    return "\n".join(lines)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
