"""Stress test of the two-process path: `torchrun --standalone --nproc-per-node 2 -m cmhash extract`
and then `... train-fusion`, N times (default 30), counting the runs that fail - a non-zero exit,
or a rank's "terminate called ..." abort at exit (SIGABRT), which torchrun reports as a failed job.

    python benchmarks/stress_distributed.py              # 30 runs on a small demo
    python benchmarks/stress_distributed.py --runs 5     # a shorter check

What runs: a temporary project built from the repository's params.yaml with device cpu, the demo
dataset at --n pairs, `clip.num_workers` decoding processes per rank (DataLoader workers: one of
the suspects of an abort at exit) and --epochs fusion epochs. `cmhash prepare` runs once; each run
then deletes extract's outputs and finished shards (so both ranks encode again) and the fusion
outputs and checkpoints, and runs the two commands under torchrun. Each failure is printed with
the tail of its stderr. Exit status 1 when any run failed. Heavy on a small machine: run it with
`nice`, and read the result beside the load average it prints.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ABORT = "terminate called"


def project_params(args: argparse.Namespace) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["device"] = "cpu"
    p["data"]["name"] = "demo"
    tenth = max(args.n // 10, 16)
    p["data"]["demo"].update(n_items=args.n, query=tenth, val=tenth, train=args.n - 2 * tenth)
    p["clip"]["num_workers"] = args.workers
    p["train"].update(batch_size=32, eval_every=10**6)  # validation at the last epoch only
    p["train"]["fusion"]["epochs"] = args.epochs
    return p


def torchrun(project: Path, stage: str) -> tuple[int, str]:
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "cmhash", stage], cwd=project, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return job.returncode, job.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--n", type=int, default=240, help="demo pairs")
    parser.add_argument("--workers", type=int, default=2, help="image-decoding DataLoader workers per rank")
    parser.add_argument("--epochs", type=int, default=2, help="fusion epochs per run")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    failures: list[tuple[int, str, int, str]] = []
    with tempfile.TemporaryDirectory(prefix="cmhash-stress-") as tmp:
        project = Path(tmp)
        (project / "params.yaml").write_text(yaml.safe_dump(project_params(args)))
        subprocess.run([sys.executable, "-m", "cmhash", "prepare"], cwd=project, check=True, capture_output=True)
        started = time.perf_counter()
        for run in range(1, args.runs + 1):
            for stage, outputs in (("extract", ["stages/extract", "stages/extract_shards"]),
                                   ("train-fusion", ["stages/fusion", "checkpoints", "metrics/fusion"])):
                for out in outputs:
                    shutil.rmtree(project / out, ignore_errors=True)
                code, stderr = torchrun(project, stage)
                if code != 0 or ABORT in stderr:
                    failures.append((run, stage, code, stderr))
                    print(f"run {run} {stage}: FAILED (exit {code}{', abort at exit' if ABORT in stderr else ''})\n"
                          + "\n".join(stderr.splitlines()[-8:]), flush=True)
                    break
            else:
                print(f"run {run}: ok ({time.perf_counter() - started:.0f} s so far)", flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(f"{len(failures)} failed of {args.runs} runs (extract + train-fusion, 2 processes, gloo on CPU)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
