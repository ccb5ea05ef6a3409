"""Evaluate's paper-style MAP tables (Rich): one per protocol, and cmhash against the baselines."""

from __future__ import annotations

from typing import Any

from rich.table import Table

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


def best_baseline(baselines: dict[str, Any], bits: int) -> str | None:
    """The hashing baseline with the highest mean strict MAP (every direction and cut-off) at
    `bits`; None when none was scored at that length."""
    def mean(method: str) -> float:
        scores = [v for direction in baselines[method][str(bits)]["strict"].values() for v in direction.values()]
        return sum(scores) / len(scores)

    hashing = [m for m in baselines if str(bits) in baselines[m]]
    return max(hashing, key=mean) if hashing else None


def baseline_table(tables: dict[str, Any], bits: list[int], note: str | None) -> Table:
    """Strict protocol, per code length: cmhash, the best baseline, then the float CLIP reference
    and chance, so every MAP shown sits beside what training-free methods get."""
    baselines = tables["baselines"]
    metrics = list(tables[file_stem(bits[0])]["strict"]["i2t"])
    table = Table(title="MAP against training-free baselines, strict protocol")
    table.add_column("bits", no_wrap=True)
    table.add_column("method", no_wrap=True)
    for direction in DIRECTIONS:
        for metric in metrics:
            table.add_column(f"{direction} {metric.replace('map', 'MAP')}", justify="right", no_wrap=True, min_width=6)

    def cells(scores: dict[str, dict[str, float]]) -> list[str]:
        return [f"{scores[d][m]:.4f}" for d in DIRECTIONS for m in metrics]

    for b in bits:
        table.add_row(str(b), "cmhash", *cells(tables[file_stem(b)]["strict"]))
        if (best := best_baseline(baselines, b)) is not None:
            table.add_row("", f"{best} (best)", *cells(baselines[best][str(b)]["strict"]))
    table.add_section()
    if "clip_cosine" in baselines:
        table.add_row("-", "clip_cosine", *cells(baselines["clip_cosine"]["float"]["strict"]))
    table.add_row("", "chance", *cells(tables["chance"]["strict"]))
    table.caption = " ".join(filter(None, ["Every method ranks the same features; ties by database index.", note]))
    return table


def recall_table(recalls: dict[str, Any], bits: list[int], note: str | None) -> Table:
    """Recall@K of the paired item: cmhash per code length and protocol, the real-valued rows,
    then every baseline (strict), so an unlabelled collection's log shows its whole result."""
    metrics = list(recalls[str(bits[0])]["strict"]["i2t"])
    table = Table(title="Recall@K of the paired item (query split)")
    table.add_column("codes", no_wrap=True)
    table.add_column("protocol")
    for direction in DIRECTIONS:
        for metric in metrics:
            table.add_column(f"{direction} {metric.replace('recall', 'R')}", justify="right")

    def add(codes: str, per_protocol: dict[str, dict[str, dict[str, float]]]) -> None:
        for protocol, scores in per_protocol.items():
            table.add_row(codes, protocol, *(f"{scores[d][m]:.3f}" for d in DIRECTIONS for m in metrics))

    for b in bits:
        add(f"cmhash {b}", recalls[str(b)])
    table.add_section()
    add("real-valued", recalls["real_valued"])
    for method, lengths in recalls.get("baselines", {}).items():
        table.add_section()
        for length, per_protocol in lengths.items():
            add(method if length == "float" else f"{method} {length}", per_protocol)
    table.caption = " ".join(filter(None, ["An image hits if any of its captions is in the top K; ties by database index.", note]))
    return table
