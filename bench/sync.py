"""File sync benchmark: a generated tree of 10,000 files / 200 MB (9,999 small files + one 100 MB file),
synced by contree.sync side by side with the reference algorithm (stat check + whole-file sha256 with a
SQLite stat cache, re-implemented here) in one run.

Rows: cold sync, warm sync with no change (target ≤ 150 ms), warm sync after editing one file (≤ 200 ms),
bytes sent after a one-byte edit in the 100 MB file (≤ 1 chunk into the embedded engine's chunk store),
hashing throughput on a warm page cache (target ≥ 1 GB/s).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import xxhash

from contree.engine.storage.blobs import BlobStore
from contree.sync import Excludes, StateCache, sync_tree
from contree.sync.chunker import MAX_CHUNK, FileDigest, chunks_of, digest_file
from contree.sync.transfer import ChunkTransfer, Sent

SMALL_FILES = 9_999
SMALL_BYTES = 100 * 1024 * 1024
BIG_BYTES = 100 * 1024 * 1024
MB = 1024 * 1024
WARM_ROUNDS = 5


class NullTransfer:
    """Counts what would travel, stores nothing: the timings compare scanning and hashing only."""

    needs_sha256 = False

    def __init__(self) -> None:
        self.target = f"null:{id(self)}"

    async def ensure(self, path: str, digest: FileDigest) -> Sent:
        return Sent("0" * 64, "u-" + digest.xxh128, digest.size)

    async def ensure_batch(self, items: list[tuple[str, FileDigest]]) -> list[Sent]:
        return [await self.ensure(p, d) for p, d in items]


class Reference:
    """The reference algorithm: walk, stat tuple compare against SQLite, sha256 of every changed file;
    a changed file is sent whole."""

    def __init__(self, db: Path) -> None:
        self.db = sqlite3.connect(db)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS f (path TEXT PRIMARY KEY, size INT, mtime INT, ino INT, mode INT,"
            " sha TEXT)"
        )

    def sync(self, root: Path) -> int:
        cached = {r[0]: r[1:] for r in self.db.execute("SELECT * FROM f")}
        sent = 0
        rows = []
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)
                old = cached.get(path)
                if old is not None and tuple(old[:4]) == key:
                    continue
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(MB):
                        h.update(block)
                sha = h.hexdigest()
                if old is None or old[4] != sha:
                    sent += st.st_size
                rows.append((path, *key, sha))
        self.db.executemany("INSERT OR REPLACE INTO f VALUES (?,?,?,?,?,?)", rows)
        self.db.commit()
        return sent


def _generate(root: Path) -> Path:
    rng = random.Random(2026)
    words = [f"token{i} ".encode() for i in range(1000)]
    average = SMALL_BYTES // SMALL_FILES
    for i in range(SMALL_FILES):
        d = root / f"pkg{i % 50}" / f"mod{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.randint(average // 2, average * 3 // 2)
        text = b"".join(rng.choices(words, k=size // 8))[:size]
        (d / f"file{i}.py").write_bytes(text)
    big = root / "data" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(rng.randbytes(BIG_BYTES))
    return big


def _edit_small(root: Path, n: int) -> None:
    path = root / "pkg3" / "mod3" / "file3.py"
    path.write_bytes(path.read_bytes() + f"# edit {n}\n".encode())


def _flip(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 1]), offset)
    finally:
        os.close(fd)


def _ratio(reference: float, ours: float) -> str:
    return f"{reference / ours:6.2f}x"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f} ms"


async def _ours(root: Path, cache: StateCache, transfer: object) -> tuple[float, int, int]:
    started = time.perf_counter()
    _, report = await sync_tree(
        str(root), "/app", cache=cache, transfer=transfer, excludes=Excludes()  # type: ignore[arg-type]
    )
    return time.perf_counter() - started, report.bytes_sent, report.files_changed


def _timed(fn: object, *args: object) -> tuple[float, int]:
    started = time.perf_counter()
    sent = fn(*args)  # type: ignore[operator]
    return time.perf_counter() - started, sent


async def _run(work: Path) -> None:
    src = work / "tree"
    t0 = time.perf_counter()
    big = _generate(src)
    print(f"generated {SMALL_FILES + 1} files / {(SMALL_BYTES + BIG_BYTES) // MB} MB in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    ours_cache = StateCache(work / "ours.db")
    null = NullTransfer()
    ref = Reference(work / "ref.db")
    rows: list[tuple[str, str, str, str]] = []

    cold_o, _, _ = await _ours(src, ours_cache, null)
    cold_r, _ = _timed(ref.sync, src)
    rows.append(("cold sync (scan + hash, no transfer)", _ms(cold_o), _ms(cold_r), _ratio(cold_r, cold_o)))

    warm_o = statistics.median([(await _ours(src, ours_cache, null))[0] for _ in range(WARM_ROUNDS)])
    warm_r = statistics.median([_timed(ref.sync, src)[0] for _ in range(WARM_ROUNDS)])
    rows.append(("warm sync, no change (target <= 150 ms)", _ms(warm_o), _ms(warm_r),
                 f"{warm_r / warm_o:6.2f}x"))

    edit_o, edit_r = [], []
    for n in range(WARM_ROUNDS):
        _edit_small(src, n)
        edit_o.append((await _ours(src, ours_cache, null))[0])
        edit_r.append(_timed(ref.sync, src)[0])
    e_o, e_r = statistics.median(edit_o), statistics.median(edit_r)
    rows.append(("warm sync, one file edited (target <= 200 ms)", _ms(e_o), _ms(e_r), f"{e_r / e_o:6.2f}x"))

    # The embedded engine's chunk store: a cold sync stores everything, then a one-byte edit of the 100 MB
    # file must move about one chunk.
    blobs = BlobStore(work / "blobs")
    engine_cache = StateCache(work / "engine.db")
    transfer = ChunkTransfer(blobs, "engine:bench")
    cold_e, sent_cold, _ = await _ours(src, engine_cache, transfer)
    rows.append(("cold sync into the engine blob store", _ms(cold_e), "", f"{sent_cold / MB:.0f} MB sent"))
    _flip(big, BIG_BYTES // 2 + 12345)
    flip_o, sent_o, _ = await _ours(src, engine_cache, transfer)
    flip_r, sent_r = _timed(ref.sync, src)
    rows.append(("one-byte edit in 100 MB file: sync time", _ms(flip_o), _ms(flip_r), _ratio(flip_r, flip_o)))
    rows.append(("one-byte edit in 100 MB file: bytes sent", f"{sent_o:12d}", f"{sent_r:12d}",
                 f"{sent_r / max(sent_o, 1):6.0f}x"))
    rows.append(("  (max chunk size; target <= 1 chunk)", f"{MAX_CHUNK:12d}", "",
                 "ok" if sent_o <= MAX_CHUNK else "OVER"))
    blobs.close()
    ours_cache.close()
    engine_cache.close()

    data = big.read_bytes()  # warm page cache
    def rate(fn: object) -> float:
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        return len(data) / MB / (time.perf_counter() - started)
    rates = {
        "xxh3-128 (chunk hash)": rate(lambda: xxhash.xxh3_128_hexdigest(data)),
        "CDC cut points + xxh3-128 per chunk": rate(lambda: chunks_of(data)),
        "digest_file (read + CDC + xxh3)": rate(lambda: digest_file(big, with_sha256=False)),
        "sha256 (reference)": rate(lambda: hashlib.sha256(data).hexdigest()),
    }
    print()
    print(f"{'case':48} {'contree.sync':>14} {'reference':>14} {'ref/ours':>12}")
    for name, a, b, c in rows:
        print(f"{name:48} {a:>14} {b:>14} {c:>12}")
    print()
    print("hashing throughput, warm page cache (target >= 1 GB/s = 954 MiB/s):")
    for name, value in rates.items():
        print(f"  {name:44} {value:8.0f} MiB/s")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="contree-bench-sync-"))
    try:
        asyncio.run(_run(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
