"""The index kinds (params.yaml `search.index`, registered in cmhash.config.choices.indexes): how
one modality's packed codes are held in FAISS and searched.

flat   faiss.IndexBinaryFlat, every code compared: exact, ties by row (hamming_topk)
ivf    faiss.IndexBinaryIVF: k-means lists trained on a seeded sample, nprobe lists searched
hnsw   faiss.IndexBinaryHNSW: a graph walked with a candidate list of ef_search

The approximate kinds ask their index for k x rerank candidates; FAISS's binary indexes give the
exact Hamming distance of each, and hamming_topk ranks them by (distance, row) as flat does. Where
the candidates end tied with the k-th, ivf range-searches its probed lists (as flat range-searches
everything) and hnsw asks again for twice as many, so an exhaustive setting (nprobe = nlist, an
ef_search past the collection) gives exactly flat's answer.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from cmhash.config.fields import Section
from cmhash.errors import ConfigError
from cmhash.search.index import BinaryCodes, binary_index, hamming_topk


class Flat:
    name = "flat"

    def __init__(self, knobs: Section | None = None, rerank: int = 1, seed: int = 0) -> None:
        self.knobs, self.rerank, self.seed = knobs or Section(), rerank, seed

    @property
    def record(self) -> dict[str, Any]:
        """What index.json keeps (`index`): the kind and every knob it was built and is searched with."""
        return {"kind": self.name, "knobs": self.knobs.model_dump(), "rerank": self.rerank, "seed": self.seed}

    def build(self, packed: np.ndarray) -> faiss.IndexBinary:
        return binary_index(packed)

    def opened(self, index: faiss.IndexBinary) -> faiss.IndexBinary:
        """A read-back index with its search knobs set."""
        return index

    def topk(self, index: BinaryCodes, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return hamming_topk(index, queries, k)


class Ivf(Flat):
    name = "ivf"

    def build(self, packed: np.ndarray) -> faiss.IndexBinary:
        n, bits = len(packed), packed.shape[1] * 8
        if self.knobs.nlist > n:
            raise ConfigError(f"search.ivf.nlist = {self.knobs.nlist} is more than the collection's {n:,} codes; use at most {n:,}")
        rng = np.random.default_rng(self.seed)
        sample = np.sort(rng.choice(n, min(n, self.knobs.train_sample), replace=False))
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, self.knobs.nlist)
        index.cp.seed = self.seed  # k-means' own draws
        index.cp.verbose = False
        index.train(np.ascontiguousarray(packed[sample]))
        index.add(np.ascontiguousarray(packed))
        return self.opened(index)

    def opened(self, index: faiss.IndexBinary) -> faiss.IndexBinary:
        index.nprobe = self.knobs.nprobe
        index.make_direct_map()  # reconstruct(row): an item's own code, for item queries
        return index

    def topk(self, index: BinaryCodes, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return hamming_topk(index, queries, k, wide=k * self.rerank)  # ties: range_search over the probed lists


class Hnsw(Flat):
    name = "hnsw"

    def build(self, packed: np.ndarray) -> faiss.IndexBinary:
        index = faiss.IndexBinaryHNSW(packed.shape[1] * 8, self.knobs.m)
        index.hnsw.efConstruction = self.knobs.ef_construction
        index.add(np.ascontiguousarray(packed))
        return self.opened(index)

    def opened(self, index: faiss.IndexBinary) -> faiss.IndexBinary:
        index.hnsw.efSearch = self.knobs.ef_search
        return index

    def topk(self, index: BinaryCodes, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return hamming_topk(index, queries, k, wide=k * self.rerank, tied=self._tied)

    @staticmethod
    def _tied(index: BinaryCodes, queries: np.ndarray, kth: int, wide: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """HNSW has no range search: per query, twice the candidates until they reach past distance `kth`."""
        return [Hnsw._within(index, query[None], kth, wide) for query in queries]

    @staticmethod
    def _within(index: BinaryCodes, query: np.ndarray, kth: int, wide: int) -> tuple[np.ndarray, np.ndarray]:
        while True:
            wide = min(index.ntotal, 2 * wide)
            dist, rows = (a[0] for a in index.search(query, wide))
            found = rows >= 0
            if wide == index.ntotal or dist[found].max(initial=-1) > kth or found.sum() < wide:
                keep = found & (dist <= kth)
                return dist[keep], rows[keep]
