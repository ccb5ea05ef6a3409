"""How `cmhash index` holds the codes for search (params.yaml `search.index`), each kind with its
knobs in `search.<kind>`. `flat` compares every code; the others are FAISS's approximate binary
indexes, whose candidates (`search.rerank` x k of them) are re-ranked by exact Hamming distance
with flat's tie rule. Implementations: cmhash.search.kinds."""

from __future__ import annotations

from pydantic import model_validator

from cmhash.config.fields import Count, Section
from cmhash.config.registry import Registry

INDEXES = Registry("index")

INDEXES.add("flat", "cmhash.search.kinds:Flat",
            summary="faiss.IndexBinaryFlat: every code compared, exact (ties by row).")


@INDEXES.register("ivf", "cmhash.search.kinds:Ivf")
class IvfKnobs(Section):
    """faiss.IndexBinaryIVF: codes in nlist lists around k-means centroids, nprobe lists searched."""

    nlist: Count = 1024  # lists (centroids); at most the collection's size
    nprobe: Count = 32  # lists searched per query; nprobe = nlist searches every code
    train_sample: Count = 100_000  # codes drawn (seeded by `seed`) to train the centroids; at least nlist

    @model_validator(mode="after")
    def _fits(self) -> IvfKnobs:
        if self.nprobe > self.nlist:
            raise ValueError(f"nprobe = {self.nprobe} is more than nlist = {self.nlist}; use at most nlist")
        if self.train_sample < self.nlist:
            raise ValueError(f"train_sample = {self.train_sample} is less than nlist = {self.nlist}; k-means needs a code per list")
        return self


@INDEXES.register("hnsw", "cmhash.search.kinds:Hnsw")
class HnswKnobs(Section):
    """faiss.IndexBinaryHNSW: a navigable small-world graph over the codes."""

    m: Count = 16  # graph neighbours per code (more: better recall, more memory, slower build)
    ef_search: Count = 64  # candidate list while searching (raised to the candidates asked for)
    ef_construction: Count = 40  # candidate list while building
