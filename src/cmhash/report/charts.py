"""Vega-lite specs of the report's charts, built from RunResults: plain dicts, so the page, the
SVG files and DVC's templates draw the same data the same way."""

from __future__ import annotations

import json
from typing import Any

from cmhash.evaluation.tables import DIRECTIONS
from cmhash.report.inputs import RunResults

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"  # an identifier only: the renderers never fetch it
DIRECTION_TITLES = {"i2t": "image → text", "t2i": "text → image"}
PROTOCOLS = ("strict", "paired")
METRICS = {"map@50": "MAP@50", "map@all": "MAP@all"}

# The methods of the MAP-against-code-length chart, in legend order: (label, where its numbers are).
# A method scored once (float features, chance) is drawn flat across the code lengths.
CMHASH, TASK0, CHANCE = "cmhash", "cmhash task 0 (float, cosine)", "chance"
BASELINE_LABELS = {"lsh": "LSH", "pca_itq": "PCA-ITQ", "cca_itq": "CCA-ITQ", "clip_cosine": "float CLIP (cosine)"}
FLAT = {TASK0, CHANCE, BASELINE_LABELS["clip_cosine"]}


def subtitle(results: RunResults) -> list[str]:
    """What every MAP chart says under its title: random-init features are labelled as such."""
    features = (results.evaluate or {}).get("features", {})
    if features.get("random_init"):
        return [f"random-init CLIP ({features.get('clip_model')}) on {features.get('dataset')} data: these numbers test the pipeline, "
                "not the method"]
    return [f"CLIP {features.get('clip_model')} ({features.get('pretrained')}) on {features.get('dataset')}"] if features else []


def map_rows(results: RunResults) -> list[dict]:
    """{method, protocol, direction, metric, bits, map}: one row per point of the MAP chart."""
    table = results.map or {}
    bits_list = sorted(int(k) for k in table if k.isdigit())
    rows = []

    def add(method: str, protocol: str, scores: dict[str, dict[str, float]], at: list[int]) -> None:
        for direction in DIRECTIONS:
            for metric in METRICS:
                if metric in scores.get(direction, {}):
                    rows.extend({"method": method, "protocol": protocol, "direction": DIRECTION_TITLES[direction],
                                 "metric": METRICS[metric], "bits": b, "map": scores[direction][metric]} for b in at)

    for protocol in PROTOCOLS:
        for b in bits_list:
            add(CMHASH, protocol, table[str(b)].get(protocol, {}), [b])
        add(TASK0, protocol, table.get("real_valued", {}).get(protocol, {}), bits_list)
        add(CHANCE, protocol, table.get("chance", {}).get(protocol, {}), bits_list)
        for method, per_length in sorted(table.get("baselines", {}).items()):  # scored on the strict protocol only
            label = BASELINE_LABELS.get(method, method)
            for name, scores in per_length.items():
                add(label, protocol, scores.get(protocol, {}), bits_list if name == "float" else [int(name)])
    return rows


def _panels(**facet: str) -> dict[str, Any]:
    order = {"protocol": list(PROTOCOLS), "direction": list(DIRECTION_TITLES.values())}
    return {key: {"field": field, "type": "nominal", "title": None, "sort": order[field], "header": {"labelFontSize": 12}}
            for key, field in facet.items()}


def map_vs_bits(results: RunResults, metric: str) -> dict[str, Any]:
    """MAP (metric: "MAP@50" or "MAP@all") against code length, one line per method, one panel per
    protocol (rows) and direction (columns)."""
    rows = [r for r in map_rows(results) if r["metric"] == metric]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return {
        "$schema": SCHEMA,
        "title": {"text": f"{metric} against code length",
                  "subtitle": [*subtitle(results), "baselines are scored on the strict protocol only; dashed: no code length (float, chance)"]},
        "data": {"values": rows},
        "mark": {"type": "line", "point": True, "tooltip": True},
        "encoding": {
            "x": {"field": "bits", "type": "quantitative", "scale": {"type": "log", "base": 2}, "title": "code length (bits)",
                  "axis": {"values": sorted({r["bits"] for r in rows})}},
            "y": {"field": "map", "type": "quantitative", "title": metric, "scale": {"zero": False}},
            "color": {"field": "method", "type": "nominal", "sort": methods, "title": "method"},
            # dashed: the methods scored once and drawn flat (no code length)
            "strokeDash": {"condition": {"test": f"indexof({json.dumps(sorted(FLAT))}, datum.method) >= 0", "value": [4, 3]},
                           "value": [1, 0]},
            **_panels(row="protocol", column="direction"),
        },
        "width": 260, "height": 200,
    }


CURVES = {  # kind -> (title, x field, x title)
    "pr": ("precision–recall (Hamming radius 0..bits)", "recall", "recall"),
    "precision_at_n": ("precision@N", "n", "N (top of the Hamming ranking)"),
}


def curve_chart(results: RunResults, kind: str) -> dict[str, Any]:
    """One evaluate curve file per panel (protocol × direction), one line per code length."""
    title, x, x_title = CURVES[kind]
    rows = []
    for name, file_rows in sorted(results.curves.get(kind, {}).items()):
        protocol, direction = name.split("-", 1)
        rows += [{**r, "protocol": protocol, "direction": DIRECTION_TITLES.get(direction, direction)} for r in file_rows]
    return {
        "$schema": SCHEMA,
        "title": {"text": title, "subtitle": subtitle(results)},
        "data": {"values": rows},
        "mark": {"type": "line", "point": kind == "precision_at_n", "tooltip": True},
        "encoding": {
            "x": {"field": x, "type": "quantitative", "title": x_title, **({"scale": {"type": "log"}} if kind == "precision_at_n" else {})},
            "y": {"field": "precision", "type": "quantitative", "title": "precision"},
            "color": {"field": "bits", "type": "ordinal", "title": "bits", "scale": {"scheme": "viridis"}},
            "order": {"field": "radius" if kind == "pr" else "n", "type": "quantitative"},
            **_panels(row="protocol", column="direction"),
        },
        "width": 260, "height": 200,
    }


def training_chart(results: RunResults, task: str) -> dict[str, Any]:
    """Train and val curves of one task against the epoch, a rule at the epoch whose checkpoint was
    kept (best val MAP); task 1 has a column per code length."""
    rows = results.training.get(task, [])
    quantities = list(dict.fromkeys(r["quantity"] for r in rows))
    selected = [{"bits": s["bits"], "quantity": q, "series": "selected epoch", "epoch": s["epoch"]}
                for s in results.selected.get(task, []) for q in quantities]
    facet = {"row": {"field": "quantity", "type": "nominal", "title": None, "sort": quantities}}
    if task == "hash":
        facet["column"] = {"field": "bits", "type": "ordinal", "title": "code length (bits)"}
    return {
        "$schema": SCHEMA,
        "title": {"text": f"training: {'task 0 (fusion)' if task == 'fusion' else 'task 1 (hash)'}",
                  "subtitle": ["dashed rule: the epoch whose checkpoint was kept (best val MAP)"]},
        "data": {"values": rows + selected},
        "facet": facet,
        "spec": {
            "width": 190 if task == "hash" else 420, "height": 150,
            "layer": [
                {"transform": [{"filter": "datum.series != 'selected epoch'"}],
                 "mark": {"type": "line", "tooltip": True},
                 "encoding": {"x": {"field": "epoch", "type": "quantitative", "title": "epoch"},
                              "y": {"field": "value", "type": "quantitative", "title": None, "scale": {"zero": False},
                                    "axis": {"format": "~g"}},  # a learning rate of 1e-5 is not 0
                              "color": {"field": "series", "type": "nominal", "title": "curve"}}},
                {"transform": [{"filter": "datum.series == 'selected epoch'"}],
                 "mark": {"type": "rule", "strokeDash": [4, 3], "color": "black", "tooltip": True},
                 "encoding": {"x": {"field": "epoch", "type": "quantitative"}}},
            ],
        },
        "resolve": {"scale": {"y": "independent"}},
    }
