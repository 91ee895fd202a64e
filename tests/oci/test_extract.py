"""`extract_layer` on its own: decompressors, corrupt input, odd names, stopping midway."""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import threading
from pathlib import Path

import pytest

from contree.errors import Unprocessable
from contree.oci.extract import ExtractionStopped, extract_layer
from tests.oci import harness
from tests.oci.harness import Entry

LAYER = [Entry("d", "dir"), Entry("d/a.txt", data=b"a" * 10_000), Entry("d/b.txt", data=b"b")]


def _blob(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "blob"
    path.write_bytes(data)
    return str(path)


def _dest(tmp_path: Path) -> Path:
    dest = tmp_path / "layer"
    dest.mkdir()
    return dest


@pytest.mark.parametrize("how", ["gzip", "zstd", "none"])
def test_each_compression_gives_the_same_tree_and_diff_id(tmp_path: Path, how: str) -> None:
    tar = harness.layer_tar(LAYER)
    blob, _ = harness.compress(tar, how)
    dest = _dest(tmp_path)
    stats = extract_layer(_blob(tmp_path, blob), str(dest))
    assert stats.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert stats.bytes == len(tar) and stats.file_bytes == 10_001 and stats.entries == 3
    assert (dest / "d/a.txt").read_bytes() == b"a" * 10_000


def test_zstd_without_the_python_module_uses_the_zstd_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness.require("zstd", "zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import now raises ImportError
    tar = harness.layer_tar(LAYER)
    blob, _ = harness.compress(tar, "zstd")
    dest = _dest(tmp_path)
    stats = extract_layer(_blob(tmp_path, blob), str(dest))
    assert stats.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert (dest / "d/b.txt").read_bytes() == b"b"


def test_truncated_gzip_is_unprocessable(tmp_path: Path) -> None:
    blob = gzip.compress(harness.layer_tar(LAYER))
    with pytest.raises(Unprocessable, match="corrupt"):
        extract_layer(_blob(tmp_path, blob[: len(blob) // 2]), str(_dest(tmp_path)))


def test_corrupt_zstd_is_unprocessable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob, _ = harness.compress(harness.layer_tar(LAYER), "zstd")
    broken = blob[:20] + bytes(len(blob) - 20)
    with pytest.raises(Unprocessable, match="corrupt"):
        extract_layer(_blob(tmp_path, broken), str(_dest(tmp_path)))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    second = tmp_path / "layer2"
    second.mkdir()
    with pytest.raises(Unprocessable, match="corrupt"):
        extract_layer(_blob(tmp_path, broken), str(second))


def test_overlong_name_is_unprocessable(tmp_path: Path) -> None:
    tar = harness.layer_tar([Entry("x" * 300, data=b"x")])
    with pytest.raises(Unprocessable, match="cannot unpack layer entry"):
        extract_layer(_blob(tmp_path, tar), str(_dest(tmp_path)))


def test_stop_event_interrupts_extraction(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(ExtractionStopped):
        extract_layer(_blob(tmp_path, harness.layer_tar(LAYER)), str(_dest(tmp_path)), stop=stop)


def test_root_entry_and_leading_slashes(tmp_path: Path) -> None:
    tar = harness.layer_tar(
        [Entry(".", "dir", mode=0o700), Entry("/abs/file", data=b"f"), Entry("./rel", data=b"r")]
    )
    dest = _dest(tmp_path)
    extract_layer(_blob(tmp_path, tar), str(dest))
    assert (dest / "abs/file").read_bytes() == b"f" and (dest / "rel").read_bytes() == b"r"
    assert os.stat(dest).st_mode & 0o777 == 0o755  # the layer root belongs to the store
