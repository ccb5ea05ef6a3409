"""Rich tables of results: evaluate's paper-style MAP tables and search's result list. User text
(captions, paths, queries) is shown as plain text, never parsed as Rich markup."""

from __future__ import annotations

from textwrap import shorten
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

# direction -> (query side, database side), as evaluate names its encoded sets
DIRECTIONS = {"i2t": ("query_image", "retrieval_text"), "t2i": ("query_text", "retrieval_image")}
MapTable = dict[str, dict[str, dict[str, float]]]  # protocol -> direction -> metric -> value


def file_stem(bits: int) -> str:
    """Zero-padded, so files (and the rows `dvc metrics show` makes of them) sort by code length."""
    return f"{bits:03d}"


PROTOCOL_TITLES = {"strict": "strict protocol (each modality alone)", "paired": "paired protocol (whole pair, as the reference)"}


def paper_tables(tables: dict[str, MapTable], bits: list[int], note: str | None) -> list[Table]:
    """One table per protocol (narrow enough for an 80-column log): rows are code lengths, then
    the real-valued and chance rows; columns are direction x MAP@K."""
    protocols = list(tables[file_stem(bits[0])])
    metrics = list(tables[file_stem(bits[0])][protocols[0]]["i2t"])
    rows = [(str(b), file_stem(b)) for b in bits] + [("real-valued", "real_valued"), ("chance", "chance")]
    result = []
    for protocol in protocols:
        table = Table(title=f"MAP, {PROTOCOL_TITLES[protocol]}")
        table.add_column("bits", no_wrap=True)
        for direction in DIRECTIONS:
            for metric in metrics:
                table.add_column(f"{direction} {metric.replace('map', 'MAP')}", justify="right", no_wrap=True, min_width=6)
        for label, key in rows:
            if key == "real_valued":
                table.add_section()
            table.add_row(label, *(f"{tables[key][protocol][d][m]:.4f}" for d in DIRECTIONS for m in metrics))
        result.append(table)
    result[-1].caption = " ".join(filter(None, ["Hamming ties broken by database index.", note]))
    return result


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
    with_shown = any(shown in r for r in found["results"])  # imported features have no image paths or captions
    columns = (("rank", "right"), ("distance", "right"), ("id", "left")) + (((shown, "left"),) if with_shown else ())
    for name, justify in columns + ((("labels", "left"),) if with_labels else ()):
        table.add_column(name, justify=justify, overflow="fold")  # a long path wraps whole, never cut to "…"
    for r in found["results"]:
        user_text = [r["id"], *([str(r.get(shown, ""))] if with_shown else []), *([", ".join(r.get("labels", []))] if with_labels else [])]
        table.add_row(str(r["rank"]), str(r["distance"]), *map(Text, user_text))
    return table
