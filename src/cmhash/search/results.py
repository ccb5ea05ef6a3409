"""`cmhash search`'s result list as a Rich table. User text (captions, paths, queries) is shown as
plain text, never parsed as Rich markup."""

from __future__ import annotations

from textwrap import shorten
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

SHOWN = {"image": "image", "text": "caption"}  # the item field a result of each modality shows
QUERY_ECHO_CHARS = 80


def search_table(found: dict[str, Any]) -> Table:
    (modality, query), = found["query"].items()
    shown = SHOWN[found["searched"]]
    notes = ["Hamming ties broken by database index (lower first)", *found.get("notes", [])]
    if found["clip"].get("random_init"):
        notes.append("random-init CLIP features: these results test the pipeline, not the method")
    echo = escape(repr(shorten(query, QUERY_ECHO_CHARS, placeholder=" …")))  # the query in full is in --json
    what = modality.replace("_", " ")  # "image_of": a query by an indexed item's image code
    table = Table(title=f"{found['searched']}s nearest to {what} {echo} ({found['bits']}-bit Hamming)", caption="; ".join(notes))
    with_labels = any(r.get("labels") for r in found["results"])
    with_shown = any(shown in r for r in found["results"])  # precomputed features have no image paths or captions
    columns = (("rank", "right"), ("distance", "right"), ("id", "left")) + (((shown, "left"),) if with_shown else ())
    for name, justify in columns + ((("labels", "left"),) if with_labels else ()):
        table.add_column(name, justify=justify, overflow="fold")  # a long path wraps whole, never cut to "…"
    for r in found["results"]:
        user_text = [r["id"], *([str(r.get(shown, ""))] if with_shown else []), *([", ".join(r.get("labels", []))] if with_labels else [])]
        table.add_row(str(r["rank"]), str(r["distance"]), *map(Text, user_text))
    return table
