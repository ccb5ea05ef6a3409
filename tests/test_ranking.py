"""MAP family against plain-loop references, hand-computed values and exact enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cmhash.errors import ConfigError, DataError
from cmhash.evaluation.ranking import chance_map, cosine_map, hamming_distances, mean_average_precision, tie_aware_map

# ------------------------------------------------------------ plain-loop reference


def ref_distances(query_codes, db_codes):
    return [[sum(1 for a, b in zip(q, r) if a != b) for r in db_codes] for q in query_codes]


def ref_relevance(query_labels, db_labels):
    return [[any(a > 0 and b > 0 for a, b in zip(q, r)) for r in db_labels] for q in query_labels]


def ref_ap(keys, relevant, k, tie_rank=None):
    """AP@k of one query walking the ranking by (key, tie_rank or index)."""
    tie_rank = tie_rank or list(range(len(keys)))
    order = sorted(range(len(keys)), key=lambda j: (keys[j], tie_rank[j]))
    hits, total = 0, 0.0
    for position, j in enumerate(order[: len(order) if k is None else k], start=1):
        if relevant[j]:
            hits += 1
            total += hits / position
    return total / hits if hits else 0.0


def ref_map(query_codes, db_codes, query_labels, db_labels, k):
    dist, rel = ref_distances(query_codes, db_codes), ref_relevance(query_labels, db_labels)
    return sum(ref_ap(d, r, k) for d, r in zip(dist, rel)) / len(dist)


def ref_tie_aware_map(query_codes, db_codes, query_labels, db_labels, k):
    """Average of AP@k over every tie-breaking order: all n! database permutations (each
    within-tie order appears equally often among them)."""
    dist, rel = ref_distances(query_codes, db_codes), ref_relevance(query_labels, db_labels)
    perms = list(itertools.permutations(range(len(db_codes))))
    return sum(sum(ref_ap(d, r, k, list(p)) for p in perms) / len(perms) for d, r in zip(dist, rel)) / len(dist)


def random_case(rng, n_query, n_db, bits, classes, density=0.3):
    return (rng.choice([-1, 1], (n_query, bits)).astype(np.int8), rng.choice([-1, 1], (n_db, bits)).astype(np.int8),
            (rng.random((n_query, classes)) < density).astype(np.uint8), (rng.random((n_db, classes)) < density).astype(np.uint8))


# ------------------------------------------------------------------- hand-computed


# 4-bit codes; query q = [+,+,+,+]. Database (distance = number of -1s):
#   item 0 [-,-,+,+] d=2 relevant      item 1 [+,+,+,+] d=0 irrelevant
#   item 2 [+,+,+,-] d=1 relevant      item 3 [-,+,+,+] d=1 irrelevant
#   item 4 [-,-,-,-] d=4 relevant
# Ranking by (distance, index): 1, 2, 3, 0, 4 -> relevance 0, 1, 0, 1, 1.
HAND_QUERY = np.array([[1, 1, 1, 1]])
HAND_DB = np.array([[-1, -1, 1, 1], [1, 1, 1, 1], [1, 1, 1, -1], [-1, 1, 1, 1], [-1, -1, -1, -1]])
HAND_QUERY_LABELS = np.array([[1, 0]])
HAND_DB_LABELS = np.array([[1, 1], [0, 1], [1, 0], [0, 0], [1, 0]])


def test_hand_computed_map():
    scores = mean_average_precision(HAND_QUERY, HAND_DB, HAND_QUERY_LABELS, HAND_DB_LABELS, topk=(1, 2, 4, 9, None))
    assert scores[1] == 0.0  # top 1 = item 1, irrelevant: R = 0 -> 0
    assert scores[2] == pytest.approx(1 / 2)  # hit at rank 2: (1/2) / 1
    assert scores[4] == pytest.approx((1 / 2 + 2 / 4) / 2)  # hits at ranks 2, 4 -> 0.5
    all_ranks = (1 / 2 + 2 / 4 + 3 / 5) / 3  # hits at ranks 2, 4, 5 -> 0.5333...
    assert scores[None] == pytest.approx(all_ranks)
    assert scores[9] == pytest.approx(all_ranks)  # K beyond the database = whole database


def test_hand_computed_tie_aware_map():
    # Tie groups by distance: d=0 {1: irrel}, d=1 {2: rel, 3: irrel}, d=2 {0: rel}, d=4 {4: rel}.
    # Only the d=1 pair can swap. Order A (2 before 3): relevance 0,1,0,1,1;
    # order B (3 before 2): 0,0,1,1,1.
    # MAP@all: A = (1/2 + 2/4 + 3/5)/3 = 0.53333, B = (1/3 + 2/4 + 3/5)/3 = 0.47778 -> mean 0.505556.
    # MAP@2 (boundary inside the d=1 group): A = (1/2)/1 = 0.5, B = no hit = 0 -> mean 0.25.
    # MAP@3 (group ends at 3): A = B = (1/2)/1 and (1/3)/1 -> mean (0.5 + 0.33333)/2 = 0.416667.
    scores = tie_aware_map(HAND_QUERY, HAND_DB, HAND_QUERY_LABELS, HAND_DB_LABELS, topk=(2, 3, None))
    assert scores[None] == pytest.approx(((1 / 2 + 2 / 4 + 3 / 5) / 3 + (1 / 3 + 2 / 4 + 3 / 5) / 3) / 2)
    assert scores[2] == pytest.approx(0.25)
    assert scores[3] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_hand_computed_chance_map():
    # Database of 2 items, 1 relevant, random order: relevant first (AP 1) or second (AP 1/2).
    # MAP@all = (1 + 1/2)/2 = 0.75; MAP@1 = P(relevant first) · 1 = 0.5.
    scores = chance_map(np.array([[1]]), np.array([[1], [0]]), topk=(1, None))
    assert scores[None] == pytest.approx(0.75)
    assert scores[1] == pytest.approx(0.5)
    # 3 items, 2 relevant, MAP@all: orders of (r, r, n) are equally likely placements of the
    # irrelevant item: at 3 -> 1; at 2 -> (1 + 2/3)/2 = 5/6; at 1 -> (1/2 + 2/3)/2 = 7/12.
    # Mean = (1 + 5/6 + 7/12)/3 = 29/36.
    assert chance_map(np.array([[1]]), np.array([[1], [1], [0]]), topk=(None,))[None] == pytest.approx(29 / 36)


def test_hamming_distances_match_inner_product_formula():
    rng = np.random.default_rng(0)
    query, db, _, _ = random_case(rng, 7, 11, 70, 1)  # 70 bits: two packed words
    distances = hamming_distances(query, db)
    assert distances.dtype == np.uint8
    np.testing.assert_array_equal(distances, (70 - query.astype(int) @ db.T.astype(int)) // 2)
    wide = np.ones((2, 300), np.int8)
    assert hamming_distances(wide, -wide).dtype == np.uint16
    assert hamming_distances(wide, -wide)[0, 0] == 300


# ------------------------------------------------------------- against the loop reference


def reference_cases():
    """Seeded cases covering the edge cases: ties everywhere, no relevant item, K > N, N = 1."""
    rng = np.random.default_rng(2024)
    cases = [random_case(rng, int(rng.integers(1, 8)), int(rng.integers(1, 60)), int(rng.integers(1, 12)),
                         int(rng.integers(1, 6))) for _ in range(40)]
    all_tied = random_case(rng, 4, 25, 8, 3)
    cases.append((all_tied[0], np.repeat(all_tied[0][:1], 25, axis=0), all_tied[2], all_tied[3]))
    no_relevant = random_case(rng, 5, 30, 6, 4)
    no_relevant[2][:2] = 0  # queries 0 and 1 have no label, so nothing is relevant to them
    cases.append(no_relevant)
    cases.append(random_case(rng, 6, 1, 5, 2, density=0.6))  # single-item database
    cases.append(random_case(rng, 3, 40, 1, 2))  # 1 bit: two huge tie groups
    cases.append(random_case(rng, 4, 30, 130, 70, density=0.02))  # several packed words each
    cases.append(random_case(rng, 3, 20, 300, 2))  # > 255 bits: 16-bit distances
    return cases


@pytest.mark.parametrize("case", reference_cases())
@pytest.mark.parametrize("topk", [(1, 3, 10, 45, 1000, None), (1, 3, 10)])  # whole sort / top-K-only path
def test_map_matches_plain_loop(case, topk):
    for chunk_size in (1, 3, None):
        scores = mean_average_precision(*case, topk=topk, chunk_size=chunk_size)
        for k in topk:
            assert scores[k] == pytest.approx(ref_map(*case, k), abs=1e-12), (chunk_size, k)


def test_query_without_relevant_items_scores_zero_and_counts():
    query, db, q_labels, db_labels = random_case(np.random.default_rng(1), 2, 20, 8, 3)
    q_labels[0] = 0
    db_labels[:] = 1
    alone = mean_average_precision(query[1:], db, q_labels[1:], db_labels, topk=(5, None))
    both = mean_average_precision(query, db, q_labels, db_labels, topk=(5, None))
    assert both == {k: pytest.approx(v / 2) for k, v in alone.items()}


def test_perfect_ranking_scores_one():
    # Query i has its own class i and code c_i; the database items of class i are copies of c_i
    # (distance 0) and everything else is a copy of another c_j (distance ~32 of 64 bits), so
    # every query sees all its relevant items first.
    rng = np.random.default_rng(3)
    query = rng.choice([-1, 1], (6, 64))
    owner = np.concatenate([np.arange(6), rng.integers(0, 6, 44)])
    db, q_labels, db_labels = query[owner], np.eye(6), np.eye(6)[owner]
    assert mean_average_precision(query, db, q_labels, db_labels, topk=(1, 5, None)) == {1: 1.0, 5: 1.0, None: 1.0}


def test_ties_are_broken_by_database_index():
    # Every item at distance 0; relevant items at indices 3 and 4 -> hits at ranks 4, 5.
    codes = np.ones((5, 3))
    db_labels = np.array([[0], [0], [0], [1], [1]])
    scores = mean_average_precision(codes[:1], codes, np.array([[1]]), db_labels, topk=(3, None))
    assert scores[3] == 0.0
    assert scores[None] == pytest.approx((1 / 4 + 2 / 5) / 2)


# ------------------------------------------------------------------------ tie-aware


def tiny_tie_cases():
    rng = np.random.default_rng(7)
    cases = [random_case(rng, 2, int(rng.integers(1, 7)), int(rng.integers(1, 4)), 3, density=0.4) for _ in range(10)]
    cases.append(random_case(rng, 2, 6, 1, 2, density=0.5))  # 1 bit: groups of ~3
    codes = random_case(rng, 2, 6, 2, 2)
    cases.append((codes[0], np.repeat(codes[0][:1], 6, axis=0), codes[2], codes[3]))  # all tied
    return cases


@pytest.mark.parametrize("case", tiny_tie_cases())
def test_tie_aware_map_equals_average_over_all_tie_orders(case):
    topk = (1, 2, 3, 4, 5, 6, None)
    scores = tie_aware_map(*case, topk=topk, chunk_size=1)
    for k in topk:
        assert scores[k] == pytest.approx(ref_tie_aware_map(*case, k), abs=1e-12), k


def test_tie_aware_equals_exact_map_without_ties():
    rng = np.random.default_rng(11)
    query = rng.choice([-1, 1], (3, 40))
    flips = rng.permutation(40)  # database item i differs from query 0 in exactly flips[i] bits
    db = np.array([np.concatenate([-query[0, :f], query[0, f:]]) for f in flips])
    _, _, q_labels, db_labels = random_case(rng, 3, 40, 1, 4, density=0.4)
    topk = (1, 7, 20, None)
    exact = mean_average_precision(query[:1], db, q_labels[:1], db_labels, topk=topk)
    assert tie_aware_map(query[:1], db, q_labels[:1], db_labels, topk=topk) == {k: pytest.approx(v, abs=1e-12) for k, v in exact.items()}


def test_tie_aware_map_at_scale_is_close_to_random_tie_breaking():
    """Larger groups than enumeration allows: average exact MAP over random relabelings of the
    database (which re-break ties at random) approaches the closed form."""
    rng = np.random.default_rng(5)
    query, db, q_labels, db_labels = random_case(rng, 3, 300, 4, 4)
    topk = (10, 100, None)
    expected = tie_aware_map(query, db, q_labels, db_labels, topk=topk)
    samples = []
    for _ in range(300):
        perm = rng.permutation(300)
        samples.append(mean_average_precision(query, db[perm], q_labels, db_labels[perm], topk=topk))
    for k in topk:
        values = np.array([s[k] for s in samples])
        # 6 standard errors: a false failure has probability ~1e-9.
        assert abs(values.mean() - expected[k]) <= 6 * values.std() / math.sqrt(len(values)) + 1e-12, k


# --------------------------------------------------------------------------- chance


def test_chance_map_matches_monte_carlo_of_random_rankings():
    rng = np.random.default_rng(9)
    _, _, q_labels, db_labels = random_case(rng, 4, 40, 1, 3, density=0.25)
    q_labels[0] = 0  # one query with nothing relevant: 0 under any ranking
    relevant = (q_labels.astype(int) @ db_labels.T.astype(int)) > 0
    samples = 20000
    order = np.argsort(rng.random((samples, 40)), axis=1)
    topk = (5, 17, None)
    expected = chance_map(q_labels, db_labels, topk=topk)
    for k in topk:
        depth = 40 if k is None else k
        per_sample = np.zeros(samples)
        for rel in relevant:
            ranked = rel[order][:, :depth]
            hits = np.cumsum(ranked, axis=1)
            sums = (ranked * hits / np.arange(1, depth + 1)).sum(axis=1)
            per_sample += np.divide(sums, hits[:, -1], out=np.zeros(samples), where=hits[:, -1] > 0)
        per_sample /= len(relevant)
        # 6 standard errors of the Monte Carlo mean.
        assert abs(per_sample.mean() - expected[k]) <= 6 * per_sample.std() / math.sqrt(samples), k


def test_chance_map_is_tie_aware_map_with_every_item_tied():
    query, db, q_labels, db_labels = random_case(np.random.default_rng(4), 5, 33, 16, 3)
    topk = (1, 8, 33, None)
    tied = tie_aware_map(query, np.repeat(query[:1], 33, axis=0), q_labels, db_labels, topk=topk)
    assert chance_map(q_labels, db_labels, topk=topk) == {k: pytest.approx(v, abs=1e-12) for k, v in tied.items()}


# --------------------------------------------------------------------------- cosine


def ref_cosine_map(query, db, query_labels, db_labels, k):
    rel = ref_relevance(query_labels, db_labels)
    total = 0.0
    for q, r in zip(query, rel):
        sims = [float(np.dot(q, x) / (np.linalg.norm(q) * np.linalg.norm(x))) for x in db]
        total += ref_ap([-s for s in sims], r, k)
    return total / len(query)


def test_cosine_map_matches_plain_loop_with_exact_ties():
    rng = np.random.default_rng(12)
    query = rng.normal(size=(4, 6))
    base = rng.normal(size=(10, 6))
    db = base[rng.integers(0, 10, 30)] * rng.choice([1.0, 4.0], (30, 1))  # duplicates tie (x4 is exact)
    _, _, q_labels, db_labels = random_case(rng, 4, 30, 1, 3)
    for topk, chunk_size in itertools.product([(1, 4, 12, None), (1, 4, 12)], (1, 3, None)):
        # BLAS rounds differently per chunk shape: ties must survive every chunk size.
        scores = cosine_map(query, db, q_labels, db_labels, topk=topk, chunk_size=chunk_size)
        for k in topk:
            assert scores[k] == pytest.approx(ref_cosine_map(query, db, q_labels, db_labels, k), abs=1e-12), (chunk_size, k)


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("args", "message"), [
    ((np.zeros((2, 4)), np.ones((3, 4)), np.ones((2, 1)), np.ones((3, 1))), "-1 and \\+1"),
    ((np.ones((2, 4)), np.ones((3, 8)), np.ones((2, 1)), np.ones((3, 1))), "dims per item"),
    ((np.ones((2, 4)), np.ones((3, 4)), np.ones((2, 1)), np.ones((4, 1))), "same items"),
    ((np.ones((2, 4)), np.ones((3, 4)), np.ones((2, 1)), np.ones((3, 2))), "classes"),
    ((np.ones((0, 4)), np.ones((3, 4)), np.ones((0, 1)), np.ones((3, 1))), "non-empty"),
])
def test_bad_input_raises_data_error(args, message):
    with pytest.raises(DataError, match=message):
        mean_average_precision(*args)


def test_bad_embeddings_and_cutoffs():
    good = (np.ones((2, 4)), np.ones((3, 4)), np.ones((2, 1)), np.ones((3, 1)))
    with pytest.raises(DataError, match="NaN"):
        cosine_map(np.full((2, 4), np.nan), *good[1:])
    with pytest.raises(DataError, match="all-zero"):
        cosine_map(np.zeros((2, 4)), *good[1:])
    for bad in ((0,), (2.5,), ()):
        with pytest.raises(ConfigError):
            mean_average_precision(*good, topk=bad)
    with pytest.raises(ConfigError, match="chunk_size"):
        tie_aware_map(*good, chunk_size=0)
    with pytest.raises(DataError, match="bits"):
        hamming_distances(np.ones((2, 4)), np.ones((2, 5)))
