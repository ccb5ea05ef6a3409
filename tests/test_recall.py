"""Recall@K of the paired item against hand-computed cases: several captions per image (any caption
counts for an image query), ties broken by index (as MAP's ranking breaks them), K past the database,
the cosine ranking, and a plain-loop reference on random codes full of ties."""

from __future__ import annotations

import numpy as np
import pytest

from cmhash.errors import DataError
from cmhash.evaluation.recall import group_ids, paired_recall


def test_multiple_captions_and_ties_by_hand():
    # pairs: (image A, caption a1), (image A, caption a2), (image B, caption b1); 2-bit codes
    image = np.array([[1, 1], [1, 1], [-1, -1]])
    text = np.array([[-1, -1], [1, -1], [1, 1]])
    scores = paired_recall(image, text, group_ids(["A", "A", "B"], 3), [1, 2, 3, 10], "hamming")
    # i2t: A -> b1 (0), a2 (1), a1 (2): first caption of its own at rank 2. B -> a1 (0), a2 (1), b1 (2): rank 3.
    assert scores["i2t"] == {"recall@1": 0.0, "recall@2": 0.5, "recall@3": 1.0, "recall@10": 1.0}
    # t2i: a1 -> B (0), A (2): rank 2. a2 -> A and B both at 1: the tie goes to A (lower index): rank 1.
    # b1 -> A (0), B (2): rank 2.
    assert scores["t2i"] == {"recall@1": pytest.approx(1 / 3), "recall@2": 1.0, "recall@3": 1.0, "recall@10": 1.0}


def test_a_tie_goes_to_the_lower_index_even_when_that_is_the_wrong_item():
    # one caption per image; every code equal: each query ranks the database in index order
    codes = np.ones((4, 8))
    scores = paired_recall(codes, codes, group_ids(None, 4), [1, 2], "hamming")
    # query i's own item is at rank i + 1: R@1 = 1/4 (query 0), R@2 = 2/4
    assert scores["i2t"] == scores["t2i"] == {"recall@1": 0.25, "recall@2": 0.5}


def test_k_past_the_database_is_the_whole_database():
    codes = np.array([[1, -1], [-1, 1], [1, 1]])
    scores = paired_recall(codes, -codes, group_ids(None, 3), [3, 50], "hamming")
    assert scores["i2t"] == scores["t2i"] == {"recall@3": 1.0, "recall@50": 1.0}


def test_cosine_ranks_by_similarity():
    image = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = np.array([[0.9, 0.1], [1.0, 0.0], [0.5, 0.5]])  # caption 1 is nearer image 0 than image 1
    scores = paired_recall(image, text, group_ids(None, 3), [1, 2], "cosine")
    # i2t: image 0 -> caption 1 (cos 1), caption 0 (.99): rank 2. image 1 -> caption 2 (.71), caption 0 (.11), caption 1 (0): rank 3.
    # image 2 -> caption 2 (1): rank 1.
    assert scores["i2t"] == {"recall@1": pytest.approx(1 / 3), "recall@2": pytest.approx(2 / 3)}
    # t2i: caption 0 -> image 0 (.99): 1. caption 1 -> image 0 (1), image 2 (.71), image 1 (0): rank 3. caption 2 -> image 2 (1): 1.
    assert scores["t2i"] == {"recall@1": pytest.approx(2 / 3), "recall@2": pytest.approx(2 / 3)}


def loop_recall(image, text, groups, k):
    """Plain loops: distinct images in first-pair order; a stable sort by Hamming distance."""
    first = sorted({g: i for i, g in reversed(list(enumerate(groups)))}.values())
    def hits(queries, q_groups, db, d_groups):
        found = 0
        for q, g in zip(queries, q_groups):
            distance = [int(np.sum(q != d)) for d in db]
            order = sorted(range(len(db)), key=lambda j: distance[j])  # Python's sort is stable: ties by index
            found += any(d_groups[j] == g for j in order[:k])
        return found / len(queries)
    images, image_groups = image[first], [groups[i] for i in first]
    return hits(images, image_groups, text, groups), hits(text, groups, images, image_groups)


@pytest.mark.parametrize("seed", range(3))
def test_random_codes_full_of_ties_match_plain_loops(seed):
    rng = np.random.default_rng(seed)
    groups = list(rng.integers(0, 15, size=40))  # images with 0..several captions, out of order
    codes = lambda: np.where(rng.random((40, 4)) > 0.5, 1, -1)  # noqa: E731  (4 bits: many ties)
    image_of_group = {g: codes()[0] for g in set(groups)}
    image, text = np.stack([image_of_group[g] for g in groups]), codes()
    for k in (1, 3, 10, 100):
        scores = paired_recall(image, text, group_ids(groups, 40), [k], "hamming")
        i2t, t2i = loop_recall(image, text, groups, k)
        assert scores["i2t"][f"recall@{k}"] == pytest.approx(i2t) and scores["t2i"][f"recall@{k}"] == pytest.approx(t2i)


def test_group_ids_must_cover_every_pair():
    with pytest.raises(DataError, match="2 group ids for 3 pairs"):
        group_ids(["a", "b"], 3)
