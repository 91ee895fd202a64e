"""Small fakes for the sync tests: a Backend-like file API that counts calls, and an engine holder."""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from contree import api
from contree.engine.storage.blobs import BlobStore
from contree.errors import NotFound


class FakeFiles:
    """The two Backend file calls RemoteTransfer uses; records what was asked and sent."""

    def __init__(self) -> None:
        self.files: dict[str, api.File] = {}
        self.blobs: dict[str, bytes] = {}
        self.lookups = 0
        self.uploads: list[bytes] = []

    async def get_file(self, sha256: str) -> api.File:
        self.lookups += 1
        if sha256 not in self.files:
            raise NotFound(f"file {sha256} not found")
        return self.files[sha256]

    async def upload_file(self, data: bytes | AsyncIterator[bytes]) -> api.FileResponse:
        if not isinstance(data, bytes):
            data = b"".join([c async for c in data])
        self.uploads.append(data)
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        record = self.files.setdefault(
            sha, api.File(uuid=str(uuid.uuid4()), sha256=sha, size=len(data), created_at="", updated_at="")
        )
        return api.FileResponse(uuid=record.uuid, sha256=sha, size=len(data))


class EngineHolder:
    """Looks like a LocalEngine to `transfer_for` (it has a BlobStore in `.blobs`)."""

    def __init__(self, root: Path) -> None:
        self.blobs = BlobStore(root)


def tree(root: Path, files: dict[str, bytes | str]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def pseudo_random(size: int, seed: int) -> bytes:
    """Incompressible bytes, reproducible and generated fast."""
    return random.Random(seed).randbytes(size)
