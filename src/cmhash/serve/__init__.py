"""`cmhash serve`: search over HTTP, and a page to search from, with the index, its hash model and
its CLIP encoder loaded once (cmhash.search.engine.Searcher) instead of on every query.

limits.py    what a query may be: upload size, pixels, caption length, k; and the batching limits
batching.py  queries to the Searcher one at a time, or micro-batched (--batch, --batch-wait-ms)
files.py     which files GET /api/items/{row}/image may send
app.py       the FastAPI app: the API, the page, errors as 4xx JSON
command.py   the Typer command (binds the socket, loads the searcher, runs uvicorn)
static/      the page: plain HTML, CSS and JS, no build step, nothing fetched from elsewhere
"""
