"""Warm `cmhash serve` against the cold `cmhash search` CLI on one index, and the server with
batching on and off, in the same run.

    python benchmarks/bench_serve.py --index-dir stages/index         # from where the index was built
    python benchmarks/bench_serve.py --index-dir /tmp/ix --duration 10 --cli-runs 3 --clients 1 8

Timed, all text queries (captions of the index itself, a different one each time):
  cli      `cmhash search --text … --json` as a subprocess, start to exit: it loads torch, CLIP, the
           hash model and the index for every query (--cli-runs runs)
  warm     GET /api/search?text=…&k=10 on `cmhash serve --batch 1` (no batching), started by this
           script on 127.0.0.1 (a free port), one client, one query after another (--warm-queries,
           after 20 untimed)
  loaded   for each server (--batch 1, the baseline, then --batch B --batch-wait-ms W for each
           --batching B:W) and each count in --clients: that many clients (threads, one httpx
           connection each) querying at once for --duration seconds (and at most --max-requests
           requests): queries/s and latency under load
Latency percentiles are over requests, wall clock. Checks: each server's results equal the CLI's
for the same captions, and no request fails. Everything stays on this machine (127.0.0.1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

CMHASH = Path(sys.executable).with_name("cmhash")


def captions_of(index_dir: Path) -> list[str]:
    items = [json.loads(line) for line in (index_dir / "items.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    captions = [item["caption"] for item in items if item.get("caption")]
    return captions or [f"a {colour} {shape}" for colour in ("red", "blue", "green") for shape in ("circle", "square", "star")]


def start_server(index_dir: Path, batch: int, wait_ms: float) -> tuple[subprocess.Popen, str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([str(CMHASH), "serve", "--index-dir", str(index_dir), "--port", "0", "--batch", str(batch),
                             "--batch-wait-ms", str(wait_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("serving "):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain the rest
            return proc, line.split(" on ")[1].split()[0], time.perf_counter() - start
    raise SystemExit(f"cmhash serve did not start (exit code {proc.wait()})")


def cli_search(index_dir: Path, caption: str) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([str(CMHASH), "search", "--index-dir", str(index_dir), "--text", caption, "--json"],
                          capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(done.stdout)


def timed_get(http: httpx.Client, caption: str) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    answer = http.get("api/search", params={"text": caption, "k": 10})
    return time.perf_counter() - start, answer


def under_load(url: str, captions: list[str], clients: int, duration: float, max_requests: int) -> tuple[list[float], int, float]:
    """Latencies of every request `clients` threads made in `duration` seconds, failures, and the wall time."""
    deadline = time.perf_counter() + duration
    budget = iter(range(max_requests))  # shared: the run stops at whichever bound comes first
    lock = threading.Lock()

    def client(offset: int) -> tuple[list[float], int]:
        latencies, failures = [], 0
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.perf_counter() < deadline:
                with lock:
                    n = next(budget, None)
                if n is None:
                    break
                seconds, answer = timed_get(http, captions[(offset + n) % len(captions)])
                latencies.append(seconds)
                failures += answer.status_code != 200
        return latencies, failures

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(client, range(0, clients * 97, 97)))
    return [s for run, _ in runs for s in run], sum(f for _, f in runs), time.perf_counter() - start


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def batching(text: str) -> tuple[int, float]:
    size, _, wait = text.partition(":")
    return int(size), float(wait or 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", type=Path, default=Path("stages/index"))
    parser.add_argument("--cli-runs", type=int, default=5)
    parser.add_argument("--warm-queries", type=int, default=200)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batching", type=batching, nargs="+", default=[(32, 2.0)], metavar="SIZE:WAIT_MS",
                        help="batched servers to measure beside --batch 1 (default 32:2)")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    args = parser.parse_args(argv)
    captions = captions_of(args.index_dir)
    meta = json.loads((args.index_dir / "index.json").read_text())
    load_before = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPU(s), {platform.platform()}, Python {platform.python_version()}; "
          f"load average {load_before[0]:.2f} at the start")
    print(f"index: {args.index_dir} ({meta['count']:,} items, {meta['bits']}-bit codes, {meta.get('backend', {'name': 'faiss'})['name']}, "
          f"CLIP {meta['clip']['clip_model']}, pretrained {meta['clip']['pretrained']})")

    cli = [cli_search(args.index_dir, captions[i % len(captions)]) for i in range(args.cli_runs)]
    cli_s = [seconds for seconds, _ in cli]
    rows = [(f"`cmhash search` CLI (cold), {args.cli_runs} runs", ms(cli_s, 50), ms(cli_s, 95), len(cli_s) / sum(cli_s))]
    loaded: dict[tuple[int, float, int], tuple[float, float, float]] = {}  # (batch, wait, clients) -> p50, p95, queries/s
    failures, startups = 0, []
    for batch, wait_ms in [(1, 0.0), *args.batching]:
        proc, url, startup = start_server(args.index_dir, batch, wait_ms)
        startups.append(startup)
        server = "no batching (`--batch 1`)" if batch == 1 else f"`--batch {batch} --batch-wait-ms {wait_ms:g}`"
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                for _, found in cli:  # the same answers as the CLI
                    answer = http.get("api/search", params={"text": found["query"]["text"], "k": 10}).json()
                    assert answer["results"] == found["results"], "the server and the CLI disagree"
                for i in range(20):
                    timed_get(http, captions[-1 - i % len(captions)])
                if batch == 1:
                    warm = [timed_get(http, captions[i % len(captions)]) for i in range(args.warm_queries)]
                    assert all(answer.status_code == 200 for _, answer in warm)
                    warm_s = [seconds for seconds, _ in warm]
                    rows.append((f"`cmhash serve`, {server}, 1 client, {args.warm_queries} queries one after another",
                                 ms(warm_s, 50), ms(warm_s, 95), len(warm_s) / sum(warm_s)))
            for clients in args.clients:
                latencies, failed, wall = under_load(url, captions, clients, args.duration, args.max_requests)
                failures += failed
                measured = loaded[batch, wait_ms, clients] = ms(latencies, 50), ms(latencies, 95), len(latencies) / wall
                rows.append((f"`cmhash serve`, {server}, {clients} client(s), {wall:.0f} s ({len(latencies):,} queries)", *measured))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    load_after = os.getloadavg()

    print(f"\nserver start (CLIP, hash model and index loaded once): {min(startups):.1f}-{max(startups):.1f} s; "
          f"load average {load_after[0]:.2f} at the end")
    print("\n| text query, k = 10 | p50 ms | p95 ms | queries/s |\n|---|---:|---:|---:|")
    for name, p50, p95, rate in rows:
        print(f"| {name} | {p50:,.1f} | {p95:,.1f} | {rate:,.1f} |")
    print(f"\nwarm p50 {ms(warm_s, 50):.1f} ms; CLI p50 / warm p50 = {ms(cli_s, 50) / ms(warm_s, 50):,.0f}x; failed requests under load: {failures}")
    for batch, wait_ms in args.batching:
        for clients in args.clients:
            (p50, _, rate), (base_p50, _, base_rate) = loaded[batch, wait_ms, clients], loaded[1, 0.0, clients]
            print(f"--batch {batch} --batch-wait-ms {wait_ms:g}, {clients} client(s): {rate / base_rate:.2f}x the queries/s of --batch 1 "
                  f"(p50 {p50:.1f} ms against {base_p50:.1f} ms)")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
