"""`cmhash serve`: bind the address, load the searcher once, run uvicorn until Ctrl+C."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Annotated

import typer

from cmhash.errors import ConfigError
from cmhash.serve.limits import MB, Batching, Limits

DEFAULTS = Limits()
BATCHING = Batching()
# FastAPI, uvicorn and the models are imported inside the command: `--help` and a mistake in the
# options answer without loading them.


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the models load, so a taken port fails at once. Made with
    proto IPPROTO_TCP: asyncio turns Nagle's algorithm off only on such sockets, and with it on, a
    response written in two parts waits for the client's delayed ACK (40 ms a request)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: use 0 (any free port) to 65535")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(
    index_dir: Annotated[Path, typer.Option(help="the folder `cmhash index` wrote (FAISS or Milvus codes).")] = Path("stages/index"),
    model: Annotated[Path | None, typer.Option(help="hash model; default: the one the index was built with.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    host: Annotated[str, typer.Option(help="address to listen on; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on; 0 picks a free one (printed).")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="largest image upload, in MiB.")] = DEFAULTS.max_upload_bytes / MB,
    max_pixels: Annotated[int | None, typer.Option(help="largest image, width x height, checked before decoding; "
                                                        "default Pillow's limit (about 89 million).")] = None,
    max_text_chars: Annotated[int, typer.Option(help="longest caption, in characters.")] = DEFAULTS.max_text_chars,
    max_k: Annotated[int, typer.Option(help="most results one query may ask for.")] = DEFAULTS.max_k,
    threads: Annotated[int, typer.Option(help="torch and FAISS threads for a query or a batch of them; "
                                              "more can help a large CLIP on idle cores.")] = 1,
    batch: Annotated[int, typer.Option(help="most queries encoded and searched as one batch; 1: no batching.")] = BATCHING.size,
    batch_wait_ms: Annotated[float, typer.Option(help="longest a query waits for others to batch with, in ms.")] = BATCHING.wait_ms,
) -> None:
    """Serve search over HTTP, with a page at / to search from: the index, its hash model and CLIP load
    once, then each query takes milliseconds. API: GET /api/search?text=…&k=10, POST /api/search (an
    image file or JSON {"text": …}), GET /api/items/{row}/similar?target=text|image&k=10, GET /api/info,
    GET /api/items/{row}/image, GET /healthz. Concurrent queries are encoded and searched in batches (--batch)."""
    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be above 0 (got {max_upload_mb})")
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1 (got {threads})")
    limits = Limits(max_upload_bytes=int(max_upload_mb * MB), max_pixels=max_pixels, max_text_chars=max_text_chars, max_k=max_k)
    batching = Batching(batch, batch_wait_ms)
    sock = listen(host, port)
    try:
        import faiss
        import torch
        import uvicorn

        from cmhash.search.engine import Searcher
        from cmhash.serve.app import create_app

        # One query is a batch of one: splitting its small matrix products across threads costs more
        # than it saves, and far more when another process holds a core (each parallel step waits for
        # the thread that is not running). Set here, in the main thread, before any worker starts.
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        searcher = Searcher.load(index_dir, model, device)
        server = uvicorn.Server(uvicorn.Config(create_app(searcher, limits, batching), log_level="info", timeout_graceful_shutdown=5))
        shown = f"[{host}]" if ":" in host else host
        info = searcher.info()
        typer.echo(f"serving {index_dir} ({info['count']:,} items, {info['bits']}-bit codes, {info['backend']}) "
                   f"on http://{shown}:{sock.getsockname()[1]}/ (Ctrl+C stops)")
        # uvicorn restores the SIGINT handler it found and re-raises SIGINT after its graceful shutdown;
        # inherited as ignored (a background job started from a script) that raise does nothing and the
        # command exits 0. With Python's own handler it raises KeyboardInterrupt: exit code 130, as for Ctrl+C.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        server.run(sockets=[sock])
    finally:
        sock.close()
