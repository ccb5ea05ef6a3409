"""PR over Hamming radius and precision@N against plain loops and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from cmhash.errors import ConfigError
from cmhash.evaluation import pr_curve, precision_at_n

from test_ranking import HAND_DB, HAND_DB_LABELS, HAND_QUERY, HAND_QUERY_LABELS, random_case, ref_distances, ref_relevance


def ref_pr_curve(query_codes, db_codes, query_labels, db_labels):
    bits = len(query_codes[0])
    dist, rel = ref_distances(query_codes, db_codes), ref_relevance(query_labels, db_labels)
    precision, recall = [0.0] * (bits + 1), [0.0] * (bits + 1)
    for d, r in zip(dist, rel):
        for radius in range(bits + 1):
            retrieved = [j for j in range(len(d)) if d[j] <= radius]
            found = sum(r[j] for j in retrieved)
            precision[radius] += found / len(retrieved) if retrieved else 0.0
            recall[radius] += found / sum(r) if sum(r) else 0.0
    return np.array(precision) / len(dist), np.array(recall) / len(dist)


def ref_precision_at_n(query_codes, db_codes, query_labels, db_labels, ns):
    dist, rel = ref_distances(query_codes, db_codes), ref_relevance(query_labels, db_labels)
    result = []
    for n in ns:
        total = 0.0
        for d, r in zip(dist, rel):
            top = sorted(range(len(d)), key=lambda j: (d[j], j))[:n]
            total += sum(r[j] for j in top) / len(top)
        result.append(total / len(dist))
    return np.array(result)


def test_hand_computed_pr_curve():
    # Distances to the query [2, 0, 1, 1, 4], relevance [1, 0, 1, 0, 1] (3 relevant).
    # r=0: {1} -> P 0/1, R 0/3;  r=1: {1,2,3} -> P 1/3, R 1/3;  r=2,3: {0,1,2,3} -> P 2/4, R 2/3;
    # r=4: all -> P 3/5, R 3/3.
    precision, recall = pr_curve(HAND_QUERY, HAND_DB, HAND_QUERY_LABELS, HAND_DB_LABELS)
    np.testing.assert_allclose(precision, [0, 1 / 3, 2 / 4, 2 / 4, 3 / 5])
    np.testing.assert_allclose(recall, [0, 1 / 3, 2 / 3, 2 / 3, 1])


def test_hand_computed_precision_at_n():
    # Ranking by (distance, index): items 1, 2, 3, 0, 4 -> relevance 0, 1, 0, 1, 1.
    # P@1 = 0, P@2 = 1/2, P@3 = 1/3, P@4 = 2/4; P@10 covers the whole database: 3/5.
    got = precision_at_n(HAND_QUERY, HAND_DB, HAND_QUERY_LABELS, HAND_DB_LABELS, ns=(1, 2, 3, 4, 10))
    np.testing.assert_allclose(got, [0, 1 / 2, 1 / 3, 2 / 4, 3 / 5])


def test_empty_lookup_scores_zero_precision():
    # The database sits at distance 2 from the query: radii 0 and 1 retrieve nothing.
    precision, recall = pr_curve(np.ones((1, 2)), -np.ones((3, 2)), np.ones((1, 1)), np.ones((3, 1)))
    np.testing.assert_array_equal(precision, [0, 0, 1])
    np.testing.assert_array_equal(recall, [0, 0, 1])


def curve_cases():
    rng = np.random.default_rng(31)
    cases = [random_case(rng, int(rng.integers(1, 7)), int(rng.integers(1, 50)), int(rng.integers(1, 10)),
                         int(rng.integers(1, 5))) for _ in range(25)]
    no_relevant = random_case(rng, 4, 20, 6, 3)
    no_relevant[2][0] = 0
    cases.append(no_relevant)
    return cases


@pytest.mark.parametrize("case", curve_cases())
def test_curves_match_plain_loops(case):
    expected_precision, expected_recall = ref_pr_curve(*case)
    for chunk_size in (1, 4, None):
        precision, recall = pr_curve(*case, chunk_size=chunk_size)
        np.testing.assert_allclose(precision, expected_precision, atol=1e-12)
        np.testing.assert_allclose(recall, expected_recall, atol=1e-12)
        for ns in ((1, 5, 17, 49, 1000), (1, 5, 17)):  # whole sort / top-N-only path
            got = precision_at_n(*case, ns=ns, chunk_size=chunk_size)
            np.testing.assert_allclose(got, ref_precision_at_n(*case, ns), atol=1e-12)


def test_precision_at_n_keeps_the_order_of_ns():
    case = random_case(np.random.default_rng(2), 3, 30, 8, 3)
    forward = precision_at_n(*case, ns=(3, 10, 3))
    assert forward[0] == forward[2]
    np.testing.assert_allclose(precision_at_n(*case, ns=(10,)), forward[1:2])
    with pytest.raises(ConfigError):
        precision_at_n(*case, ns=(0,))
