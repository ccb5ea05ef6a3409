"""MAP speed: cmhash.evaluation against a straightforward per-query loop, in the same run.

    python benchmarks/bench_map.py            # MIRFlickr (2,000 x 18,015) and NUS-WIDE (2,100 x 190,000) scale
    python benchmarks/bench_map.py --quick    # small smoke run

Data: random 64-bit ±1 codes, multi-hot labels with 1-3 labels per item. The loop is the
field's `calculate_top_map` made deterministic: per query, float Hamming distances, a stable
argsort, then AP read off the ranking. The loop runs on the first --loop-queries queries
(default 300) and its time is extrapolated linearly to all queries (a per-query loop costs
the same for every query); the output says so. Values are compared on the queries both ran.
Times: wall clock, best of --repeats runs of each. Peak memory: the most memory traced by
tracemalloc (numpy's arrays included) at any moment of one run, on top of the inputs.
"""

from __future__ import annotations

import os

# One BLAS thread for both sides: the loop's matrix-vector products gain nothing from threads
# at these sizes, and spinning BLAS threads on a busy 2-core machine made its times erratic.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

from cmhash.evaluation.curves import pr_curve, precision_at_n  # noqa: E402
from cmhash.evaluation.ranking import chance_map, mean_average_precision, tie_aware_map  # noqa: E402
from timing import best_time  # noqa: E402


@dataclass(frozen=True)
class Scale:
    name: str
    n_query: int
    n_db: int
    n_labels: int


SCALES = {
    "mirflickr": Scale("MIRFlickr", 2000, 18015, 24),
    "nuswide": Scale("NUS-WIDE", 2100, 190000, 21),
}
QUICK = Scale("quick", 200, 3000, 24)
BITS = 64
TOPK_CASES = {"MAP@50": (50,), "MAP@all": (None,), "MAP@50+all": (50, None)}


def random_set(scale: Scale, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)

    def labels(n: int) -> np.ndarray:
        multi_hot = np.zeros((n, scale.n_labels), np.uint8)
        for _ in range(3):  # 1-3 labels per item (draws may repeat)
            multi_hot[np.arange(n), rng.integers(0, scale.n_labels, n)] = 1
        return multi_hot

    codes = lambda n: rng.choice(np.array([-1, 1], np.int8), (n, BITS))  # noqa: E731
    return codes(scale.n_query), codes(scale.n_db), labels(scale.n_query), labels(scale.n_db)


def loop_map(query_codes, db_codes, query_labels, db_labels, topk) -> dict:
    """The straightforward baseline: one query at a time, sort, walk the ranking."""
    bits = query_codes.shape[1]
    query_f, db_f = query_codes.astype(np.float32), db_codes.astype(np.float32)
    query_l, db_l = query_labels.astype(np.float32), db_labels.astype(np.float32)
    total = dict.fromkeys(topk, 0.0)
    for i in range(len(query_codes)):
        hamming = 0.5 * (bits - query_f[i] @ db_f.T)
        relevant = (query_l[i] @ db_l.T) > 0
        ranked = relevant[np.argsort(hamming, kind="stable")]
        for k in topk:
            hit_ranks = np.flatnonzero(ranked[:k]) + 1
            if len(hit_ranks):
                total[k] += float(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks))
    return {k: v / len(query_codes) for k, v in total.items()}


def peak_mib(run: Callable[[], object]) -> float:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def bench_scale(scale: Scale, loop_queries: int, repeats: int, seed: int) -> bool:
    data = random_set(scale, seed)
    n_loop = min(loop_queries, scale.n_query)
    subset = (data[0][:n_loop], data[1], data[2][:n_loop], data[3])
    extrapolate = scale.n_query / n_loop
    print(f"\n== {scale.name} scale: {scale.n_query} queries x {scale.n_db} database items, {BITS} bits, "
          f"{scale.n_labels} labels")
    if n_loop < scale.n_query:
        print(f"   loop timed on the first {n_loop} queries, x{extrapolate:.2f} (linear extrapolation)")
    print(f"   {'metric':16s} {'loop s':>9s} {'ours s':>9s} {'speed-up':>9s} {'peak MiB':>9s} {'max |diff|':>11s}  values (all queries)")
    ok = True
    for name, topk in TOPK_CASES.items():
        loop_s, loop_values = best_time(lambda topk=topk: loop_map(*subset, topk), repeats)
        loop_s *= extrapolate
        ours_s, ours_values = best_time(lambda topk=topk: mean_average_precision(*data, topk=topk), repeats)
        diff = max(abs(mean_average_precision(*subset, topk=topk)[k] - loop_values[k]) for k in topk)
        ok &= diff <= 1e-9
        values = ", ".join(f"@{'all' if k is None else k}={v:.6f}" for k, v in ours_values.items())
        print(f"   {name:16s} {loop_s:9.2f} {ours_s:9.2f} {loop_s / ours_s:8.1f}x "
              f"{peak_mib(lambda topk=topk: mean_average_precision(*data, topk=topk)):9.1f} {diff:11.1e}  {values}")
    others = {
        "tie-aware@50+all": lambda: tie_aware_map(*data, topk=(50, None)),
        "chance@50+all": lambda: chance_map(data[2], data[3], topk=(50, None)),
        "PR curve": lambda: pr_curve(*data),
        "P@100..1000": lambda: precision_at_n(*data, ns=(100, 200, 500, 1000)),
    }
    for name, run in others.items():
        seconds, _ = best_time(run, repeats)
        print(f"   {name:16s} {'':9s} {seconds:9.2f} {'':9s} {peak_mib(run):9.1f}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small scale (200 x 3,000), seconds")
    parser.add_argument("--scales", nargs="+", choices=sorted(SCALES), default=sorted(SCALES))
    parser.add_argument("--loop-queries", type=int, default=300, help="queries the per-query loop runs on (extrapolated)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    scales = [QUICK] if args.quick else [SCALES[name] for name in args.scales]
    ok = all([bench_scale(scale, args.loop_queries, args.repeats, args.seed) for scale in scales])
    print(f"\nprocess peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    if not ok:
        print("VALUES DIFFER between the loop and cmhash.evaluation", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
