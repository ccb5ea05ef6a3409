"""Precision–recall over Hamming radius and precision@N, for DVC plots.

Both use the ranking of `ranking.py`: Hamming distance between ±1 codes, relevant = shares
a label, ties broken by database index.

Conventions (the hashing literature's "hash lookup" convention, e.g. KSH/SDH): every query
counts in every average. A query that retrieves nothing within radius r has precision 0 at r
(an empty lookup is a failure, not a perfect answer); a query with no relevant item in the
database has recall 0. P@N divides by min(N, database size): N beyond the database means the
whole database.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmhash.evaluation.ranking import HammingTask, bucket_counts, cutoffs, query_chunks, ranked_relevance


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    return np.divide(numerator, denominator, out=np.zeros(numerator.shape), where=denominator > 0)


def pr_curve(query_codes: object, db_codes: object, query_labels: object, db_labels: object,
             chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean precision and recall of retrieving every item within Hamming radius r, for
    r = 0..bits: two float64 arrays of length bits + 1 (index = radius)."""
    task = HammingTask(query_codes, db_codes, query_labels, db_labels)
    precision, recall = np.zeros(task.bits + 1), np.zeros(task.bits + 1)
    for chunk in query_chunks(task.n_query, task.n_db, chunk_size):
        items, hits = bucket_counts(task.distances(chunk), task.relevance(chunk), task.bits + 1)
        retrieved, found = np.cumsum(items, axis=1), np.cumsum(hits, axis=1)
        precision += _ratio(found, retrieved).sum(axis=0)
        recall += _ratio(found, found[:, -1:]).sum(axis=0)
    return precision / task.n_query, recall / task.n_query


def precision_at_n(query_codes: object, db_codes: object, query_labels: object, db_labels: object,
                   ns: Sequence[int] = (100, 200, 500, 1000), chunk_size: int | None = None) -> np.ndarray:
    """Mean fraction of relevant items among the first N of the Hamming ranking (ties by
    database index), for each N in `ns`: float64 array of len(ns)."""
    task = HammingTask(query_codes, db_codes, query_labels, db_labels)
    depth_of = cutoffs(ns, task.n_db)
    depths = np.array([depth_of[None if n is None else int(n)] for n in ns])
    total = np.zeros(len(depths))
    for chunk in query_chunks(task.n_query, task.n_db, chunk_size):
        ranked = ranked_relevance(task.distances(chunk), task.relevance(chunk), int(depths.max()))
        total += np.cumsum(ranked, axis=1)[:, depths - 1].sum(axis=0)
    return total / depths / task.n_query
