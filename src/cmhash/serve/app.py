"""The HTTP API and the page, over one loaded Searcher.

    GET  /                          the search page (static/index.html)
    GET  /healthz                   {"status": "ok"}
    GET  /api/info                  the index, code length, modalities, models, limits; a notice for random-init CLIP
    GET  /api/search?text=…&k=10    the images nearest to a caption
    POST /api/search                JSON {"text": …, "k": …}, or a multipart form with an `image` file (and `k`)
    GET  /api/items/{row}/image     an indexed image (cmhash.serve.files decides which)
    GET  /api/items/{row}/similar?target=text|image&k=10
                                    the captions (images) nearest to row's own image (caption) code

A search answers exactly what `cmhash search --json` prints (--image-of / --text-of for the item
queries). A bad query is a 4xx JSON {"error": "…"}, refused before it queues, and the server goes
on. Checked queries go to the Searcher one at a time or micro-batched (cmhash.serve.batching), in
worker threads: the event loop keeps answering.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from cmhash.errors import CmhashError
from cmhash.search.engine import OTHER, Searcher
from cmhash.search.queries import QueryError, check_text, check_top, read_image
from cmhash.serve.batching import answerer as make_answerer
from cmhash.serve.files import IndexedImages, row_number
from cmhash.serve.limits import Batching, Limits

STATIC = Path(__file__).parent / "static"
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, headers and a `k` field around the file
# The page may load its own script, style and images (and the picture dropped on it), nothing else.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(searcher: Searcher, limits: Limits | None = None, batching: Batching | None = None) -> FastAPI:
    limits, batching = limits or Limits(), batching or Batching()
    images = IndexedImages(searcher.index.items, searcher.index.meta["source"])
    answerer = make_answerer(searcher, batching)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        answerer.close()

    # No /docs or /redoc: their pages load scripts from a CDN. The schema stays, at /api/openapi.json.
    app = FastAPI(title="cmhash", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json", lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(CmhashError)
    async def user_error(request: Request, exc: CmhashError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status if isinstance(exc, QueryError) else 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail).lower()}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client closed the connection mid-body (an upload cut off): no one reads this answer, and it
        # is no fault of the server's, so no traceback in the log (the `Exception` handler's would be).
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:  # the traceback goes to the server's log
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {**searcher.info(), "limits": asdict(limits), "batching": asdict(batching)}

    def top(raw: Any) -> int:
        if raw is None or raw == "":
            return limits.default_k
        digits = str(raw).strip().removeprefix("-")
        if isinstance(raw, bool) or not isinstance(raw, int | str) or not (digits.isascii() and digits.isdigit()):
            raise QueryError(f"k must be a whole number (got {json.dumps(raw)})")
        return check_top(int(raw), "k", limits.max_k)

    async def search_text(text: Any, k: Any) -> dict[str, Any]:
        if not isinstance(text, str):
            raise QueryError('give a caption: GET /api/search?text=…, POST {"text": "…"}, or POST a multipart form with an image file')
        check_text(text, "text", limits.max_text_chars)
        return await answerer.ask(searcher.text_query(text, top(k)))

    @app.get("/api/search")
    async def search_get(text: str | None = None, k: str | None = None) -> dict[str, Any]:
        return await search_text(text, k)

    @app.post("/api/search")
    async def search_post(request: Request) -> dict[str, Any]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            body = await read_body(request, limits.max_json_bytes)
            try:
                query = json.loads(body)
            except ValueError:
                raise QueryError("the body is not valid JSON") from None
            if not isinstance(query, dict):
                raise QueryError('the JSON body must be an object: {"text": "…", "k": 10}')
            return await search_text(query.get("text"), query.get("k", request.query_params.get("k")))
        if kind == "multipart/form-data":
            body = await read_body(request, limits.max_upload_bytes + FORM_OVERHEAD)
            try:
                form = await MultiPartParser(request.headers, once(body), max_files=1, max_fields=8).parse()
            except MultiPartException as exc:
                raise QueryError(f"bad multipart form: {exc.message}") from None
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise QueryError("the form has no file in an `image` field")
            data, name = await upload.read(), upload.filename or "upload"
            await form.close()
            if len(data) > limits.max_upload_bytes:
                raise too_large()
            k = top(form.get("k", request.query_params.get("k")))
            picture = await run_in_threadpool(read_image, data, name, limits.max_pixels)  # decoded in parallel with other requests
            return await answerer.ask(await run_in_threadpool(searcher.image_query, picture, name, k))
        raise QueryError(f'POST JSON {{"text": "…"}} or a multipart form with an `image` file, not {kind or "no content type"}', 415)

    def too_large() -> QueryError:
        return QueryError(f"the upload is over the limit of {limits.max_upload_bytes:,} bytes", 413)

    async def read_body(request: Request, limit: int) -> bytes:
        """The body, refused as soon as it is over `limit` (by its Content-Length or as it arrives)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large()
        return bytes(body)

    @app.get("/api/items/{row}/similar")
    async def similar(row: str, target: str | None = None, k: str | None = None) -> dict[str, Any]:
        """target=text: the captions nearest to the row's image code (cmhash search --image-of its id);
        target=image: the images nearest to its caption code (--text-of)."""
        if target not in OTHER:
            raise QueryError(f"target must be image or text (got {json.dumps(target)}): the modality of the results")
        number = row_number(row)
        if number is None:
            raise QueryError(f"no row {row!r}: a row is a whole number from 0 to {len(searcher.index.items) - 1}", 404)
        return await answerer.ask(searcher.row_query(number, OTHER[target], top(k)))

    @app.get("/api/items/{row}/image")
    async def item_image(row: str) -> Response:
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"}
        if path := images.path(row):
            return FileResponse(path, media_type=media_type(path.name), headers=headers)
        if member := await run_in_threadpool(images.member, row):  # an image inside a tar shard
            name, data = member
            return Response(data, media_type=media_type(name), headers=headers)
        raise HTTPException(404, f"no indexed image for row {row!r}")

    return app


def media_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


async def once(body: bytes) -> AsyncIterator[bytes]:
    """A body already read, as the stream a form parser reads."""
    yield body
