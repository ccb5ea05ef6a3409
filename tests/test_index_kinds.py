"""The index kinds of `search.index`: with exhaustive knobs every kind gives exactly the flat
index's answer (a NumPy scan with ties by row); otherwise its answers are still ranked by exact
distance and row; bad knobs are one line; index files keep their kind and knobs."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from cmhash.config.choices.indexes import INDEXES, HnswKnobs, IvfKnobs
from cmhash.config.schema import parse_params
from cmhash.errors import ConfigError
from cmhash.search.index import CodeIndex, FaissFiles, binary_index, hamming_topk, index_kind
from cmhash.search.kinds import Hnsw, Ivf


def numpy_topk(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every distance by XOR + popcount, then a stable sort: ties by row."""
    dist = np.bitwise_count(db[None, :, :] ^ queries[:, None, :]).sum(axis=2)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), order


def codes(n: int, nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, nbytes), dtype=np.uint8)


def exhaustive(n: int) -> list:
    return [Ivf(IvfKnobs(nlist=16, nprobe=16, train_sample=n), rerank=2, seed=3),
            Hnsw(HnswKnobs(m=16, ef_search=4 * n, ef_construction=64), rerank=2)]


@pytest.mark.parametrize("nbytes", [2, 8])  # 16 bits: heavy ties at every k; 64 bits: few
@pytest.mark.parametrize("k", [1, 10, 40])
def test_exhaustive_knobs_give_flat_results(nbytes, k):
    db, queries = codes(700, nbytes, 0), codes(30, nbytes, 1)
    want = numpy_topk(db, queries, k)
    flat = hamming_topk(binary_index(db), queries, k)
    built = [(kind, kind.build(db)) for kind in exhaustive(len(db))]
    # exhaustive: HNSW's walk with ef_search past the collection reaches every code (m = 8 here leaves one unreached)
    assert (built[1][1].search(queries, len(db))[1] >= 0).all()
    for got in [flat] + [kind.topk(index, queries, k) for kind, index in built]:
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("kind", [Ivf(IvfKnobs(nlist=32, nprobe=2, train_sample=500), rerank=3, seed=0),
                                  Hnsw(HnswKnobs(m=4, ef_search=8, ef_construction=8), rerank=1)])
def test_approximate_answers_are_ranked_by_exact_distance_then_row(kind):
    db, queries = codes(2000, 2, 5), codes(40, 2, 6)
    dist, rows = kind.topk(kind.build(db), queries, 10)
    for q in range(len(queries)):
        found = rows[q] >= 0
        r, d = rows[q][found], dist[q][found]
        assert len(set(r.tolist())) == len(r)
        np.testing.assert_array_equal(d, np.bitwise_count(db[r] ^ queries[q]).sum(axis=1))
        assert all((d[i], r[i]) < (d[i + 1], r[i + 1]) for i in range(len(r) - 1))


def test_ivf_training_sample_is_seeded():
    db = codes(3000, 8, 2)
    built = [Ivf(IvfKnobs(nlist=8, nprobe=1, train_sample=400), seed=s).build(db) for s in (1, 1, 2)]
    lists = [[ix.invlists.list_size(i) for i in range(8)] for ix in built]
    assert lists[0] == lists[1] and lists[0] != lists[2]


def search_params(**knobs) -> dict:
    return {"search": {"index": "ivf", "ivf": knobs}}


@pytest.mark.parametrize(("raw", "says"), [
    (search_params(nprobe=0), "search.ivf.nprobe = 0: input should be greater than or equal to 1"),
    (search_params(nlist=8, nprobe=16), "nprobe = 16 is more than nlist = 8; use at most nlist"),
    (search_params(nlist=64, train_sample=10), "train_sample = 10 is less than nlist = 64"),
    ({"search": {"index": "annoy"}}, "search.index = 'annoy': unknown index 'annoy'; choose one of: flat, hnsw, ivf"),
    ({"search": {"hnsw": {"ef_search": 0}}}, "search.hnsw.ef_search = 0"),
])
def test_bad_knobs_are_one_line(raw, says):
    with pytest.raises(ConfigError) as err:
        parse_params(raw, where="params.yaml")
    assert "\n" not in str(err.value) and says in str(err.value), str(err.value)


def test_nlist_past_the_collection_is_one_line():
    with pytest.raises(ConfigError, match=r"^search.ivf.nlist = 64 is more than the collection's 50 codes; use at most 50$"):
        Ivf(IvfKnobs(nlist=64, nprobe=4, train_sample=100)).build(codes(50, 8, 0))


def test_bad_knobs_stop_cmhash_index_with_one_line(invoke, params, params_file):
    import yaml

    params["search"]["ivf"]["nprobe"] = 0
    params_file.write_text(yaml.safe_dump(params))
    result = invoke("index", "--params", params_file, "--split", "retrieval")
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: ") and line.endswith("params.yaml: search.ivf.nprobe = 0: input should be greater than or equal to 1"), line


@pytest.mark.parametrize("kind", exhaustive(300)[:1] + [Hnsw(HnswKnobs(m=8, ef_search=32), rerank=3)])
def test_index_files_keep_their_kind_and_knobs(tmp_path, kind):
    packed = {"image": codes(300, 8, 0), "text": codes(300, 8, 1)}
    items = [{"id": str(i)} for i in range(300)]
    CodeIndex.save(tmp_path / "ix", {"bits": 64}, items, packed, FaissFiles(kind))
    back = CodeIndex.load(tmp_path / "ix")
    assert back.meta["backend"]["index"] == kind.record == {"kind": kind.name, "knobs": kind.knobs.model_dump(),
                                                            "rerank": kind.rerank, "seed": kind.seed}
    assert type(back.kind) is type(kind) and back.kind.knobs == kind.knobs
    want = {"ivf": faiss.IndexBinaryIVF, "hnsw": faiss.IndexBinaryHNSW}[kind.name]
    queries = codes(5, 8, 9)
    for modality, db in packed.items():
        assert isinstance(back.codes[modality], want)
        np.testing.assert_array_equal(back.codes[modality].reconstruct(7), db[7])  # an item query's own code
        fresh = kind.topk(kind.build(db), queries, 10)
        for got, expected in zip(back.topk(modality, queries, 10), fresh):
            np.testing.assert_array_equal(got, expected)
    if kind.name == "ivf":
        assert back.codes["image"].nprobe == kind.knobs.nprobe


def test_an_index_without_a_kind_is_flat(tmp_path):
    assert index_kind(None).record["kind"] == "flat"
    assert sorted(INDEXES.names()) == ["flat", "hnsw", "ivf"]
