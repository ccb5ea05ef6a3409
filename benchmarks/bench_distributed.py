"""Several processes against one, in the same run: `cmhash extract` pairs/s and `cmhash train-fusion` steps/s.

    python benchmarks/bench_distributed.py            # 1,000 demo pairs, 1 and 2 processes
    python benchmarks/bench_distributed.py --quick    # 300 pairs, smoke run

What runs: the `cmhash` commands themselves, in a temporary project built from the repository's
params.yaml with: device cpu, the demo dataset at --n pairs (--train of them for training, 10%
query, 10% val), and `distributed.nproc_per_node: N`, so for N > 1 each stage starts itself under
torch's elastic launcher (what torchrun runs). `cmhash prepare` runs once; then for N = 1 and 2:

extract       `cmhash extract` (the demo CLIP, `cmhash-demo` random init; fp32 on CPU, fp16 on a
              GPU; --workers decoding processes per rank); pairs/s is the rate the stage logs:
              pairs encoded over the slowest rank's encoding time, so start-up and model loading
              are left out. The 1- and 2-process CPU features are compared (equal up to float
              rounding here; bit for bit when the thread counts match, which the tests check).
train-fusion  on the 1-process features (`reference` arch, params.yaml's loss and model, batch
              --batch-size, the global batch, split over the ranks), once for --short and once
              for --long epochs, validation only at the last epoch. Each run's training time is
              the time between its first log line (`fusion: N train / M val pairs ...`, once data
              and model are ready) and its last (`fusion: best val MAP ...`), as the lines reach
              this script; steps/s = (long - short) epochs x steps per epoch / the difference of
              the two training times, so start-up, loading, the final validation and writing
              the outputs cancel out. pairs/s = steps/s x batch.

Each measurement runs --repeats times (default 3), the setups taking turns (their order reversed
each round) so a busy spell on a shared machine hits all of them; the median is reported, with
the range. The load average is printed before and after.

Threads: each of N processes gets cores / N torch threads (what `cmhash` gives its workers unless
OMP_NUM_THREADS is set), so 1 and 2 processes use the same cores; --threads T gives every process
T (OMP_NUM_THREADS). With a GPU, 1 process on it (and
2 with two GPUs) is measured too. On a 2-core CPU expect no speed-up from 2 processes - the
point there is that the distributed path runs and agrees; the gain needs a core or GPU per rank.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from cmhash.io import load_pickle

REPO = Path(__file__).resolve().parents[1]
RATE = re.compile(r"encoded (\d+) pairs at (\d+) pairs/s")
TRAINING = ("fusion: ", " train / ")  # the log line before the first epoch: data and model ready
TRAINED = "fusion: best val MAP"  # the line after the last epoch, its validation and the outputs


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def base_params(args: argparse.Namespace) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["device"] = "cpu"
    p["data"]["name"] = "demo"
    tenth = max(args.n // 10, 8)
    p["data"]["demo"].update(n_items=args.n, query=tenth, val=tenth, train=args.train)
    p["clip"]["num_workers"] = args.workers
    p["train"].update(batch_size=args.batch_size, eval_every=10**6)  # validation at the last epoch only
    return p


def cmhash(project: Path, params: dict, tag: str, *args: str) -> list[tuple[float, str]]:
    """Run `cmhash <args> --params <params as tag.yaml>` in `project`: its stderr lines (the ranks'
    logs), each with the time it arrived."""
    path = project / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(params))
    env = {**os.environ, "COLUMNS": "300"}  # log lines unwrapped
    job = subprocess.Popen([sys.executable, "-m", "cmhash", *args, "--params", str(path)], cwd=project, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = [(time.perf_counter(), line) for line in job.stderr]
    if job.wait() != 0:
        raise SystemExit(f"`cmhash {' '.join(args)}` ({tag}) failed:\n{''.join(line for _, line in lines)}")
    return lines


def arrival(lines: list[tuple[float, str]], *parts: str) -> float:
    """When the first line holding every one of `parts` arrived."""
    found = next((at for at, line in lines if all(part in line for part in parts)), None)
    if found is None:
        raise SystemExit(f"no log line with {parts}:\n{''.join(line for _, line in lines)}")
    return found


def with_processes(params: dict, device: str, n: int) -> dict:
    p = copy.deepcopy(params)
    p["device"] = device
    p["distributed"]["nproc_per_node"] = n
    return p


def alternating(setups: list[tuple[str, int]], repeats: int) -> list[tuple[int, tuple[str, int]]]:
    """(repeat, setup) pairs, the order of the setups reversed each repeat, so a busy spell on a
    shared machine hits all of them."""
    order, runs = list(setups), []
    for repeat in range(repeats):
        runs += [(repeat, setup) for setup in order]
        order.reverse()
    return runs


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def bench_extract(project: Path, params: dict, setups: list[tuple[str, int]], repeats: int) -> Path:
    print(f"\n== extract: {params['data']['demo']['n_items']} demo pairs ({params['data']['demo']['image_size']} px), "
          f"{params['clip']['model']} random init, batch {params['clip']['batch_size']}, "
          f"{params['clip']['num_workers']} decoding worker(s) per process; {repeats} run(s) each, median")
    rates: dict[tuple[str, int], list[float]] = {setup: [] for setup in setups}
    for repeat, (device, n) in alternating(setups, repeats):
        tag = f"{device}x{n}-{repeat}"
        lines = cmhash(project, with_processes(params, device, n), tag, "extract", "--out-dir", f"extract-{tag}",
                       "--metrics", f"extract-{tag}.json")
        found = next((m for _, line in lines if (m := RATE.search(line))), None)
        if found is None:
            raise SystemExit(f"no rate in the log of extract ({tag}):\n{''.join(line for _, line in lines)}")
        rates[(device, n)].append(float(found.group(2)))
    print(f"   {'device':8s} {'processes':>9s} {'pairs/s':>9s} {'min-max':>13s}")
    for (device, n), values in rates.items():
        print(f"   {device:8s} {n:9d} {statistics.median(values):9.1f} {spread(values):>13s}")
    one, two = (load_pickle(project / f"extract-cpux{n}-0/retrieval.pkl") for n in (1, 2))
    diff = max(float(np.abs(one[k] - two[k]).max()) for k in ("image", "text"))
    same = one["ids"] == two["ids"] and diff <= 1e-5 * max(float(np.abs(one["image"]).max()), 1.0)
    ratio = statistics.median(rates[("cpu", 2)]) / statistics.median(rates[("cpu", 1)])
    print(f"   2 / 1 processes (cpu) pairs/s: {ratio:.2f}x; features agree: {same} (max |difference| {diff:.1e})")
    if not same:
        raise SystemExit("the 2-process features differ from the 1-process ones")
    return project / "extract-cpux1-0"


def bench_train(project: Path, params: dict, features: Path, setups: list[tuple[str, int]], short: int, long: int, repeats: int) -> None:
    n_train, batch = params["data"]["demo"]["train"], params["train"]["batch_size"]
    per_epoch = n_train // batch
    print(f"\n== train-fusion: {n_train} train pairs, batch {batch} (global), {per_epoch} steps/epoch, "
          f"{params['model']['arch']} arch, loss {params['loss']}; {long} - {short} epochs timed, {repeats} run(s) each, median")
    epoch_seconds: dict[tuple[str, int], list[float]] = {setup: [] for setup in setups}
    for repeat, (device, n) in alternating(setups, repeats):
        training = {}
        for epochs in (short, long):
            p = with_processes(params, device, n)
            p["train"]["fusion"]["epochs"] = epochs
            tag = f"train-{device}x{n}-{epochs}-{repeat}"
            lines = cmhash(project, p, tag, "train-fusion", "--features-dir", str(features), "--out", f"{tag}/model.pt",
                           "--metrics-dir", f"{tag}/metrics", "--checkpoints", f"{tag}/checkpoints")
            training[epochs] = arrival(lines, TRAINED) - arrival(lines, *TRAINING)
        epoch_seconds[(device, n)].append((training[long] - training[short]) / (long - short))
    print(f"   {'device':8s} {'processes':>9s} {'steps/s':>9s} {'pairs/s':>9s} {'s/epoch':>8s} {'min-max':>13s}")
    steps = {}
    for (device, n), values in epoch_seconds.items():
        seconds = statistics.median(values)
        steps[(device, n)] = per_epoch / seconds
        print(f"   {device:8s} {n:9d} {steps[(device, n)]:9.2f} {steps[(device, n)] * batch:9.1f} {seconds:8.2f} {spread(values):>13s}")
    print(f"   2 / 1 processes (cpu) steps/s: {steps[('cpu', 2)] / steps[('cpu', 1)]:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 pairs, 128 for training in batches of 64, one run each: a smoke run")
    parser.add_argument("--n", type=int, default=1000, help="demo pairs (default 1000)")
    parser.add_argument("--train", type=int, default=512, help="training pairs among them (default 512)")
    parser.add_argument("--batch-size", type=int, default=128, help="train.batch_size, the global batch (default 128)")
    parser.add_argument("--workers", type=int, default=1, help="clip.num_workers, per process (default 1)")
    parser.add_argument("--short", type=int, default=1, help="epochs of the short training run (default 1)")
    parser.add_argument("--long", type=int, default=4, help="epochs of the long training run (default 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every process (default: cores / N for each of N processes, as cmhash sets)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement, alternating; the median counts (default 3)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.train, args.batch_size, args.long, args.repeats = 300, 128, 64, 3, 1
    params = base_params(args)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the commands and their workers inherit it
    threads = os.environ.get("OMP_NUM_THREADS")

    print(f"{datetime.date.today()}: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}; torch threads per process: "
          f"{threads or f'{torch.get_num_threads()} for 1 process, {max(1, (os.cpu_count() or 1) // 2)} each for 2'}")
    setups = [("cpu", 1), ("cpu", 2)]
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}")
        setups += [("cuda", 1)] + ([("cuda", 2)] if torch.cuda.device_count() >= 2 else [])
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        cmhash(project, params, "prepare", "prepare")
        features = bench_extract(project, params, setups, args.repeats)
        bench_train(project, params, features, setups, args.short, args.long, args.repeats)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
