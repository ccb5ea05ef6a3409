"""Recall@K of the paired item: the measure for collections without labels (and reported beside
MAP for those with them). Definitions (docs/evaluation.md, Recall@K):

- the items of one split are (image, caption) pairs; `groups` says which image each caption
  belongs to (one group per image; a group of one for a collection with one caption per image);
- image -> text: each distinct image (its group's first pair) queries every caption of the split;
  a hit if ANY of its captions is in the top K (CLIP_benchmark's rule, e.g. COCO's five captions);
- text -> image: each caption queries the distinct images; a hit if its own image is in the top K;
- the ranking is MAP's (cmhash.evaluation.ranking): ascending Hamming distance or descending
  cosine, ties by database index; K past the database is the whole database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from cmhash.errors import DataError
from cmhash.evaluation.ranking import cosine_keys, cutoffs, hamming_keys, ranked_relevance

Keys = Callable[[np.ndarray, np.ndarray], Iterator[tuple[slice, np.ndarray]]]
KEYS: dict[str, Keys] = {"hamming": hamming_keys, "cosine": cosine_keys}


def recall_at(keys: Iterator[tuple[slice, np.ndarray]], query_groups: np.ndarray, db_groups: np.ndarray,
              ks: Sequence[int]) -> dict[int, float]:
    """{K: fraction of queries with an item of their own group in the top K} from ranking-key
    blocks (ranking.hamming_keys / cosine_keys)."""
    depth_of = cutoffs(ks, len(db_groups))
    depths = np.array(list(depth_of.values()))
    hits = np.zeros(len(depths))
    for chunk, key in keys:
        relevant = query_groups[chunk, None] == db_groups[None, :]
        found = np.cumsum(ranked_relevance(key, relevant, int(depths.max())), axis=1) > 0
        hits += found[:, depths - 1].sum(axis=0)
    return {k: float(v) for k, v in zip(depth_of, hits / len(query_groups))}


def group_ids(groups: Sequence | None, n: int) -> np.ndarray:
    """Integer group ids of n pairs (any hashable per pair); None: every pair its own image."""
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise DataError(f"{len(groups)} group ids for {n} pairs: one per pair (the image each caption belongs to)")
    return np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)


def paired_recall(image: np.ndarray, text: np.ndarray, groups: np.ndarray, ks: Sequence[int],
                  score: str) -> dict[str, dict[str, float]]:
    """{"i2t": {"recall@K": ...}, "t2i": {...}} of one split's encoded pairs (codes for
    score="hamming", embeddings for "cosine"); `groups` from group_ids."""
    _, first = np.unique(groups, return_index=True)
    first = np.sort(first)  # each image once, at its first pair, in pair order
    keys = KEYS[score]
    named = lambda scores: {f"recall@{k}": v for k, v in scores.items()}  # noqa: E731
    return {"i2t": named(recall_at(keys(image[first], text), groups[first], groups, ks)),
            "t2i": named(recall_at(keys(text, image[first]), groups, groups[first], ks))}
