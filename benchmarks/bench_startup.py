"""How fast the CLI answers when it has nothing heavy to do: `--help` and a config mistake.

    python benchmarks/bench_startup.py              # 5 runs of each command, best time
    python benchmarks/bench_startup.py --repeats 3

Each command runs in a fresh Python process, twice per repeat:
  cmhash     the installed CLI as it is: heavy libraries (torch, open_clip, faiss) load only when a
             stage runs
  baseline   the same CLI with torch and open_clip imported first, which is what every command paid
             before heavy imports were deferred (each command imported them before parsing)
Times: wall clock, best of --repeats. The machine is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE_PRELUDE = "import torch, open_clip; "
CLI = "from cmhash.cli import app; import sys; sys.argv[0] = 'cmhash'; app()"


def run(args: list[str], prelude: str, cwd: Path) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", prelude + CLI, *args], cwd=cwd, capture_output=True)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "params.yaml").write_text("train:\n  fusoin: {epochs: 3}\n")  # a misspelled key
        cases = {
            "cmhash --help": ["--help"],
            "cmhash train-fusion --help": ["train-fusion", "--help"],
            "config error (train-fusion)": ["train-fusion"],
        }
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
        print(f"{'command':32} {'cmhash s':>9} {'baseline s':>11} {'ratio':>6}")
        for name, argv in cases.items():
            fast = min(run(argv, "", cwd)[0] for _ in range(args.repeats))
            slow = min(run(argv, BASELINE_PRELUDE, cwd)[0] for _ in range(args.repeats))
            print(f"{name:32} {fast:9.2f} {slow:11.2f} {slow / fast:5.1f}x")


if __name__ == "__main__":
    main()
