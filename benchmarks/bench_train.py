"""Training-loop speed: cmhash.training.engine.fit against a plain torch DataLoader loop, in the same run.

    python benchmarks/bench_train.py            # demo (1,500 pairs, dim 256) and MIRFlickr-sized (5,000 pairs, dim 512)
    python benchmarks/bench_train.py --quick    # small smoke run

Data: random features (image, text) on the device, --batch-size pairs per step.
Model and loss: params.yaml's defaults - task 0 (fusion), `reference` architecture (d_model =
2 x dim, 4 heads, 2 layers, feed-forward 2048, dropout 0.1), loss `contrastive`, train.inputs
`both`, Adam (0.5, 0.999) lr 1e-4, fp32. Both sides build the same model from the same seed.

ours      engine.fit, the loop `cmhash train-fusion` runs, here with hooks=[]: the features stay
          on the device, each batch is an index slice of one randperm per epoch (engine.batches),
          monitor stats per step.
baseline  for image, text in DataLoader(TensorDataset(image, text), batch_size, shuffle=True,
          drop_last=True): the same step, the same monitor stats, the scheduler stepped per epoch.

Fairness: both sides start from the same weights, run the same number of optimiser steps
(counted and checked: drop_last on both, floor(n / batch) steps per epoch), and each runs an
untimed warm-up first (one epoch over the first 3 batches' pairs). Then --epochs timed epochs,
--repeats times (default 5), the two sides
alternating (and swapping which goes first) so a busy spell on a shared machine hits both;
the median repeat is reported, with the fastest and slowest. engine.fit's progress bar is
drawn as usual (its cost is part of what `cmhash train-*` pays) but into a buffer, not the
terminal. A last line times the batching alone (one epoch of index-and-fetch, no model,
median of 5) to show what the data path itself costs. The load average is printed before
and after: on a shared machine, read the numbers next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from cmhash.config.schema import parse_params
from cmhash.config.stages import TaskSettings
from cmhash.features.store import FeatureSplit
from cmhash.training.engine import TrainState, batches, fit
from cmhash.training.monitor import pair_stats
from cmhash.training.state import build_state, model_config


@dataclass(frozen=True)
class Scale:
    name: str
    n: int
    dim: int
    repeats: int  # default timed repeats per side


SCALES = {"demo": Scale("demo", 1500, 256, 5), "mirflickr": Scale("MIRFlickr-sized", 5000, 512, 5)}
QUICK = Scale("quick", 512, 64, 3)
WARMUP_BATCHES = 3


# Task 0 as the stage trains it (model.reference's defaults: d_model 2 x dim, 4 heads, 2 layers,
# feed-forward 2048, dropout 0.1; Adam), with the reference's loss; the lr does not move the timing.
SETTINGS = TaskSettings.of(parse_params({"loss": "contrastive", "train": {"precision": "fp32"}}), "fusion")


def new_state(dim: int, device: torch.device) -> TrainState:
    torch.manual_seed(0)
    return build_state(SETTINGS, model_config(SETTINGS, dim, None), device)


def count_steps(state: TrainState) -> list[int]:
    """Wrap the runner's step so the number of optimiser steps each side runs can be checked."""
    counter, step = [0], state.runner.step

    def counted(image: torch.Tensor, text: torch.Tensor):
        counter[0] += 1
        return step(image, text)

    state.runner.step = counted  # type: ignore[method-assign]
    return counter


def ours(state: TrainState, data: FeatureSplit, batch_size: int, epochs: int) -> None:
    state.epoch = 0
    with contextlib.redirect_stdout(io.StringIO()):  # the progress bar, drawn but not shown
        fit(state, data, epochs=epochs, batch_size=batch_size, clip_grad_norm=0.0, hooks=[],
            generator=torch.Generator().manual_seed(0))


def baseline(state: TrainState, data: FeatureSplit, batch_size: int, epochs: int) -> None:
    loader = DataLoader(TensorDataset(data.image, data.text), batch_size=batch_size, shuffle=True, drop_last=True)
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    state.runner.model.train()
    for _ in range(epochs):
        for image, text in loader:
            loss, outputs = state.runner.step(image, text)
            state.precision.backward_step(loss, state.optimizer, params, 0.0).item()
            loss.item(), pair_stats(*outputs)
        state.scheduler.after_epoch()


def timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # queued GPU work counts
    return time.perf_counter() - start


def bench_scale(scale: Scale, batch_size: int, epochs: int, repeats: int | None, device: torch.device) -> None:
    repeats = repeats or scale.repeats
    g = torch.Generator().manual_seed(1)
    data = FeatureSplit(*(torch.randn(scale.n, scale.dim, generator=g).to(device) for _ in range(2)),
                    label=torch.zeros(scale.n, 1, device=device), meta={})
    per = scale.n // batch_size
    steps = epochs * per
    sides = {"ours (engine.fit)": (ours, new_state(scale.dim, device)),
             "DataLoader loop": (baseline, new_state(scale.dim, device))}
    counters = {name: count_steps(state) for name, (_, state) in sides.items()}
    warmup = FeatureSplit(data.image[: WARMUP_BATCHES * batch_size], data.text[: WARMUP_BATCHES * batch_size],
                      data.label[: WARMUP_BATCHES * batch_size], meta={})
    for loop, state in sides.values():
        loop(state, warmup, batch_size, 1)  # first-call costs (allocator, kernels) out of the timings
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for _ in range(repeats):  # alternate, so a busy spell on a shared machine hits both sides
        for name in order:
            loop, state = sides[name]
            times[name].append(timed(lambda loop=loop, state=state: loop(state, data, batch_size, epochs)))
        order.reverse()
    expected = WARMUP_BATCHES + repeats * steps
    if any(counter[0] != expected for counter in counters.values()):
        raise RuntimeError(f"step counts differ: {({k: c[0] for k, c in counters.items()})}, expected {expected} each")

    print(f"\n== {scale.name}: {scale.n} pairs, dim {scale.dim}, batch {batch_size}, {per} steps/epoch, "
          f"{epochs} timed epoch(s) x {repeats} repeats (median; steps checked equal), {device}")
    print(f"   {'loop':20s} {'steps/s':>9s} {'s/epoch':>9s} {'s/epoch min-max':>16s}")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in median.items():
        spread = f"{min(times[name]) / epochs:.2f}-{max(times[name]) / epochs:.2f}"
        print(f"   {name:20s} {steps / seconds:9.2f} {seconds / epochs:9.2f} {spread:>16s}")
    ours_s, base_s = median.values()
    print(f"   ours / DataLoader steps/s (median): {base_s / ours_s:.2f}x")

    def index_batches() -> None:
        for idx in batches(scale.n, batch_size, torch.Generator().manual_seed(0), device):
            data.image[idx], data.text[idx]

    def loader_batches() -> None:
        for _ in DataLoader(TensorDataset(data.image, data.text), batch_size=batch_size, shuffle=True, drop_last=True):
            pass

    index_s = statistics.median(timed(index_batches) for _ in range(5))
    loader_s = statistics.median(timed(loader_batches) for _ in range(5))
    print(f"   batching alone, 1 epoch: index batches {1e3 * index_s / per:.3f} ms/batch, "
          f"DataLoader {1e3 * loader_s / per:.3f} ms/batch ({loader_s / index_s:.0f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small scale, seconds")
    parser.add_argument("--scales", nargs="+", choices=sorted(SCALES), default=sorted(SCALES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per repeat")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per side, alternating; the median counts (default: 5; 3 with --quick)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    for scale in [QUICK] if args.quick else [SCALES[name] for name in args.scales]:
        bench_scale(scale, args.batch_size, args.epochs, args.repeats, device)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
