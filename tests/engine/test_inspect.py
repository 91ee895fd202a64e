"""Inspect without a sandbox: list, download, archive and grep, on normal and hostile images."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from contree import api
from contree.backend import GrepQuery
from contree.engine.storage import inspect
from contree.engine.storage.overlay import mounts_under
from contree.engine.storage.store import ImageRecord, Store
from contree.errors import BadRequest, NotFound, Unprocessable

from .conftest import require_binary

Grep = Callable[..., Awaitable[api.GrepResult]]
Mutate = Callable[[Store, ImageRecord, Callable[[Path], object]], Path]
HOST_PASSWD_LINE = Path("/etc/passwd").read_text().splitlines()[0]
LONG = "d" * 60 + "/" + "e" * 60 + "/" + "f" * 80 + ".txt"


@pytest.fixture
def image(store: Store, mutate: Mutate) -> ImageRecord:
    """Two layers: a base tree, then a layer that deletes, adds and links (the view inspect must show)."""
    stage = store.staging_dir()
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh-in-image\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        "etc/group": "root:x:0:\nstaff:x:1000:\n",
        "etc/hostname": "image-hostname\n",
        "src/app.py": "import os\nprint('Hello')\n# TODO: fix\nx = 1\n",
        "src/lib.py": "def hello():\n    return 'hello world'\n",
        "src/.hidden.py": "secret = 'hello'\n",
        "src/.gitignore": "*.py\n",
        "src/gone.txt": "hello gone\n",
        "docs/readme.md": "Hello docs\nline two\n",
        LONG: "hello long\n",
    }
    for rel, text in files.items():
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_text(text)
    (stage / "src" / "blob.bin").write_bytes(b"hello\0binary\n")
    os.chown(stage / "src" / "app.py", 1000, 1000)
    os.chown(stage / "docs", 1234, 1234)
    base = store.create_image_from_layer_dir(stage)

    def change(root: Path) -> None:
        (root / "src" / "gone.txt").unlink()
        (root / "src" / "new.py").write_text("HELLO = 'shout'\n" + "y" * 5000 + " hello\n")
        os.link(root / "src" / "new.py", root / "src" / "new-hard.py")
        os.symlink("/etc/hostname", root / "etc" / "evil")
        os.symlink("/", root / "rootlink")
        os.symlink("../../../../etc/passwd", root / "src" / "up")
        os.symlink("loop", root / "loop")
        os.symlink("src", root / "srclink")
        os.mkfifo(root / "fifo")

    child = store.commit_upper(mutate(store, base, change), base, None)
    assert child is not None
    return child


def test_list_directory_items(store: Store, image: ImageRecord) -> None:
    listing = inspect.list_directory(store, image, "/src")
    assert listing.path == "/src"
    names = [f.path for f in listing.files]
    assert names == sorted(names) and "gone.txt" not in names
    assert {"app.py", "lib.py", ".hidden.py", "new.py", "up", "blob.bin"} <= set(names)
    by = {f.path: f for f in listing.files}
    app = by["app.py"]
    assert (app.owner, app.group, app.uid, app.gid) == ("alice", "staff", 1000, 1000)
    assert app.is_regular and not app.is_dir
    assert app.size == len("import os\nprint('Hello')\n# TODO: fix\nx = 1\n")
    assert stat.S_ISREG(app.mode) and app.symlink_to == "" and app.nlink == 1
    assert by["up"].is_symlink and by["up"].symlink_to == "../../../../etc/passwd"
    assert by["new.py"].nlink == 2
    root = {f.path: f for f in inspect.list_directory(store, image, "/").files}
    assert root["fifo"].is_fifo and root["docs"].owner == 1234 and root["docs"].is_dir
    assert inspect.list_directory(store, image, "/srclink").path == "/srclink"


def test_list_errors(store: Store, image: ImageRecord) -> None:
    with pytest.raises(NotFound):
        inspect.list_directory(store, image, "/nope")
    with pytest.raises(Unprocessable):
        inspect.list_directory(store, image, "/etc/passwd")
    with pytest.raises(Unprocessable):
        inspect.list_directory(store, image, "/loop")


def test_list_through_hostile_links_stays_in_the_image(store: Store, image: ImageRecord) -> None:
    names = [f.path for f in inspect.list_directory(store, image, "/rootlink/rootlink/etc").files]
    assert names == ["evil", "group", "hostname", "passwd"]


def test_list_text_form(store: Store, image: ImageRecord) -> None:
    text = inspect.list_directory_text(store, image, "/etc")
    lines = text.splitlines()
    assert lines[0].startswith("total ")
    assert any(line.startswith("lrwxrwxrwx") and line.endswith("evil -> /etc/hostname") for line in lines)
    assert any(line.startswith("-rw-r--r--") and line.endswith(" passwd") for line in lines)
    assert inspect.human_size(4096) == "4.0K" and inspect.human_size(300) == "300"


async def test_download(store: Store, image: ImageRecord) -> None:
    assert inspect.read_bytes(store, image, "/src/lib.py").startswith(b"def hello")
    chunks = [c async for c in inspect.read_file(store, image, "/etc/evil")]
    assert b"".join(chunks) == b"image-hostname\n"  # the absolute link resolved inside the image
    assert inspect.read_bytes(store, image, "/src/up") == inspect.read_bytes(store, image, "/etc/passwd")
    inspect.check_file(store, image, "/rootlink/etc/hostname")
    with pytest.raises(Unprocessable):
        inspect.check_file(store, image, "/src")
    with pytest.raises(Unprocessable):
        inspect.check_file(store, image, "/fifo")
    with pytest.raises(NotFound):
        inspect.check_file(store, image, "/src/gone.txt")
    with pytest.raises(NotFound):
        inspect.read_bytes(store, image, "/rootlink/etc/shadow")


def test_download_streams_large_files_in_chunks(store: Store, mutate: Mutate, image: ImageRecord) -> None:
    big = os.urandom(3 * inspect.CHUNK + 17)
    child = store.commit_upper(mutate(store, image, lambda r: (r / "big").write_bytes(big)), image, None)
    assert child is not None
    chunks = list(inspect.read_chunks(store, child, "/big"))
    assert len(chunks) == 4 and b"".join(chunks) == big


def _tar(store: Store, image: ImageRecord, path: str) -> tarfile.TarFile:
    data = b"".join(inspect.archive_chunks(store, image, path))
    assert len(data) % 10240 == 0
    return tarfile.open(fileobj=io.BytesIO(data))


def test_archive_of_a_directory_round_trips(store: Store, image: ImageRecord, tmp_path: Path) -> None:
    with _tar(store, image, "/") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert "src/gone.txt" not in members
        assert members["etc/evil"].issym() and members["etc/evil"].linkname == "/etc/hostname"
        assert members[LONG].isfile() and tar.extractfile(LONG).read() == b"hello long\n"  # type: ignore[union-attr]
        assert members["src/app.py"].uid == 1000 and members["src/app.py"].mode == 0o644
        assert members["docs"].isdir() and members["fifo"].isfifo()
        hard = [n for n in ("src/new.py", "src/new-hard.py") if members[n].islnk()]
        assert len(hard) == 1
        tar.extractall(tmp_path / "out", filter="fully_trusted")
    out = tmp_path / "out" / "src"
    assert (out / "new-hard.py").read_bytes() == (out / "new.py").read_bytes()


def test_archive_of_a_subdirectory_and_a_file(store: Store, image: ImageRecord) -> None:
    with _tar(store, image, "/srclink") as tar:
        assert "app.py" in tar.getnames() and not any(n.startswith("src/") for n in tar.getnames())
    with _tar(store, image, "/src/lib.py") as tar:
        assert tar.getnames() == ["lib.py"]
        assert tar.extractfile("lib.py").read().startswith(b"def hello")  # type: ignore[union-attr]
    assert inspect.archive_name("/bin/true") == "bin_true.tar" and inspect.archive_name("/") == "root.tar"
    with pytest.raises(Unprocessable):
        inspect.check_archive(store, image, "/fifo")
    with pytest.raises(NotFound):
        inspect.check_archive(store, image, "/missing")


async def test_archive_async_stream(store: Store, image: ImageRecord) -> None:
    data = b"".join([c async for c in inspect.archive(store, image, "/docs")])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["readme.md"]


@pytest.fixture(params=["rg", "python"])
def grep(request: pytest.FixtureRequest, store: Store) -> Grep:
    """Both engines behind one call; each run must leave no mount behind."""
    if request.param == "rg":
        rg = require_binary("rg", "ripgrep")

        async def run(image: ImageRecord, **kw: Any) -> api.GrepResult:
            result = await inspect.grep(store, image, GrepQuery(**kw), rg=rg)
            assert mounts_under(store.home) == []
            return result
    else:
        async def run(image: ImageRecord, **kw: Any) -> api.GrepResult:
            return await inspect.grep(store, image, GrepQuery(**kw), use_rg=False)
    return run


def _hits(result: api.GrepResult) -> list[tuple[str, int, str]]:
    return [(m.path, m.line_number, m.type) for m in result.matches]


async def test_grep_basic_match_shape(grep: Grep, image: ImageRecord) -> None:
    result = await grep(image, pattern=["TODO"], path=["/src"])
    assert result.path == "/src" and result.patterns == ["TODO"] and not result.truncated
    [m] = result.matches
    assert (m.path, m.line_number, m.type) == ("/src/app.py", 3, "match")
    assert m.line_text == "# TODO: fix\n" and m.line_bytes == 12
    assert m.absolute_offset == len("import os\nprint('Hello')\n")
    assert [(s.text, s.start, s.end) for s in m.submatches] == [("TODO", 2, 6)]


async def test_grep_hidden_ignored_binary_deleted_and_symlinks(grep: Grep,
                                                              image: ImageRecord) -> None:
    result = await grep(image, pattern=["hello"])
    paths = {p for p, _, _ in _hits(result)}
    assert "/src/.hidden.py" in paths  # hidden files searched, .gitignore not honoured
    assert "/src/lib.py" in paths and "/" + LONG in paths
    assert "/src/blob.bin" not in paths and "/src/gone.txt" not in paths
    assert "/srclink/lib.py" not in paths and "/src/up" not in paths  # symlinks never followed
    assert not any(p.startswith("/rootlink") for p in paths)


async def test_grep_case_modes(grep: Grep, image: ImageRecord) -> None:
    sens = {p for p, _, _ in _hits(await grep(image, pattern=["Hello"], path=["/src", "/docs"]))}
    assert sens == {"/src/app.py", "/docs/readme.md"}
    insens = _hits(await grep(image, pattern=["hello"], path=["/src/new.py"], case="insensitive"))
    assert [n for _, n, _ in insens] == [1, 2]
    smart_lower = _hits(await grep(image, pattern=["hello"], path=["/src/new.py"], case="smart"))
    smart_upper = _hits(await grep(image, pattern=["HELLO"], path=["/src/new.py"], case="smart"))
    assert [n for _, n, _ in smart_lower] == [1, 2] and [n for _, n, _ in smart_upper] == [1]


async def test_grep_paths_in_order_patterns_ored_and_globs(grep: Grep, image: ImageRecord) -> None:
    result = await grep(image, pattern=["line two", "TODO"], path=["/docs", "/src"])
    assert [p for p, _, _ in _hits(result)] == ["/docs/readme.md", "/src/app.py"]
    only_py = await grep(image, pattern=["hello"], path=["/src"], glob=["*.py", "!lib.py"])
    paths = {p for p, _, _ in _hits(only_py)}
    assert "/src/lib.py" not in paths and "/src/.hidden.py" in paths and "/src/new.py" in paths
    no_docs = await grep(image, pattern=["hello", "Hello"], glob=["!docs"])
    assert not any(p.startswith("/docs") for p, _, _ in _hits(no_docs))


async def test_grep_context_and_caps(grep: Grep, image: ImageRecord) -> None:
    ctx = await grep(image, pattern=["TODO"], path=["/src/app.py"], before=1, after=1)
    assert _hits(ctx) == [("/src/app.py", 2, "context"), ("/src/app.py", 3, "match"),
                          ("/src/app.py", 4, "context")]
    assert ctx.matches[0].submatches == []
    per_file = await grep(image, pattern=["hello"], path=["/src/new.py"], case="insensitive",
                          max_count=1)
    assert [n for _, n, _ in _hits(per_file)] == [1]
    capped = await grep(image, pattern=["hello", "Hello"], max_total=2)
    assert len(capped.matches) == 2 and capped.truncated
    long_line = (await grep(image, pattern=["y+ hello"], path=["/src/new.py"])).matches[0]
    assert long_line.line_bytes == 5007 and len(long_line.line_text.encode()) == 4096


async def test_grep_symlinked_root_keeps_the_spelling(grep: Grep, image: ImageRecord) -> None:
    result = await grep(image, pattern=["TODO"], path=["/srclink"])
    assert [p for p, _, _ in _hits(result)] == ["/srclink/app.py"]


async def test_grep_errors(grep: Grep, image: ImageRecord) -> None:
    with pytest.raises(NotFound):
        await grep(image, pattern=["x"], path=["/missing"])
    with pytest.raises(BadRequest):
        await grep(image, pattern=["(unclosed"])
    with pytest.raises(BadRequest):
        await grep(image, pattern=[])
    with pytest.raises(BadRequest):
        await grep(image, pattern=["x"], case="loud")
    with pytest.raises(BadRequest):
        await grep(image, pattern=["x"], before=51)


async def test_grep_roots_through_hostile_links_stay_in_the_image(grep: Grep, image: ImageRecord) -> None:
    inside = await grep(image, pattern=["image-hostname"], path=["/etc/evil", "/rootlink/rootlink/etc"])
    assert [p for p, _, _ in _hits(inside)] == ["/etc/evil", "/rootlink/rootlink/etc/hostname"]
    host = re.escape(HOST_PASSWD_LINE)  # differs from the image's first line (/bin/sh)
    outside = await grep(image, pattern=[host], path=["/rootlink/etc", "/src/up", "/etc/evil"])
    assert outside.matches == []


def test_archive_carries_file_xattrs_that_gnu_tar_restores(store: Store, tmp_path: Path) -> None:
    """File capabilities (binary) and user.* attributes travel as PAX SCHILY.xattr records."""
    stage = store.staging_dir()
    tool = stage / "bin" / "tool"
    tool.parent.mkdir()
    tool.write_bytes(b"\x7fELF-ish")
    v2_caps = b"".join(x.to_bytes(4, "little") for x in (0x02000001, 1 << 13, 0, 0, 0))
    os.setxattr(tool, "security.capability", v2_caps)
    os.setxattr(tool, "user.note", b"kept")
    image = store.create_image_from_layer_dir(stage)
    data = b"".join(inspect.archive_chunks(store, image, "/bin"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        headers = tar.getmember("tool").pax_headers
    assert headers["SCHILY.xattr.user.note"] == "kept"
    assert headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == v2_caps
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-xf", "-", "-C", str(out)], input=data,
                   check=True, capture_output=True)
    assert os.getxattr(out / "tool", "user.note") == b"kept"
    assert os.getxattr(out / "tool", "security.capability") == v2_caps
