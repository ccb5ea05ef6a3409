"""Soak `cmhash serve`: many clients, good and bad queries, for a set time; no 5xx, bounded memory.

    python benchmarks/soak_serve.py --index-dir stages/index                  # 10 minutes, 16 clients
    python benchmarks/soak_serve.py --index-dir stages/index --seconds 20 --json

Starts `cmhash serve` on 127.0.0.1 (a free port, --max-upload-mb 1) on an index with both
modalities and image files, then --clients threads each send, for --seconds, a seeded random mix
of (expected status in brackets):
  text          GET /api/search?text=<an indexed caption>&k=… [200]
  image         POST /api/search, an indexed image file as a multipart upload [200]
  item          GET /api/items/{row}/similar?target=text|image&k=… [200]
  oversized     an upload over the 1 MiB limit [413]
  broken        an upload that is not an image, or a truncated one [415]
  long caption  a caption over the server's 1,000-character limit [400]
  bad k         k = 0, -3, 10**6, "ten" on a caption or an item query [400]
  disconnect    a raw socket that sends the headers and part of an upload's body, then closes [none]
Each client first sends every kind once (the warm-up); the server's RSS (/proc/<pid>/status) is
read after the warm-up and at the end. Reports: requests per kind, the count of 5xx (must be 0),
answers other than the expected status, p50/p99 latency over the answered requests, RSS at the
start and the end (growth must stay under --max-rss-growth, 10%), and tracebacks in the server's
log (and 5xx lines there: also those answered to a client that had gone). Exit code 1 if a
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

CMHASH = Path(sys.executable).with_name("cmhash")
UPLOAD_LIMIT_MB = 1
LONG_CAPTION = 1001  # the server's default --max-text-chars is 1,000
EXPECTED = {"text": 200, "image": 200, "item": 200, "oversized": 413, "broken": 415, "long caption": 400, "bad k": 400}
KINDS = [*EXPECTED, "disconnect"]


def start_server(index_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    out = log.open("w")
    proc = subprocess.Popen([str(CMHASH), "serve", "--index-dir", str(index_dir), "--port", "0", "--max-upload-mb", str(UPLOAD_LIMIT_MB)],
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("serving "):
                return proc, line.split(" on ")[1].split()[0]
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"cmhash serve did not start:\n{log.read_text()}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"no VmRSS for process {pid}")


class Client:
    """One client's requests: a kind in, (status or None for a disconnect, seconds) out."""

    def __init__(self, url: str, items: list[dict], images: list[bytes], seed: int) -> None:
        self.url, self.items, self.images = url, items, images
        self.rng = random.Random(seed)
        self.http = httpx.Client(base_url=url, timeout=120)

    def send(self, kind: str) -> tuple[int | None, float]:
        start = time.perf_counter()
        status = self._disconnect() if kind == "disconnect" else getattr(self, "_" + kind.replace(" ", "_"))().status_code
        return status, time.perf_counter() - start

    def _caption(self) -> str:
        return self.rng.choice([item["caption"] for item in self.items if item.get("caption")])

    def _upload(self, data: bytes, name: str = "query.png", k: str = "10") -> httpx.Response:
        return self.http.post("api/search", files={"image": (name, data, "image/png")}, data={"k": k})

    def _text(self) -> httpx.Response:
        return self.http.get("api/search", params={"text": self._caption(), "k": self.rng.randint(1, 100)})

    def _image(self) -> httpx.Response:
        return self._upload(self.rng.choice(self.images), k=str(self.rng.randint(1, 100)))

    def _item(self) -> httpx.Response:
        row, target = self.rng.randrange(len(self.items)), self.rng.choice(["text", "image"])
        return self.http.get(f"api/items/{row}/similar", params={"target": target, "k": self.rng.randint(1, 100)})

    def _oversized(self) -> httpx.Response:
        return self._upload(self.rng.randbytes(UPLOAD_LIMIT_MB * 2**20 + self.rng.randint(1, 2**20)))

    def _broken(self) -> httpx.Response:
        good = self.rng.choice(self.images)
        return self._upload(self.rng.choice([good[: len(good) // 2], self.rng.randbytes(5000), b""]))

    def _long_caption(self) -> httpx.Response:
        return self.http.get("api/search", params={"text": "a red circle " * (LONG_CAPTION // 13 + 1)})

    def _bad_k(self) -> httpx.Response:
        k = self.rng.choice(["0", "-3", str(10**6), "ten"])
        if self.rng.random() < 0.5:
            return self.http.get("api/search", params={"text": self._caption(), "k": k})
        return self.http.get("api/items/0/similar", params={"target": "text", "k": k})

    def _disconnect(self) -> None:
        """An upload that stops halfway: headers and part of the body, then the socket closes."""
        address = urlsplit(self.url)
        body = b"--soak\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n\r\n" + self.rng.choice(self.images)
        head = (f"POST /api/search HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: multipart/form-data; boundary=soak\r\n"
                f"Content-Length: {len(body) + 100}\r\n\r\n").encode()
        with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
            sock.sendall(head + body[: self.rng.randint(1, len(body))])
        return None

    def close(self) -> None:
        self.http.close()


def soak(index_dir: Path, seconds: float, clients: int, seed: int, log: Path) -> dict:
    items = [json.loads(line) for line in (index_dir / "items.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    images = [Path(item["image"]).read_bytes() for item in items[:50] if item.get("image")]
    if not images or not any(item.get("caption") for item in items):
        raise SystemExit(f"{index_dir} needs images and captions (an index of a split: cmhash index --split retrieval)")
    proc, url = start_server(index_dir, log)
    counts, unexpected, latencies = Counter(), Counter(), []
    lock = threading.Lock()
    try:
        pool_clients = [Client(url, items, images, seed * 1000 + i) for i in range(clients)]

        def record(kind: str, status: int | None, took: float) -> None:
            with lock:
                counts[kind] += 1
                if status is not None:
                    latencies.append(took)
                    if status != EXPECTED[kind]:
                        unexpected[f"{kind} -> {status}"] += 1

        def warm_up(client: Client) -> None:
            for kind in KINDS:
                record(kind, *client.send(kind))

        def run(client: Client, deadline: float) -> None:
            while time.monotonic() < deadline:
                kind = client.rng.choice(KINDS)
                record(kind, *client.send(kind))

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(warm_up, pool_clients))
            rss_start = rss_kib(proc.pid)
            start = time.monotonic()
            list(pool.map(run, pool_clients, [start + seconds] * clients))
            wall = time.monotonic() - start
        with httpx.Client(base_url=url, timeout=30) as http:
            alive = http.get("healthz").status_code == 200
        rss_end = rss_kib(proc.pid)
        for client in pool_clients:
            client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    server_log = log.read_text()
    server_errors = sum(" 500 " in line for line in server_log.splitlines())
    return {
        "seconds": round(wall, 1), "clients": clients, "requests": sum(counts.values()), "per_kind": dict(sorted(counts.items())),
        "5xx": sum(n for name, n in unexpected.items() if name.split(" -> ")[1].startswith("5")),
        "5xx_in_log": server_errors,  # also those answered to a client that had gone
        "unexpected": dict(unexpected), "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1), "rss_start_mib": round(rss_start / 1024, 1),
        "rss_end_mib": round(rss_end / 1024, 1), "rss_growth": round(rss_end / rss_start - 1, 4),
        "tracebacks_in_log": server_log.count("Traceback"), "alive_at_end": alive, "exit_code": code,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", type=Path, default=Path("stages/index"))
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--log", type=Path, default=Path("soak_serve.log"), help="the server's log (uvicorn's, one line a request)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    report = soak(args.index_dir, args.seconds, args.clients, args.seed, args.log)
    failed = [check for check, bad in {
        "5xx answers": report["5xx"] > 0 or report["5xx_in_log"] > 0,
        "answers other than the expected status": bool(report["unexpected"]),
        f"RSS growth {report['rss_growth']:.1%} over {args.max_rss_growth:.0%}": report["rss_growth"] >= args.max_rss_growth,
        "tracebacks in the server's log": report["tracebacks_in_log"] > 0,
        "the server stopped answering": not report["alive_at_end"],
    }.items() if bad]
    report["failed"] = failed
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
