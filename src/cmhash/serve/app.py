"""The HTTP API and the page, over one loaded Searcher.

    GET  /                          the search page (static/index.html)
    GET  /healthz                   {"status": "ok"}
    GET  /api/info                  the index, code length, modalities, models, limits; a notice for random-init CLIP
    GET  /api/search?text=…&k=10    the images nearest to a caption
    POST /api/search                JSON {"text": …, "k": …}, or a multipart form with an `image` file (and `k`)
    GET  /api/items/{row}/image     an indexed image (cmhash.serve.files decides which)

A search answers exactly what `cmhash search --json` prints. A bad query is a 4xx JSON
{"error": "…"} and the server goes on. Encoding runs in a worker thread (the event loop keeps
answering), one query at a time through the models (the Searcher's lock).
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from cmhash.errors import CmhashError
from cmhash.search.engine import Searcher
from cmhash.search.queries import QueryError, check_text, check_top, read_image
from cmhash.serve.files import IndexedImages
from cmhash.serve.limits import Limits

STATIC = Path(__file__).parent / "static"
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, headers and a `k` field around the file
# The page may load its own script, style and images (and the picture dropped on it), nothing else.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(searcher: Searcher, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    images = IndexedImages(searcher.index.items, searcher.index.meta["source"])
    # No /docs or /redoc: their pages load scripts from a CDN. The schema stays, at /api/openapi.json.
    app = FastAPI(title="cmhash", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(CmhashError)
    async def user_error(request: Request, exc: CmhashError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status if isinstance(exc, QueryError) else 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail).lower()}, status_code=exc.status_code, headers=exc.headers)

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
        return {**searcher.info(), "limits": asdict(limits)}

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
        return await run_in_threadpool(searcher.search_text, text, top(k))

    def search_upload(data: bytes, name: str, k: int) -> dict[str, Any]:
        return searcher.search_image(read_image(data, name, limits.max_pixels), name, k)

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
            return await run_in_threadpool(search_upload, data, name, top(form.get("k", request.query_params.get("k"))))
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

    @app.get("/api/items/{row}/image")
    async def item_image(row: str) -> FileResponse:
        path = images.path(row)
        if path is None:
            raise HTTPException(404, f"no indexed image for row {row!r}")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"})

    return app


async def once(body: bytes) -> AsyncIterator[bytes]:
    """A body already read, as the stream a form parser reads."""
    yield body
