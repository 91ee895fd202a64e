"""Backend contract: uploaded files and their injection into runs (CONTREE-API §7, §8 `files`)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from contree import api
from contree.backend import Backend
from contree.errors import NotFound

from .conftest import run, stdout_of

pytestmark = pytest.mark.engine


async def test_files_are_injected_with_mode_and_owner(backend: Backend, busybox: str) -> None:
    data = b"#!/bin/sh\necho injected\n"
    uploaded = await backend.upload_file(data)
    assert uploaded.sha256 == hashlib.sha256(data).hexdigest()
    files = {
        "/opt/tool/run.sh": api.InjectedFile(uuid=uploaded.uuid, mode="0755", uid=1000, gid=1000),
        "/etc/conf": api.InjectedFile(uuid=uploaded.uuid, mode="0o100600"),
    }
    resp = await run(backend, busybox, "/opt/tool/run.sh; stat -c '%a %u %g' /opt/tool/run.sh /etc/conf",
                     files=files)
    assert stdout_of(resp) == "injected\n755 1000 1000\n600 0 0\n"
    assert resp.result_image_uuid and resp.result_image_uuid != busybox


async def test_injection_does_not_follow_symlinks_out(backend: Backend, busybox: str, tmp_path: Path) -> None:
    prep = await run(backend, busybox, "ln -s /proc/self/root/tmp/escape /trap")
    assert prep.result_image_uuid
    uploaded = await backend.upload_file(b"payload")
    resp = await run(backend, prep.result_image_uuid, "cat /trap/x 2>/dev/null; ls -l /trap",
                     files={"/trap/x": api.InjectedFile(uuid=uploaded.uuid)}, disposable=True)
    # Either the injection is refused (FAILED) or it lands inside the image, never on the host.
    assert not await asyncio.to_thread(os.path.exists, "/tmp/escape/x")
    assert resp.status in ("SUCCESS", "FAILED")



async def test_unknown_file_is_404(backend: Backend, busybox: str) -> None:
    files = {"/x": api.InjectedFile(uuid="00000000-0000-4000-8000-000000000000")}
    with pytest.raises(NotFound):
        await backend.spawn(api.InstanceSpawnRequest(command="true", image=busybox, files=files))
