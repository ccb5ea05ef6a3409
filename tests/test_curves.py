"""PR over Hamming radius and precision@N against plain loops and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from cmhash.config.schema import parse_params
from cmhash.errors import ConfigError
from cmhash.evaluation.curves import pr_curve, precision_at_n
from cmhash.pipeline.evaluate import curve_rows, replace_dir
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


@pytest.mark.parametrize("seed", range(5))
def test_curves_end_at_the_whole_database(seed):
    # Radius = bits and N = database size both retrieve everything: precision is the fraction
    # of relevant items, recall is 1 for every query with something relevant (0 otherwise).
    q, db, q_labels, db_labels = random_case(np.random.default_rng(seed), 6, 40, 12, 3)
    relevant = (q_labels @ db_labels.T) > 0
    precision, recall = pr_curve(q, db, q_labels, db_labels)
    assert precision[-1] == pytest.approx(relevant.mean())
    assert recall[-1] == pytest.approx(relevant.any(axis=1).mean())
    assert precision_at_n(q, db, q_labels, db_labels, ns=(40,))[0] == pytest.approx(relevant.mean())
    assert np.all(np.diff(recall) >= 0)  # a bigger radius never loses an item


def test_evaluate_curve_rows_tag_each_row_with_its_code_length():
    q, db, q_labels, db_labels = random_case(np.random.default_rng(5), 4, 30, 8, 3)
    rows = curve_rows(8, q, db, q_labels, db_labels, ns=[1, 10, 30])
    precision, recall = pr_curve(q, db, q_labels, db_labels)
    assert [r["radius"] for r in rows["pr"]] == list(range(9)) and {r["bits"] for r in rows["pr"]} == {8}
    assert [r["precision"] for r in rows["pr"]] == pytest.approx(precision)
    assert [r["recall"] for r in rows["pr"]] == pytest.approx(recall)
    assert [(r["bits"], r["n"]) for r in rows["precision_at_n"]] == [(8, 1), (8, 10), (8, 30)]


def test_evaluate_replaces_a_whole_directory(tmp_path):
    # A rerun with fewer code lengths must not leave the old ones' files behind for DVC to plot.
    target = tmp_path / "curves"
    replace_dir(target, {"pr/016.json": [1], "pr/128.json": [2]})
    replace_dir(target, {"pr/016.json": [3]})
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["pr", "pr/016.json"]
    assert list(tmp_path.iterdir()) == [target]  # no temporary directory left


@pytest.mark.parametrize(("value", "fragment"), [
    ([], "evaluate.precision_at = []"),
    ([0, 5], "evaluate.precision_at[0] = 0"),
    ([5.5], "evaluate.precision_at[0] = 5.5"),
    ("10", "evaluate.precision_at = '10'"),
    ([True], "evaluate.precision_at[0] = True"),
])
def test_evaluate_rejects_bad_precision_at(value, fragment):
    with pytest.raises(ConfigError) as err:
        parse_params({"evaluate": {"precision_at": value}})
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert parse_params({"evaluate": {"precision_at": [1, 1000]}}).evaluate.precision_at == [1, 1000]
