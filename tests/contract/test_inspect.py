"""Backend contract: reading a run's result image without a sandbox (CONTREE-API §12)."""

from __future__ import annotations

import io
import tarfile

import pytest

from contree.backend import Backend, GrepQuery
from contree.errors import BackendError, NotFound

from .conftest import run

pytestmark = pytest.mark.engine


async def _image(backend: Backend, busybox: str) -> str:
    resp = await run(backend, busybox,
                     "mkdir -p /app/sub && printf 'alpha\\nbeta needle\\n' > /app/a.txt && "
                     "echo nested > /app/sub/b.txt && ln -s a.txt /app/link && chmod 640 /app/a.txt && "
                     "rm /bin/vi")
    assert resp.status == "SUCCESS" and resp.result_image_uuid
    return resp.result_image_uuid


async def test_list_download_archive_grep(backend: Backend, busybox: str) -> None:
    image = await _image(backend, busybox)
    listing = await backend.list_directory(image, "/app")
    by_name = {f.path: f for f in listing.files}
    assert set(by_name) == {"a.txt", "sub", "link"}
    a_txt = by_name["a.txt"]
    assert a_txt.is_regular and a_txt.size == 18 and a_txt.mode & 0o777 == 0o640
    assert by_name["sub"].is_dir
    assert by_name["link"].is_symlink and by_name["link"].symlink_to == "a.txt"
    text = await backend.list_directory_text(image, "/app")
    assert text.startswith("total") and "a.txt" in text
    data = b"".join([chunk async for chunk in backend.download(image, "/app/a.txt")])
    assert data == b"alpha\nbeta needle\n"
    await backend.check_file(image, "/app/sub/b.txt")
    bins = {f.path for f in (await backend.list_directory(image, "/bin")).files}
    assert "vi" not in bins and "sh" in bins  # the whiteout hides the lower file
    raw = b"".join([chunk async for chunk in backend.archive(image, "/app")])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        names = {m.name.strip("./").rstrip("/") for m in tf.getmembers()}
    assert {"a.txt", "sub/b.txt", "link"} <= names
    found = await backend.grep(image, GrepQuery(pattern=["needle"], path=["/app"]))
    assert [(m.path, m.line_number) for m in found.matches if m.type == "match"] == [("/app/a.txt", 2)]


async def test_inspect_errors(backend: Backend, busybox: str) -> None:
    with pytest.raises(NotFound):
        await backend.check_file(busybox, "/no/such/file")
    with pytest.raises(BackendError) as not_regular:
        await backend.check_file(busybox, "/bin")
    assert not_regular.value.status == 422
    with pytest.raises(NotFound):
        await backend.list_directory("00000000-0000-4000-8000-000000000000", "/")
