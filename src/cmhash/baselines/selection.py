"""Model selection for the baselines on the validation protocol: val pairs as queries against the
train pairs as the database, strict cross-modal (image -> text and text -> image), MAP@K averaged
over the two directions - how training selects its epoch. A collection without labels is selected
on val Recall@K of the paired item (val images against val captions), as training selects it.
The query split is never an input here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmhash.baselines.methods import METHODS
from cmhash.evaluation.ranking import Cutoff, cosine_map, mean_average_precision
from cmhash.evaluation.recall import group_ids, paired_recall


def cross_modal_map(fitted: object, query_image: object, query_text: object, query_label: object,
                    db_image: object, db_text: object, db_label: object, topk: Sequence[Cutoff] = (50, None)) -> dict[str, dict]:
    """{"i2t": {K: MAP}, "t2i": {K: MAP}} of a fitted method: image queries against the text
    database and text queries against the image database (Hamming, or cosine when not binary)."""
    if fitted.binary:
        encode_image, encode_text, score = fitted.image_codes, fitted.text_codes, mean_average_precision
    else:
        encode_image, encode_text, score = fitted.embed_image, fitted.embed_text, cosine_map
    return {"i2t": score(encode_image(query_image), encode_text(db_text), query_label, db_label, topk=topk),
            "t2i": score(encode_text(query_text), encode_image(db_image), query_label, db_label, topk=topk)}


def candidates(knobs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the list-valued knobs (candidates), the others fixed, in list order."""
    grid = {name: value if isinstance(value, list) else [value] for name, value in knobs.items()}
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


@dataclass
class Selected:
    fitted: Any
    knobs: dict[str, Any]  # the chosen combination
    table: list[dict[str, Any]]  # every combination with its val score: {"knobs", "i2t", "t2i", metric}
    metric: str = "map"  # "map", or "recall" for a collection without labels


def paired_val_recall(fitted: object, image: np.ndarray, text: np.ndarray, groups: Sequence | None, k: int) -> dict[str, dict]:
    """{"i2t": {k: R@k}, "t2i": {k: R@k}} of a fitted method within one split."""
    if fitted.binary:
        image, text, kind = fitted.image_codes(image), fitted.text_codes(text), "hamming"
    else:
        image, text, kind = fitted.embed_image(image), fitted.embed_text(text), "cosine"
    scores = paired_recall(image, text, group_ids(groups, len(image)), [k], kind)
    return {direction: {k: s[f"recall@{k}"]} for direction, s in scores.items()}


def select_on_val(method: str, knobs: dict[str, Any], train: Sequence[np.ndarray], val: Sequence[np.ndarray], bits: int,
                  seed: int, topk: int = 50, val_groups: Sequence | None = None) -> Selected:
    """Fit `method` on train for every candidate combination of `knobs` and keep the one with the
    best val MAP@topk (Recall@topk without labels); ties go to the first in list order.
    train, val: (image, text, label); val_groups: the image of each val caption (None: one each)."""
    (train_image, train_text, train_label), (val_image, val_text, val_label) = train, val
    metric = "map" if val_label.shape[1] else "recall"
    table, fits = [], []
    for combo in candidates(knobs):
        fitted = METHODS[method].fit(train_image, train_text, bits, seed, **combo)
        if metric == "map":
            scores = cross_modal_map(fitted, val_image, val_text, val_label, train_image, train_text, train_label, topk=[topk])
        else:
            scores = paired_val_recall(fitted, val_image, val_text, val_groups, topk)
        i2t, t2i = scores["i2t"][topk], scores["t2i"][topk]
        table.append({"knobs": combo, "i2t": i2t, "t2i": t2i, metric: (i2t + t2i) / 2})
        fits.append(fitted)
    best = int(np.argmax([row[metric] for row in table]))  # argmax returns the first maximum
    return Selected(fits[best], table[best]["knobs"], table, metric)
