"""Search speed: FAISS IndexBinaryFlat (what `cmhash search` uses) against a plain NumPy full scan,
in the same run.

    python benchmarks/bench_search.py              # 1,000,000 codes x 1,000 queries, 64 bits, top-10
    python benchmarks/bench_search.py --quick      # 100,000 codes, seconds
    python benchmarks/bench_search.py --scale      # the index kinds at 1M and 10M codes (about 15 min)

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

--scale: every index kind of `search.index` (cmhash.search.kinds) at each of --sizes (default 1M
and 10M 64-bit codes) and two code distributions:
  uniform     uniformly random codes: no structure, the worst case for IVF's lists
  clustered   sign of a random projection of a Gaussian mixture (1,024 components in 64 dims,
              noise 0.5 x the spread of the centres): codes that come in groups, as real ones do
Queries are --queries fresh draws from the same distribution. Per kind and knob setting: build time,
the index's bytes (faiss.serialize_index_binary) and the RSS growth while building, queries/s at
1 thread and at all threads (the kind's whole search: candidates, exact re-rank, tie rule), and
recall@10 against flat's rows (the fraction of flat's top-10 rows returned; strict about ties).
HNSW is built only up to --hnsw-max codes (its build is the slow part on a small machine).
"""

from __future__ import annotations

import os

# NumPy's scan is single-threaded anyway; keep BLAS from spinning threads on a small machine.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from cmhash.config.choices.indexes import HnswKnobs, IvfKnobs  # noqa: E402
from cmhash.search.index import binary_index, hamming_topk  # noqa: E402
from cmhash.search.kinds import Flat, Hnsw, Ivf  # noqa: E402
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
    parser.add_argument("--scale", action="store_true", help="the index kinds at --sizes codes (see the module docstring)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--hnsw-max", type=int, default=1_000_000, help="--scale: build HNSW only up to this many codes")
    args = parser.parse_args(argv)
    if args.scale:
        return scale(args)
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


# ------------------------------------------------------------------ --scale


def uniform_codes(n: int, rng: np.random.Generator, _model: object) -> np.ndarray:
    return rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8)


class Mixture:
    """A Gaussian mixture in `dim` dimensions and one random projection to BITS signs."""

    def __init__(self, rng: np.random.Generator, components: int = 1024, dim: int = 64, noise: float = 0.5) -> None:
        self.centres = rng.standard_normal((components, dim), dtype=np.float32)
        self.projection = rng.standard_normal((dim, BITS), dtype=np.float32)
        self.noise = noise


def clustered_codes(n: int, rng: np.random.Generator, mixture: Mixture) -> np.ndarray:
    out = np.empty((n, BITS // 8), np.uint8)
    for start in range(0, n, 1_000_000):  # in chunks: 10M x 64 floats would be 2.5 GB
        m = min(1_000_000, n - start)
        x = mixture.centres[rng.integers(0, len(mixture.centres), m)]
        x += mixture.noise * rng.standard_normal(x.shape, dtype=np.float32)
        out[start:start + m] = np.packbits(x @ mixture.projection > 0, axis=1)
    return out


DISTRIBUTIONS = {"uniform": uniform_codes, "clustered": clustered_codes}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settings(n: int, hnsw_max: int) -> list[tuple[str, object]]:
    """(label, kind) per knob setting swept at `n` codes: a small sweep, one build per kind and nlist."""
    nlist = 1024 if n <= 2_000_000 else 4096  # about sqrt(N) to 4 sqrt(N); the quantizer scan grows with nlist
    out: list[tuple[str, object]] = [("flat", Flat())]
    out += [(f"ivf nlist={nlist} nprobe={p}", Ivf(IvfKnobs(nlist=nlist, nprobe=p, train_sample=40 * nlist), rerank=4, seed=0))
            for p in (8, 32, 128)]
    if n <= hnsw_max:
        out += [(f"hnsw m=16 ef_search={ef}", Hnsw(HnswKnobs(m=16, ef_search=ef, ef_construction=40), rerank=4))
                for ef in (64, 256)]
    return out


def scale(args: argparse.Namespace) -> int:
    threads = faiss.omp_get_max_threads()
    print(f"--scale: {BITS}-bit codes, {args.queries} queries, top-{args.k}; {os.cpu_count()} CPU(s), FAISS threads {threads}; "
          f"load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    print("| codes | distribution | index and knobs | build s | index MiB | RSS growth MiB | q/s 1 thread "
          f"| q/s {threads} threads | vs flat (1 / {threads} threads) | recall@{args.k} |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for n in args.sizes:
        for dist_name, draw in DISTRIBUTIONS.items():
            rng = np.random.default_rng(args.seed)
            model = Mixture(rng)
            db, queries = draw(n, rng, model), draw(args.queries, rng, model)
            built: dict[int, tuple[float, faiss.IndexBinary, int, int]] = {}  # one build per kind and build knobs
            truth, flat_rates = None, {}
            for label, kind in settings(n, args.hnsw_max):
                key = (kind.name, tuple(v for k, v in kind.knobs.model_dump().items() if k not in ("nprobe", "ef_search")))
                if key not in built:
                    before = rss_bytes()
                    start = time.perf_counter()
                    index = kind.build(db)
                    seconds = time.perf_counter() - start
                    built[key] = (seconds, index, len(faiss.serialize_index_binary(index)), rss_bytes() - before)
                seconds, index, nbytes, grown = built[key]
                kind.opened(index)  # this setting's search knobs
                rates = {}
                for t in (1, threads):
                    faiss.omp_set_num_threads(t)
                    elapsed, (_, rows) = best_time(lambda kind=kind, index=index, queries=queries: kind.topk(index, queries, args.k), args.repeats)
                    rates[t] = args.queries / elapsed
                faiss.omp_set_num_threads(threads)
                if truth is None:
                    truth, flat_rates = rows, dict(rates)
                recall = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(rows, truth)])
                print(f"| {n:,} | {dist_name} | {label} | {seconds:.1f} | {nbytes / 2**20:.0f} | {grown / 2**20:.0f} "
                      f"| {rates[1]:,.0f} | {rates[threads]:,.0f} | {rates[1] / flat_rates[1]:.1f}x / "
                      f"{rates[threads] / flat_rates[threads]:.1f}x | {recall:.3f} |", flush=True)
            del built, db
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
