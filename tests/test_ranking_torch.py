"""The torch Hamming MAP (the evaluate stage's GPU path) against the numpy one: same numbers,
same tie rule, same errors; on CPU tensors here, and on CUDA when there is one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmhash.errors import ConfigError, DataError
from cmhash.evaluation.ranking import mean_average_precision
from cmhash.evaluation.ranking_torch import mean_average_precision_torch
from cmhash.pipeline.evaluate import hamming_map

CPU = torch.device("cpu")


def random_case(rng, n_query, n_db, bits, classes, density):
    return (rng.choice([-1, 1], (n_query, bits)).astype(np.int8), rng.choice([-1, 1], (n_db, bits)).astype(np.int8),
            (rng.random((n_query, classes)) < density).astype(np.uint8), (rng.random((n_db, classes)) < density).astype(np.uint8))


def assert_same(case, topk, chunk_size=None, device=CPU):
    expected = mean_average_precision(*case, topk=topk)
    got = mean_average_precision_torch(*case, topk=topk, device=device, chunk_size=chunk_size)
    assert list(got) == list(expected)
    assert got == {k: pytest.approx(v, abs=1e-12) for k, v in expected.items()}


def test_ties_rank_by_database_index():
    # 1-bit codes: every item ties with every other; only the index order decides.
    query, db = np.array([[1]]), np.array([[1], [1], [1]])
    labels = np.array([[1]])
    late = mean_average_precision_torch(query, db, labels, np.array([[0], [0], [1]]), topk=(1, 2, None))
    early = mean_average_precision_torch(query, db, labels, np.array([[1], [0], [0]]), topk=(1, 2, None))
    assert late == {1: 0.0, 2: 0.0, None: pytest.approx(1 / 3)}
    assert early == {1: 1.0, 2: 1.0, None: 1.0}


def test_hand_computed():
    # query [+,+,+,+]; distances 2, 0, 1, 1 -> ranking 1, 2, 3, 0; relevant items 0 and 2 (ranks 4 and 2)
    query = np.array([[1, 1, 1, 1]])
    db = np.array([[-1, -1, 1, 1], [1, 1, 1, 1], [1, 1, 1, -1], [-1, 1, 1, 1]])
    scores = mean_average_precision_torch(query, db, np.array([[1, 0]]), np.array([[1, 0], [0, 1], [1, 1], [0, 0]]), topk=(1, 2, 4, 9, None))
    assert scores == {1: 0.0, 2: pytest.approx(1 / 2), 4: pytest.approx((1 / 2 + 2 / 4) / 2),
                      9: pytest.approx((1 / 2 + 2 / 4) / 2), None: pytest.approx((1 / 2 + 2 / 4) / 2)}


def test_edge_cases_match_numpy():
    rng = np.random.default_rng(0)
    one_item = random_case(rng, 5, 1, 8, 3, 0.5)
    assert_same(one_item, topk=(1, 50, None))  # K beyond a single-item database
    query, db, q_labels, db_labels = random_case(rng, 7, 30, 4, 2, 0.5)
    everything = (query, db, np.ones_like(q_labels), np.ones_like(db_labels))
    assert mean_average_precision_torch(*everything, topk=(3, 100, None)) == {3: 1.0, 100: 1.0, None: 1.0}
    nothing = (query, db, np.zeros_like(q_labels), np.ones_like(db_labels))
    assert mean_average_precision_torch(*nothing, topk=(3, None)) == {3: 0.0, None: 0.0}
    assert_same((query, db, np.abs(q_labels - 1), db_labels), topk=(1, 5, 30, None), chunk_size=2)  # some queries without relevant items


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_query=st.integers(1, 6), n_db=st.integers(1, 25), bits=st.sampled_from([1, 2, 3, 8, 16]),
       classes=st.integers(1, 3), density=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
       topk=st.lists(st.one_of(st.none(), st.integers(1, 40)), min_size=1, max_size=4, unique=True),
       chunk_size=st.one_of(st.none(), st.integers(1, 6)))
def test_matches_numpy_on_random_codes_with_ties(seed, n_query, n_db, bits, classes, density, topk, chunk_size):
    case = random_case(np.random.default_rng(seed), n_query, n_db, bits, classes, density)
    assert_same(case, topk=tuple(topk), chunk_size=chunk_size)


@pytest.mark.parametrize("bits", [4, 64, 130])
def test_matches_numpy_at_a_few_hundred_queries(bits):
    case = random_case(np.random.default_rng(bits), 300, 2000, bits, 6, 0.2)
    assert_same(case, topk=(1, 50, 1999, 2000, 5000, None), chunk_size=37)
    assert_same(case, topk=(50, None))  # default blocks


def test_same_input_checks_as_numpy():
    good = random_case(np.random.default_rng(1), 3, 5, 4, 2, 0.5)
    with pytest.raises(DataError, match="only -1 and \\+1"):
        mean_average_precision_torch(good[0] * 2, *good[1:])
    with pytest.raises(DataError, match="query has 4 dims per item but the database has 3"):
        mean_average_precision_torch(good[0], good[1][:, :3], *good[2:])
    with pytest.raises(DataError, match="db_labels has 4 rows"):
        mean_average_precision_torch(*good[:3], good[3][:4])
    with pytest.raises(ConfigError, match="cut-off K"):
        mean_average_precision_torch(*good, topk=(0,))


def test_evaluate_stage_picks_torch_on_cuda_only():
    assert hamming_map(CPU) is mean_average_precision  # the default pipeline's numbers come from numpy
    on_gpu = hamming_map(torch.device("cuda", 1))  # built without touching CUDA
    assert on_gpu.func is mean_average_precision_torch and on_gpu.keywords == {"device": torch.device("cuda", 1)}


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 64])
def test_matches_numpy_on_cuda(bits):
    case = random_case(np.random.default_rng(bits), 500, 20000, bits, 20, 0.1)
    assert_same(case, topk=(1, 50, 1000, None), device=torch.device("cuda"))
    assert_same(case, topk=(50, None), chunk_size=7, device=torch.device("cuda"))
