"""The userspace resolver agrees with a real overlay mount and never leaves the image."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from contree.engine.storage.overlay import mount_overlay, unmount
from contree.engine.storage.resolver import MAX_SYMLINKS, Resolver, normalize
from contree.engine.storage.store import ImageRecord, Store, remove_tree

Mutate = Callable[[Store, ImageRecord, Callable[[Path], object]], Path]
Entry = tuple[str, int, int, int, str]


def _describe(mode: int, uid: int, gid: int, content: str) -> Entry:
    kind = "d" if stat.S_ISDIR(mode) else "l" if stat.S_ISLNK(mode) else "f" if stat.S_ISREG(mode) else "o"
    return (kind, stat.S_IMODE(mode) if kind != "l" else 0, uid, gid, content)


def kernel_view(store: Store, image: ImageRecord) -> dict[str, Entry]:
    merged = store.tmp_dir / f"view-{uuid.uuid4().hex}"
    merged.mkdir()
    mount_overlay(store.layer_paths(image), None, None, merged)
    out: dict[str, Entry] = {}
    try:
        stack = [merged]
        while stack:
            d = stack.pop()
            for e in os.scandir(d):
                st = e.stat(follow_symlinks=False)
                rel = "/" + os.path.relpath(e.path, merged)
                content = ""
                if stat.S_ISLNK(st.st_mode):
                    content = os.readlink(e.path)
                elif stat.S_ISREG(st.st_mode):
                    content = hashlib.sha256(Path(e.path).read_bytes()).hexdigest()
                elif stat.S_ISDIR(st.st_mode):
                    stack.append(Path(e.path))
                out[rel] = _describe(st.st_mode, st.st_uid, st.st_gid, content)
    finally:
        unmount(merged)
        merged.rmdir()
    return out


def resolver_view(store: Store, image: ImageRecord) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    with Resolver(store.layer_paths(image)) as r:
        for node in r.walk(r.lookup("/")):
            if node.path == "/":
                continue
            content = ""
            if node.is_symlink:
                content = r.readlink(node)
            elif node.is_regular:
                fd = r.open_file(node)
                with os.fdopen(fd, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            out[node.path] = _describe(node.st.st_mode, node.st.st_uid, node.st.st_gid, content)
    return out


def _entries(root: Path) -> tuple[list[Path], list[Path]]:
    files, dirs = [], []
    stack = [root]
    while stack:
        d = stack.pop()
        for e in os.scandir(d):
            p = Path(e.path)
            if e.is_dir(follow_symlinks=False):
                dirs.append(p)
                stack.append(p)
            else:
                files.append(p)
    return files, dirs


def random_ops(rng: random.Random, root: Path, count: int) -> None:
    """Create, append, chmod, rm, rm -rf, recreate dir, mv, symlink — all through the merged mount."""
    for _ in range(count):
        files, dirs = _entries(root)
        where = rng.choice([root, *dirs])
        name = f"n{rng.randrange(40)}"
        op = rng.choice(["create", "create", "append", "chmod", "rm", "rmrf", "recreate", "mv", "symlink",
                         "mkdir", "chown"])
        try:
            if op == "create" and not os.path.lexists(where / name):
                (where / name).write_bytes(rng.randbytes(rng.randrange(0, 300)))
            elif op == "append" and files:
                f = rng.choice(files)
                if f.is_file() and not f.is_symlink():
                    with open(f, "ab") as fh:
                        fh.write(rng.randbytes(20))
            elif op == "chmod" and (files or dirs):
                p = rng.choice(files + dirs)
                if not p.is_symlink():
                    p.chmod(rng.choice([0o600, 0o644, 0o755, 0o700, 0o4755, 0o1777]))
            elif op == "chown" and (files or dirs):
                p = rng.choice(files + dirs)
                os.chown(p, rng.randrange(3) * 1000, rng.randrange(3) * 1000, follow_symlinks=False)
            elif op == "rm" and files:
                rng.choice(files).unlink()
            elif op == "rmrf" and dirs:
                shutil.rmtree(rng.choice(dirs))
            elif op == "recreate" and dirs:
                d = rng.choice(dirs)
                shutil.rmtree(d)
                d.mkdir()
                if rng.random() < 0.5:
                    (d / "fresh").write_text("fresh")
            elif op == "mv" and (files or dirs):
                src = rng.choice(files + dirs)
                dst_dir = rng.choice([root, *[d for d in dirs if not d.is_relative_to(src)]])
                dst = dst_dir / f"m{rng.randrange(40)}"
                if not os.path.lexists(dst):
                    shutil.move(src, dst)
            elif op == "symlink" and not os.path.lexists(where / name):
                target = rng.choice(["../n1", "n2", "/n3", "/", "..", "nowhere", "/etc/hostname"])
                os.symlink(target, where / name)
            elif op == "mkdir" and not os.path.lexists(where / name):
                (where / name).mkdir()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass  # an entry chosen earlier vanished with its parent


def _empty_image(store: Store) -> ImageRecord:
    return store.create_image_from_layer_dir(store.staging_dir())


@pytest.mark.parametrize("seed", range(24))
def test_resolver_matches_overlay_on_random_stacks(store: Store, mutate: Mutate, seed: int) -> None:
    rng = random.Random(seed)
    image = _empty_image(store)
    for _ in range(rng.randrange(6, 11)):
        upper = mutate(store, image, lambda root: random_ops(rng, root, 30))
        child = store.commit_upper(upper, image, None)
        if child is None:
            continue
        image = child
        assert resolver_view(store, image) == kernel_view(store, image)


def _layer(store: Store, files: dict[str, str], links: dict[str, str] | None = None,
           parent: ImageRecord | None = None) -> ImageRecord:
    stage = store.staging_dir()
    for rel, text in files.items():
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_text(text)
    for rel, target in (links or {}).items():
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, stage / rel)
    return store.create_image_from_layer_dir(stage, parent=parent)


@pytest.fixture
def hostile(store: Store) -> Iterator[Resolver]:
    image = _layer(store, {"etc/hostname": "image-hostname", "etc/passwd": "image-passwd", "data/x": "x"}, {
        "etc/evil": "/etc/hostname",
        "rootlink": "/",
        "up": "../../../../..",
        "hostdir": "/proc/self",
        "loop1": "loop2",
        "loop2": "loop1",
        "self": "self",
        "data/parent": "../etc",
        "chain0": "chain1",
    })
    r = Resolver(store.layer_paths(image))
    yield r
    r.close()


def test_absolute_symlinks_stay_in_the_image(hostile: Resolver) -> None:
    assert hostile.read_bytes("/etc/evil") == b"image-hostname"
    assert hostile.read_bytes("/rootlink/etc/passwd") == b"image-passwd"
    assert hostile.read_bytes("/rootlink/rootlink/rootlink/etc/evil") == b"image-hostname"


def test_dotdot_is_clamped_at_the_root(hostile: Resolver) -> None:
    assert hostile.read_bytes("/../../../../etc/passwd") == b"image-passwd"
    assert hostile.read_bytes("/up/etc/passwd") == b"image-passwd"
    assert hostile.read_bytes("/data/parent/hostname") == b"image-hostname"
    assert normalize("a/../../b/./c") == "/b/c"


def test_host_only_paths_are_missing(hostile: Resolver) -> None:
    for path in ("/hostdir/status", "/rootlink/proc/self/status", "/etc/shadow", "/up/etc/shadow"):
        with pytest.raises(FileNotFoundError):
            hostile.read_bytes(path)


def test_symlink_loops_are_refused(hostile: Resolver) -> None:
    for path in ("/loop1", "/self", "/loop2/x"):
        with pytest.raises(OSError) as info:
            hostile.lookup(path)
        assert info.value.errno == errno.ELOOP
    assert hostile.lookup("/loop1", follow=False).is_symlink


def test_symlink_limit_is_forty(store: Store) -> None:
    links = {f"l{i}": f"l{i + 1}" for i in range(MAX_SYMLINKS)}
    image = _layer(store, {f"l{MAX_SYMLINKS}": "end"}, links)
    with Resolver(store.layer_paths(image)) as r:
        assert r.read_bytes("/l0") == b"end"
    links = {f"l{i}": f"l{i + 1}" for i in range(MAX_SYMLINKS + 1)}
    image = _layer(store, {f"l{MAX_SYMLINKS + 1}": "end"}, links)
    with Resolver(store.layer_paths(image)) as r, pytest.raises(OSError) as info:
        r.read_bytes("/l0")
    assert info.value.errno == errno.ELOOP


def test_files_through_a_non_directory_are_not_found(hostile: Resolver) -> None:
    with pytest.raises(NotADirectoryError):
        hostile.lookup("/etc/passwd/x")


def test_open_file_refuses_non_regular(hostile: Resolver, store: Store) -> None:
    with pytest.raises(IsADirectoryError):
        hostile.open_file(hostile.lookup("/etc"))
    with pytest.raises(OSError):
        hostile.open_file(hostile.lookup("/etc/evil", follow=False))


def test_whiteout_and_opaque_dir_in_the_middle_of_the_stack(store: Store) -> None:
    bottom = _layer(store, {"a/old": "1", "a/keep": "k", "gone": "g", "b/x": "x"})
    middle_stage = store.staging_dir()
    os.mknod(middle_stage / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (middle_stage / "b").mkdir()
    (middle_stage / "b" / "y").write_text("y")
    os.setxattr(middle_stage / "b", "trusted.overlay.opaque", b"y")
    middle = store.create_image_from_layer_dir(middle_stage, parent=bottom)
    top = _layer(store, {"a/new": "n"}, parent=middle)
    with Resolver(store.layer_paths(top)) as r:
        assert [n for n, _ in r.listdir(r.lookup("/"))] == ["a", "b"]
        assert [n for n, _ in r.listdir(r.lookup("/a"))] == ["keep", "new", "old"]
        assert [n for n, _ in r.listdir(r.lookup("/b"))] == ["y"]
        with pytest.raises(FileNotFoundError):
            r.lookup("/gone")
        with pytest.raises(FileNotFoundError):
            r.lookup("/b/x")


def test_walk_handles_trees_deeper_than_the_recursion_limit(store: Store) -> None:
    stage = store.staging_dir()
    layer = stage
    try:
        fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(1200):  # built with dir fds: the host path would exceed PATH_MAX
                os.mkdir("d", dir_fd=fd)
                nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nxt
            with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
                f.write("deep")
        finally:
            os.close(fd)
        image = store.create_image_from_layer_dir(stage)
        layer = store.layer_path(image.layers[0])
        with Resolver(store.layer_paths(image)) as r:
            nodes = list(r.walk(r.lookup("/")))
            assert len(nodes) == 1202 and nodes[-1].path.endswith("/d/leaf")
            assert [n.path.count("/") for n in nodes[:3]] == [1, 1, 2]
    finally:
        remove_tree(layer)  # pytest's own tmp cleanup recurses and would fail on this tree
    assert not layer.exists()
