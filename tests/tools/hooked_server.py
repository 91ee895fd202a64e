"""`contree-mcp` with deterministic hooks at the seams of a sync, for tests that need a file to change at
an exact moment or a reading thread stuck in a syscall (test-only; chosen by environment variables):

* CONTREE_TEST_SWAP_FOR_FIFO=<path>: right after the scan, the file at <path> is replaced by a FIFO;
* CONTREE_TEST_BLOCK_READ=<fifo>: the sync's reading thread blocks in open() on <fifo> (nobody writes
  to it), after creating <fifo>.blocked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from contree.sync import syncer


def install() -> None:
    swap = os.environ.get("CONTREE_TEST_SWAP_FOR_FIFO")
    if swap:
        real_scan = syncer.scan

        def scan_then_swap(*args: Any, **kwargs: Any) -> Any:
            found = real_scan(*args, **kwargs)
            os.unlink(swap)
            os.mkfifo(swap)
            return found

        syncer.scan = scan_then_swap  # type: ignore[assignment]
    block = os.environ.get("CONTREE_TEST_BLOCK_READ")
    if block:

        def stuck_read(found: Any, need_sha: bool) -> Any:
            Path(block + ".blocked").touch()
            os.open(block, os.O_RDONLY)  # a syscall nothing interrupts: no writer ever comes
            raise AssertionError("the FIFO was opened for writing")

        syncer._read = stuck_read  # type: ignore[assignment]


if __name__ == "__main__":
    install()
    from tools.cli import main

    sys.exit(main())
