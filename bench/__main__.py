"""`make bench`: runs every area benchmark in one process run and prints their tables.

Each area module (bench/protocol.py, bench/engine.py, bench/sync.py, bench/oci.py) exposes `main() -> None`
and prints its own figures; ratios are measured side by side within that run because the machines are
shared and noisy. One failing area does not hide the others, but makes the exit status non-zero.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

AREAS = ("protocol", "engine", "sync", "oci", "rest", "userns", "surface", "output", "service", "rootless",
         "sandboxes")


def main(argv: list[str]) -> int:
    wanted = argv or list(AREAS)
    failed: list[str] = []
    for area in wanted:
        try:
            module = importlib.import_module(f"bench.{area}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{area}":
                raise
            print(f"== {area}: no benchmark yet", flush=True)
            continue
        print(f"== {area}", flush=True)
        started = time.perf_counter()
        try:
            module.main()
        except Exception:
            traceback.print_exc()
            failed.append(area)
        print(f"== {area} done in {time.perf_counter() - started:.1f} s\n", flush=True)
    if failed:
        print("benchmarks failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
