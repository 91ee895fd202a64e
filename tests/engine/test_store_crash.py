"""Crash safety: SIGKILL a process that commits, tags, squashes and collects garbage at random moments;
after `recover()` the store is consistent (`check()` is clean) and every image is readable."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from contree.engine.storage.overlay import mounts_under
from contree.engine.storage.store import Store

_WORKER = textwrap.dedent("""
    import os, sys, uuid
    from pathlib import Path
    from contree.engine.storage.store import Store
    store = Store(Path(sys.argv[1]))
    image = store.list()[0]
    i = 0
    while True:
        i += 1
        upper = store.sandboxes_dir / uuid.uuid4().hex / "upper"
        upper.mkdir(parents=True)
        for j in range(20):
            (upper / f"f{i}-{j}").write_bytes(os.urandom(2000))
        os.mknod(upper / "base", 0o600 | 0o020000, os.makedev(0, 0))  # delete /base: a whiteout
        child = store.commit_upper(upper, image, None)
        store.set_tag(child.uuid, "latest")
        image = child
        if i % 4 == 0:
            image = store.squash_if_deep(image, max_depth=3) or image
        if i % 5 == 0:
            store.gc(min_age=0)
        print(i, flush=True)
""")


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_a_recoverable_store(store: Store) -> None:
    stage = store.staging_dir()
    (stage / "base").write_text("base")
    store.create_image_from_layer_dir(stage, tag="base")
    store.close()
    rng = random.Random(7)
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(store.home)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            proc.stdout.readline()  # at least one commit done, so the kill lands mid-work
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, err
        reopened = Store(store.home)
        try:
            reopened.recover()
            assert reopened.check() == []
            assert mounts_under(reopened.home) == []
            for image in reopened.list():
                r = reopened.resolver(image)
                names = [n for n, _ in r.listdir(r.lookup("/"))]
                assert image.tag == "base" or "base" not in names
                for name in names[:3]:
                    r.read_bytes("/" + name)
        finally:
            reopened.close()
    final = Store(store.home)
    try:
        assert final.resolve_tag("latest") and final.resolve_tag("base")
        assert len(final.list()) > 8
    finally:
        final.close()
