"""A/B: this checkout's embedded engine against another checkout's, side by side in one run.

    python -m bench.ab_engine OTHER_CHECKOUT [--runs 30]

One worker process per checkout (`bench/ab_worker.py` with that checkout first on PYTHONPATH, each with a
LocalEngine on a home of its own) gets the same scenarios in turn: the two never run at the same time,
and which goes first alternates, so a shared machine's noise lands on both. Prints each scenario's median
spawn-to-completion time per side and the ratio this/other (a refactoring should stay near 1.00).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
SCENARIOS = ("echo_disposable", "echo_networking", "commit_one_file", "exit_code_and_stderr")
WARMUPS = 3


class Side:
    def __init__(self, name: str, checkout: Path, home: Path) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "bench" / "ab_worker.py"), str(home)], cwd=checkout, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, scenario: str) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(scenario + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker died ({self.proc.wait()})")
        return float(json.loads(line)["seconds"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(60)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab_engine", description=__doc__)
    parser.add_argument("other", type=Path, help="the other checkout (e.g. a worktree of main)")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ab-engine-") as tmp:
        this = Side("this", HERE, Path(tmp) / "this")
        other = Side("other", args.other.resolve(), Path(tmp) / "other")
        try:
            samples: dict[tuple[str, str], list[float]] = {}
            for scenario in SCENARIOS:
                for i in range(WARMUPS + args.runs):
                    pair = (this, other) if i % 2 else (other, this)
                    for side in pair:
                        took = side.run(scenario)
                        if i >= WARMUPS:
                            samples.setdefault((scenario, side.name), []).append(took)
        finally:
            this.close()
            other.close()
    print(f"{'scenario':<24} {'this ms':>9} {'other ms':>9} {'this/other':>11}   ({args.runs} runs each, "
          f"medians; other = {args.other})")
    for scenario in SCENARIOS:
        mine = statistics.median(samples[(scenario, "this")]) * 1000
        theirs = statistics.median(samples[(scenario, "other")]) * 1000
        print(f"{scenario:<24} {mine:>9.2f} {theirs:>9.2f} {mine / theirs:>10.2f}x")


if __name__ == "__main__":
    main()
