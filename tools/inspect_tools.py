"""list_files, read_file, grep: look inside an image without starting anything."""

from __future__ import annotations

import base64
import posixpath
import stat
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from contree import api
from contree.backend import GrepQuery
from protocol.errors import ToolError
from protocol.registry import Registry, RequestContext, ToolAnnotations
from tools.bounds import MAX_OFFSET
from tools.budget import RESULT_BUDGET, fit_prefix, json_len, keep_fitting
from tools.errors import backend_errors
from tools.image_files import decode_text, file_size, normalize_dir, read_bounded
from tools.models import (
    FileEntry,
    FileType,
    GrepMatchOutput,
    GrepOutput,
    GrepSubmatch,
    ListFilesOutput,
    ReadFileOutput,
)
from tools.params import ImageRef, PositiveBytes
from tools.state import ServerState

READ_OVERHEAD = 2048  # bytes of a read_file result that are not the content (fields, hint)
GREP_OVERHEAD = 1024  # room for next_offset and the hint
GREP_DEFAULT_TOTAL = 1000
GREP_MAX_TOTAL = 10000  # the API's cap on max_total


# A page of list_files stops at this many bytes of entries: the result carries each entry twice (as
# structuredContent and as indented JSON text), and the whole result stays within 64 KiB.
LIST_PAGE_BYTES = 56 * 1024
LIST_MAX_LIMIT = 10000


class ListFilesParams(api.Model):
    image: ImageRef
    path: Annotated[str, Meta(description="Directory to list (absolute; default '/').")] = "/"
    limit: Annotated[
        Annotated[int, Meta(ge=1, le=LIST_MAX_LIMIT)] | None,
        Meta(description="Entries per page at most (a page also ends before the result passes 64 KiB)."),
    ] = None
    cursor: Annotated[str | None, Meta(description="next_cursor of the previous page.")] = None


class ReadFileParams(api.Model):
    image: ImageRef
    path: Annotated[str, Meta(description="Absolute path of a regular file in the image.")]
    offset: Annotated[
        int, Meta(ge=0, le=MAX_OFFSET, description="Byte offset to start reading at (for paging big files).")
    ] = 0
    max_bytes: Annotated[
        PositiveBytes | None,
        Meta(description="Bytes to return at most (capped by the server's limit)."),
    ] = None


class GrepParams(api.Model):
    image: ImageRef
    pattern: Annotated[str | list[str], Meta(description="Rust regex (or a list, OR-ed).")]
    path: Annotated[
        str | list[str] | None, Meta(description="Directory or file to search (default '/').")
    ] = None
    glob: Annotated[
        str | list[str] | None, Meta(description="ripgrep glob filter, e.g. '*.py'; '!' negates.")
    ] = None
    max_count: Annotated[
        Annotated[int, Meta(ge=1, le=10000)] | None, Meta(description="Matches per file at most.")
    ] = None
    max_total: Annotated[
        Annotated[int, Meta(ge=1, le=10000)] | None,
        Meta(
            description="Matches in total at most (default 1000, and no more than fit about 64 KiB; "
            "an explicit value may fill the server's --read-max-bytes)."
        ),
    ] = None
    case: Annotated[
        Literal["sensitive", "insensitive", "smart"] | None,
        Meta(description="Case matching (default sensitive)."),
    ] = None
    before: Annotated[int, Meta(ge=0, le=50, description="Context lines before each match.")] = 0
    after: Annotated[int, Meta(ge=0, le=50, description="Context lines after each match.")] = 0
    offset: Annotated[
        int, Meta(ge=0, le=9999, description="Matches to skip: the next_offset of the previous page.")
    ] = 0


def file_type(item: api.FileItem) -> FileType:
    mode = item.mode
    if item.is_symlink or stat.S_ISLNK(mode):
        return "symlink"
    if item.is_dir or stat.S_ISDIR(mode):
        return "directory"
    if item.is_fifo or stat.S_ISFIFO(mode):
        return "fifo"
    if item.is_socket or stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "char_device"
    if stat.S_ISBLK(mode):
        return "block_device"
    return "file"


_entry_encoder = msgspec.json.Encoder()


def entry_cost(entry: FileEntry) -> int:
    """Bytes an entry adds to the result: its JSON in structuredContent, again indented in the text block
    (about 64 bytes of indentation), where quotes and backslashes are escaped once more."""
    raw = _entry_encoder.encode(entry)
    return 2 * len(raw) + 96 + raw.count(b'"') + raw.count(b"\\")


def page_of(directory: str, items: list[api.FileItem], start: int, limit: int | None) -> list[FileEntry]:
    """Entries from `start`: at most `limit`, and no more than LIST_PAGE_BYTES (at least one)."""
    page: list[FileEntry] = []
    used = 0
    for item in items[start : start + (limit or LIST_MAX_LIMIT)]:
        entry = file_entry(directory, item)
        used += entry_cost(entry)
        if page and used > LIST_PAGE_BYTES:
            break
        page.append(entry)
    return page


def file_entry(directory: str, item: api.FileItem) -> FileEntry:
    name = item.path.rstrip("/").rsplit("/", 1)[-1]
    kind = file_type(item)
    return FileEntry(
        name=name,
        path=posixpath.join(directory, item.path),
        type=kind,
        size=item.size,
        mode=oct(item.mode),
        target=(item.symlink_to or None) if kind == "symlink" else None,
    )


def as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def register(registry: Registry, state: ServerState) -> None:
    ro = ToolAnnotations(read_only=True, destructive=False, idempotent=True, open_world=False)

    @registry.tool(
        name="list_files",
        title="List files in an image",
        description=f"""List files and directories in a container image. Free (no VM).

TL;DR: PURPOSE: look inside an image without starting a {state.sandbox_word}. COST: free.

USAGE:
- list_files(image="busybox:latest", path="/etc"). One directory level, no recursion.
- Large directories come in pages (at most `limit` entries, and never past 64 KiB): when next_cursor is
  set, call again with cursor=<next_cursor>.

RETURNS: {{path, count, total, next_cursor, hint, files: [{{name, path, type (file, directory, symlink, fifo,
socket, char_device, block_device), size, mode (e.g. "0o100644"), target}}]}}

GUIDES:
- [USEFUL] contree://guide/reference""",
        annotations=ro,
    )
    async def list_files(params: ListFilesParams, ctx: RequestContext) -> ListFilesOutput:
        directory = normalize_dir(params.path)
        with backend_errors(f"{params.image}:{directory}"):
            image = await state.images.resolve(params.image, ctx.principal)
            listing = await state.backend.list_directory(image, directory)
        # Only the page is converted: a directory of 100,000 entries costs one slice.
        items = listing.files
        start = 0
        if params.cursor:
            try:
                start = int(params.cursor)
            except ValueError:
                raise ToolError(f"invalid cursor {params.cursor!r}: pass the next_cursor of a page") from None
            if not 0 <= start <= len(items):
                raise ToolError(f"invalid cursor {params.cursor!r}: the directory has {len(items)} entries")
        page = page_of(directory, items, start, params.limit)
        end = start + len(page)
        more = str(end) if end < len(items) else None
        hint = None
        if more is not None:
            hint = (
                f"Entries {start + 1}-{end} of {len(items)}: call list_files(image={params.image!r}, "
                f"path={directory!r}, cursor={more!r}) for the next page."
            )
        return ListFilesOutput(
            path=directory, count=len(page), files=page, next_cursor=more, total=len(items), hint=hint
        )

    @registry.tool(
        name="read_file",
        title="Read a file from an image",
        description=f"""Read a file from a container image. Free (no VM).

TL;DR: PURPOSE: read a file without a {state.sandbox_word}. COST: free.

USAGE:
- read_file(image="<uuid>", path="/etc/os-release"). At most {state.read_max_bytes} bytes are returned per
  call:
  'truncated' says more follows; page with offset, or copy it to the host with download.
- Text is returned as UTF-8; binary files as base64 (encoding="base64").

RETURNS: {{path, content, encoding, bytes_size, truncated, offset}}

GUIDES:
- [USEFUL] contree://guide/reference""",
        annotations=ro,
    )
    async def read_file(params: ReadFileParams, ctx: RequestContext) -> ReadFileOutput:
        path = params.path if params.path.startswith("/") else "/" + params.path
        # The default fits an agent's context (RESULT_BUDGET); more only when asked, up to --read-max-bytes.
        budget = None if params.max_bytes else RESULT_BUDGET - READ_OVERHEAD
        limit = min(params.max_bytes or RESULT_BUDGET, state.read_max_bytes)
        with backend_errors(f"{params.image}:{path}"):
            image = await state.images.resolve(params.image, ctx.principal)
            data, more = await read_bounded(state.backend, image, path, params.offset, limit)
            size = params.offset + len(data)
            if more:
                size = await file_size(state.backend, image, path) or size
        text = decode_text(data, more)
        if text is not None:
            if budget is not None and json_len(text) > budget:
                text = fit_prefix(text, budget)
            data = text.encode()  # a character cut at the end is left for the next call
        elif budget is not None:
            data = data[: budget * 3 // 4]  # base64 grows it by a third
        end = params.offset + len(data)
        more = more or end < size
        hint = None
        if more:
            hint = (
                f"{path} has {size if size > end else 'more than ' + str(end)} bytes; this is bytes "
                f"{params.offset}..{end}. Call read_file again with "
                f"offset={end} (max_bytes up to {state.read_max_bytes}), "
                "or copy it with download()."
            )
        content = text if text is not None else base64.b64encode(data).decode()
        return ReadFileOutput(
            path=params.path,
            content=content,
            encoding="utf-8" if text is not None else "base64",
            bytes_size=size,
            truncated=more,
            offset=params.offset,
            hint=hint,
        )

    @registry.tool(
        name="grep",
        title="Search files in an image",
        description="""Search file contents in a container image using ripgrep. Free (no VM).

TL;DR: PURPOSE: find code or config inside an image. COST: free.

USAGE:
- grep(image="<uuid>", pattern="def main", path="/app", glob="*.py"). Rust regex syntax; binary files
  skipped; symlinks not followed; hidden files searched.
- case="insensitive" or "smart"; before/after add context lines (type="context").

RETURNS: {path, patterns, truncated, matches: [{path, line_number, line_text, type, line_bytes, submatches}]}

GUIDES:
- [USEFUL] contree://guide/reference""",
        annotations=ro,
    )
    async def grep(params: GrepParams, ctx: RequestContext) -> GrepOutput:
        want = params.max_total or GREP_DEFAULT_TOTAL
        if params.offset + want > GREP_MAX_TOTAL:
            raise ToolError(
                f"offset + max_total may reach {GREP_MAX_TOTAL} matches at most: narrow the search with "
                "path or glob instead"
            )
        query = GrepQuery(
            pattern=as_list(params.pattern),
            path=as_list(params.path) or ["/"],
            glob=as_list(params.glob),
            max_count=params.max_count,
            max_total=params.offset + want,
            case=params.case or "sensitive",
            before=params.before,
            after=params.after,
        )
        with backend_errors(f"grep in {params.image}"):
            image = await state.images.resolve(params.image, ctx.principal)
            result = await state.backend.grep(image, query)
        found = result.matches
        out = GrepOutput(
            path=result.path or query.path[0],
            patterns=result.patterns or query.pattern,
            truncated=result.truncated,
        )
        # The default fits an agent's context; an explicit max_total may fill --read-max-bytes.
        budget = (
            max(state.read_max_bytes, RESULT_BUDGET) if params.max_total else RESULT_BUDGET
        ) - GREP_OVERHEAD
        out.matches = [
            GrepMatchOutput(
                path=m.path,
                line_number=m.line_number,
                line_text=m.line_text,
                type=m.type,
                line_bytes=m.line_bytes,
                submatches=[GrepSubmatch(text=s.text, start=s.start, end=s.end) for s in m.submatches],
            )
            for m in found[params.offset : params.offset + want]
        ]
        keep_fitting(out, out.matches, budget)
        end = params.offset + len(out.matches)
        more = len(found) > end
        if more or out.truncated:
            out.truncated = True
            out.next_offset = end if end < GREP_MAX_TOTAL else None
            out.hint = (
                f"Matches {params.offset}..{end} shown"
                + (f"; more from grep(..., offset={end})" if out.next_offset is not None else "")
                + f" (max_total up to {GREP_MAX_TOTAL} with offset; or narrow with path/glob)."
            )
        return out
