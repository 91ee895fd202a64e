"""sync_tree against the real backends of the contract suite: the embedded engine (chunk transfer), the
engine service (the same chunk store through its socket: only missing chunks travel) and RemoteBackend →
REST server → engine (sha256 existence check, streamed uploads); the synced state is then injected into
a run and read back inside the sandbox."""

from __future__ import annotations

import os
from pathlib import Path

from contree.backend import Backend
from contree.sync import StateCache, sync_tree, transfer_for
from contree.sync.transfer import ChunkTransfer, RemoteChunkTransfer, RemoteTransfer
from tests.contract.conftest import backend, busybox, busybox_tree, run, stdout_of
from tests.sync.helpers import pseudo_random, tree

__all__ = ["backend", "busybox", "busybox_tree"]  # fixtures used below


async def test_sync_then_run_on_each_backend(backend: Backend, busybox: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    big = bytearray(pseudo_random(1 << 20, 9))
    tree(src, {"big.bin": bytes(big), "hello.sh": "echo hello from sync\n", "same/a": "dup", "same/b": "dup"})
    os.chmod(src / "hello.sh", 0o755)
    cache = StateCache(tmp_path / "sync.db")
    transfer = transfer_for(backend)
    if hasattr(backend, "store"):
        expected: type = ChunkTransfer
    elif hasattr(backend, "chunk_store"):
        expected = RemoteChunkTransfer
    else:
        expected = RemoteTransfer
    assert isinstance(transfer, expected)
    manifest, cold = await sync_tree(str(src), "/s", cache=cache, transfer=transfer)
    assert cold.files_uploaded == 3 and cold.bytes_sent == len(big) + len("echo hello from sync\n") + 3
    resp = await run(
        backend, busybox, "cd /s && ./hello.sh && cat same/a same/b && sha256sum big.bin",
        files=manifest.injected_files(),
    )
    out = stdout_of(resp)
    big_sha = next(e.sha256 for e in manifest.entries if e.path == "/s/big.bin")
    assert out.startswith("hello from sync\ndupdup") and big_sha + "  big.bin" in out

    again, warm = await sync_tree(str(src), "/s", cache=cache, transfer=transfer)
    assert again.id == manifest.id and (warm.files_changed, warm.bytes_sent) == (0, 0)
    big[500_000] ^= 1
    (src / "big.bin").write_bytes(bytes(big))
    edited, after = await sync_tree(str(src), "/s", cache=cache, transfer=transfer)
    assert edited.id != manifest.id and after.files_uploaded == 1
    if isinstance(transfer, ChunkTransfer | RemoteChunkTransfer):
        assert after.bytes_sent < len(big) // 2  # about one chunk
    else:
        assert after.bytes_sent == len(big)  # the REST API stores whole files
    resp = await run(backend, busybox, "sha256sum /s/big.bin", files=edited.injected_files())
    new_sha = next(e.sha256 for e in edited.entries if e.path == "/s/big.bin")
    assert stdout_of(resp).startswith(new_sha)
