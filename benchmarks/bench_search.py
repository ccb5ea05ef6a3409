"""Search speed: FAISS IndexBinaryFlat (what `cmhash search` uses) against a plain NumPy full scan,
in the same run.

    python benchmarks/bench_search.py              # 1,000,000 codes x 1,000 queries, 64 bits, top-10
    python benchmarks/bench_search.py --quick      # 100,000 codes, seconds

Data: uniformly random 64-bit codes, packed 8 bytes per code. Timed, each over its own queries:
  faiss                IndexBinaryFlat.search, FAISS's own tie order; with all threads (OpenMP over
                       queries) and with 1 thread, like for like with NumPy
  cmhash               cmhash.search.index.hamming_topk, as `cmhash search` runs it: FAISS asked for
                       k + 32 rows, sorted by (distance, row), plus a range search for the rare query
                       whose ties run past that; all threads and 1 thread
  numpy                per query: XOR of the uint64 codes, np.bitwise_count, np.argpartition for the
                       top k, then the same tie rule; on --numpy-queries queries (default 100)
Rates are queries/second (per-query rates, so different query counts compare). Times: wall clock,
best of --repeats runs. Checks: FAISS's top-k distances equal NumPy's, and cmhash's rows equal
NumPy's exactly (same tie rule), on the queries both ran.
"""

from __future__ import annotations

import os

# NumPy's scan is single-threaded anyway; keep BLAS from spinning threads on a small machine.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from cmhash.search.index import binary_index, hamming_topk  # noqa: E402
from timing import best_time  # noqa: E402

BITS = 64


def numpy_topk(db64: np.ndarray, queries64: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The straightforward baseline: one full scan per query; ties by database row."""
    dist_out = np.empty((len(queries64), k), np.int32)
    rows_out = np.empty((len(queries64), k), np.int64)
    for q, query in enumerate(queries64):
        dist = np.bitwise_count(db64 ^ query)  # uint8 [N]
        kth = dist[np.argpartition(dist, k - 1)[k - 1]]
        candidates = np.flatnonzero(dist <= kth)  # every row that can be in the top k, by row
        top = candidates[np.argsort(dist[candidates], kind="stable")[:k]]
        dist_out[q], rows_out[q] = dist[top], top
    return dist_out, rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000, help="queries for FAISS and cmhash")
    parser.add_argument("--numpy-queries", type=int, default=100, help="queries for the NumPy scan (its rate is per query)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100,000 codes, 200 queries")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.codes, args.queries = 100_000, 200

    rng = np.random.default_rng(args.seed)
    db = rng.integers(0, 256, (args.codes, BITS // 8), dtype=np.uint8)
    queries = rng.integers(0, 256, (args.queries, BITS // 8), dtype=np.uint8)
    n_numpy = min(args.numpy_queries, args.queries)
    threads = faiss.omp_get_max_threads()
    build_s, index = best_time(lambda: binary_index(db), 1)
    print(f"{args.codes:,} random {BITS}-bit codes ({db.nbytes / 2**20:.1f} MiB), top-{args.k}; "
          f"index built in {build_s:.2f} s; {os.cpu_count()} CPU(s), FAISS threads {threads}")

    def on_threads(n_threads: int, run: Callable[[], object]) -> Callable[[], object]:
        def timed():
            faiss.omp_set_num_threads(n_threads)
            try:
                return run()
            finally:
                faiss.omp_set_num_threads(threads)
        return timed

    db64, queries64 = db.view(np.uint64).ravel(), queries[:n_numpy].view(np.uint64).ravel()
    runs = {
        f"faiss, {threads} threads": (args.queries, on_threads(threads, lambda: index.search(queries, args.k))),
        "faiss, 1 thread": (args.queries, on_threads(1, lambda: index.search(queries, args.k))),
        f"cmhash, {threads} threads": (args.queries, on_threads(threads, lambda: hamming_topk(index, queries, args.k))),
        "cmhash, 1 thread": (args.queries, on_threads(1, lambda: hamming_topk(index, queries, args.k))),
        "numpy, 1 thread": (n_numpy, lambda: numpy_topk(db64, queries64, args.k)),
    }
    rates, results = {}, {}
    print(f"{'':22s} {'queries':>8s} {'seconds':>9s} {'queries/s':>10s}")
    for name, (n, run) in runs.items():
        seconds, results[name] = best_time(run, args.repeats)
        rates[name] = n / seconds
        print(f"{name:22s} {n:8,d} {seconds:9.3f} {rates[name]:10,.0f}")

    base = rates["numpy, 1 thread"]
    for name in runs:
        if name != "numpy, 1 thread":
            print(f"{name:22s} {rates[name] / base:6.1f}x numpy")
    numpy_dist, numpy_rows = results["numpy, 1 thread"]
    faiss_dist = np.sort(results[f"faiss, {threads} threads"][0][:n_numpy], axis=1)
    ours_dist, ours_rows = (a[:n_numpy] for a in results["cmhash, 1 thread"])
    same_dist = np.array_equal(faiss_dist, numpy_dist) and np.array_equal(ours_dist, numpy_dist)
    same_rows = np.array_equal(ours_rows, numpy_rows)
    print(f"on {n_numpy} queries: top-{args.k} distances identical: {same_dist}; cmhash rows (ties by row) identical: {same_rows}")
    if not (same_dist and same_rows):
        print("RESULTS DIFFER between FAISS and the NumPy scan", file=sys.stderr)
    return 0 if same_dist and same_rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
