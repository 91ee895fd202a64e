"""Reclaiming disk: `contree-mcp images prune` beside a running engine deletes exactly the images nothing
needs, frees what they held, keeps every run and import working, and leaves a store `engine check`
accepts even when it is SIGKILLed at any point."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contree import api
from contree.backend import ImageQuery
from contree.engine.local import LocalEngine
from contree.engine.storage.store import ImageConfig, Store
from tests.contract.conftest import local_engine, run, stdout_of, wait_done
from tests.tools.conftest import server_command

pytestmark = pytest.mark.engine


def prune_cli(home: Path, *args: str) -> dict[str, object]:
    out = subprocess.run(
        [*server_command(), "images", "prune", "--home", str(home), "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def used_bytes(path: Path) -> int:
    """Disk blocks in use below `path` (what `du` counts)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


async def child(engine: LocalEngine, image: str, command: str, tag: str | None = None) -> str:
    done = await run(engine, image, command, disposable=False)
    assert done.status == "SUCCESS" and done.result_image_uuid, done
    if tag:
        await engine.set_tag(done.result_image_uuid, tag)
    return done.result_image_uuid


async def test_prune_beside_running_work_deletes_exactly_the_unreferenced(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    home = tmp_path / "home"
    engine = await local_engine(home, busybox_rootfs)
    try:
        base = await engine.resolve_tag("busybox:latest")
        payload = "head -c 3000000 /dev/urandom > /payload"
        tagged = await child(engine, base, payload, tag="tests/keep:1")
        ancestor = await child(engine, base, payload)
        await child(engine, ancestor, "echo on top > /top", tag="tests/keep:2")  # keeps `ancestor`
        in_use = await child(engine, base, payload)
        doomed_a = await child(engine, base, payload)
        doomed_b = await child(engine, doomed_a, payload)  # a chain of unreferenced images goes whole
        doomed_c = await child(engine, tagged, payload)
        busy = await engine.spawn(
            api.InstanceSpawnRequest(command="sleep 20", image=in_use, shell=True, disposable=False)
        )
        # runs go on while the prune works: every one must succeed
        stop = asyncio.Event()

        async def keep_running() -> list[str]:
            outs = []
            while not stop.is_set():
                done = await run(engine, tagged, "cat /payload | wc -c", disposable=True)
                outs.append(stdout_of(done).strip())
            return outs

        runner = asyncio.create_task(keep_running())
        for _ in range(200):
            if (await engine.get_operation(busy.uuid)).status == "EXECUTING":
                break
            await asyncio.sleep(0.05)
        before = used_bytes(home / "layers")
        report = await asyncio.to_thread(prune_cli, home, "--untagged")
        after = used_bytes(home / "layers")
        stop.set()
        outs = await runner
        assert outs and set(outs) == {"3000000"}
        assert sorted(report["images"]) == sorted([doomed_a, doomed_b, doomed_c])  # type: ignore[arg-type]
        remaining = {i.uuid for i in await engine.list_images(ImageQuery(limit=1000))}
        assert {tagged, ancestor, in_use, base} <= remaining
        assert not {doomed_a, doomed_b, doomed_c} & remaining
        assert report["layer_bytes"] >= 3 * 3_000_000
        freed = before - after
        assert abs(freed - report["layer_bytes"]) < 0.05 * report["layer_bytes"], (freed, report)
        await engine.cancel_operation(busy.uuid)
        await wait_done(engine, busy.uuid)
        assert (await run(engine, in_use, "wc -c < /payload")).status == "SUCCESS"
        await engine.drain()
        assert engine.store is not None and engine.store.check() == []
    finally:
        await engine.close()
    check = await asyncio.to_thread(
        subprocess.run,
        [*server_command(), "engine", "check", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def build_store(home: Path, images: int, files: int) -> list[str]:
    """A store with one tagged base and `images` untagged children, each with `files` small files."""
    store = Store(home)
    try:
        stage = store.staging_dir("base")
        (stage / "etc").mkdir()
        (stage / "etc" / "hostname").write_text("base\n")
        base = store.create_image_from_layer_dirs([stage], config=ImageConfig(), tag="base:1")
        made = []
        for _ in range(images):
            stage = store.staging_dir("child")
            for j in range(files):
                (stage / f"f{j}").write_bytes(os.urandom(64))
            made.append(store.create_image_from_layer_dirs([stage], parent=base).uuid)
        return made
    finally:
        store.close()


def trash_rows(home: Path) -> int:
    import sqlite3

    db = sqlite3.connect(home / "images.db", timeout=5)
    try:
        return int(db.execute("SELECT count(*) FROM layer_trash").fetchone()[0])
    except sqlite3.OperationalError:  # the table is made when the store is first opened
        return 0
    finally:
        db.close()


def test_a_prune_killed_at_any_point_leaves_a_consistent_store(tmp_path: Path) -> None:
    """SIGKILL at a random moment (start-up, deciding, deleting, after) and, every other round, while
    layers are in the trash (rows committed, directories half removed)."""
    home = tmp_path / "home"
    rng = random.Random(1234)
    kills = mid_delete = 0
    for round_ in range(8):
        build_store(home, images=6, files=2000)
        proc = subprocess.Popen(
            [*server_command(), "images", "prune", "--home", str(home), "--untagged"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if round_ % 2:
            deadline = time.monotonic() + 30
            while proc.poll() is None and trash_rows(home) == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.05))
        else:
            time.sleep(rng.uniform(0.05, 1.0))
        if proc.poll() is None:
            mid_delete += trash_rows(home) > 0
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(60)
        store = Store(home)
        try:
            problems = store.check()
        finally:
            store.close()
        assert problems == [], f"round {round_}: {problems}"
    assert kills >= 4 and mid_delete >= 2, (kills, mid_delete)
    prune_cli(home, "--untagged")
    store = Store(home)
    try:
        assert store.check() == []
        assert [i for i in store.all_images() if i.tag is None] == []
        assert store.layer_sizes().keys() == {lid for i in store.all_images() for lid in i.layers}
        assert sorted(os.listdir(home / "layers")) == sorted(store.layer_sizes())
        assert trash_rows(home) == 0
    finally:
        store.close()


def test_a_layer_pinned_by_another_process_is_never_deleted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    pinned, free = build_store(home, images=2, files=3)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\nfrom pathlib import Path\nfrom contree.engine.storage.store import Store\n"
                "store = Store(Path(sys.argv[1]))\nimage = store.get(sys.argv[2])\n"
                "with store.pinned(image.layers):\n    print('pinned', flush=True)\n    time.sleep(60)\n"
            ),
            str(home),
            pinned,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "pinned"
        report = prune_cli(home, "--untagged")
        assert report["images"] == [free]  # a sandbox is starting from `pinned`: it stays
    finally:
        holder.kill()
        holder.wait(10)
    assert prune_cli(home, "--untagged")["images"] == [pinned]
    store = Store(home)
    try:
        assert store.check() == []
    finally:
        store.close()


def test_dry_run_and_age_limit_delete_nothing_they_should_not(tmp_path: Path) -> None:
    home = tmp_path / "home"
    made = build_store(home, images=2, files=2)
    dry = prune_cli(home, "--untagged", "--dry-run")
    assert sorted(dry["images"]) == sorted(made) and dry["layer_bytes"] > 0  # type: ignore[operator]
    assert prune_cli(home, "--untagged", "--older-than", "1h")["images"] == []  # too young
    store = Store(home)
    try:
        assert {i.uuid for i in store.all_images()} >= set(made)
    finally:
        store.close()
    bad = subprocess.run(
        [*server_command(), "images", "prune", "--home", str(home), "--older-than", "soon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "invalid age 'soon'" in bad.stderr
