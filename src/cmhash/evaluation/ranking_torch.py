"""MAP@K and MAP@all of the Hamming ranking with torch, on any device: what the `evaluate` stage
runs on a GPU. ranking.mean_average_precision (numpy) stays the path on CPU; this gives the same
numbers (tests compare the two on codes full of ties).

Same definitions and tie rule as ranking.py:
- Hamming distance = (bits - q·r) / 2 from a float32 matmul of the ±1 codes (exact: the products
  are ±1 and the sums integers far below 2^24, also under TF32 or bf16 matmul settings);
- relevant = the label sets intersect: a matmul of the 0/1 label matrices is > 0;
- the database is ranked by distance, ties by database index: the sort key distance·N + index is
  distinct within a row, so any sort (or top-k) gives numpy's stable order;
- AP@K = (1/R) Σ_{relevant ranks j ≤ K} hits(j)/j, 0 when R = 0.
Rankings and hit counts are identical to numpy's and each term hits(j)/j is the same float64
division; only the order in which the float64 terms are added differs (last bits, ~1e-16).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cmhash.evaluation.ranking import Cutoff, Scores, check_codes, check_pair, cutoffs, query_chunks

# (query, database item) pairs per block. Each pair needs about 60 bytes of device memory
# (distance, int64 sort key and the sort's outputs, relevance, int64 hits, float64 terms), so a
# block takes ~2 GB: 2,100 x 190,000 (NUS-WIDE) goes in 12 blocks of 176 queries.
CHUNK_PAIRS = 2**25


def ranked_relevance(distance: torch.Tensor, relevant: torch.Tensor, depth: int) -> torch.Tensor:
    """[q, depth] relevance of each row's first `depth` items ranked by ascending distance, ties
    by column index (ranking.ranked_relevance's order)."""
    n_cols = distance.shape[1]
    key = distance * n_cols + torch.arange(n_cols, device=distance.device)
    first = key.sort(dim=1).values if depth >= n_cols else key.topk(depth, dim=1, largest=False, sorted=True).values
    return relevant.gather(1, first % n_cols)


def average_precisions(ranked: torch.Tensor, depths: Sequence[int]) -> torch.Tensor:
    """[rows, len(depths)] float64 AP@d of each row of a [rows, ≥ max(depths)] ranking."""
    hits = ranked.cumsum(dim=1)
    ranks = torch.arange(1, ranked.shape[1] + 1, device=ranked.device, dtype=torch.float64)
    terms = torch.where(ranked, hits / ranks, 0.0)
    columns = []
    for d in depths:
        found = hits[:, d - 1]
        columns.append(torch.where(found > 0, terms[:, :d].sum(dim=1) / found.clamp(min=1), 0.0))
    return torch.stack(columns, dim=1)


def mean_average_precision_torch(query_codes: object, db_codes: object, query_labels: object, db_labels: object,
                                 topk: Sequence[Cutoff] = (50, None), device: torch.device | str = "cpu",
                                 chunk_size: int | None = None) -> Scores:
    """ranking.mean_average_precision computed with torch on `device`: {K: MAP} for every K in
    `topk` (None = MAP@all). Inputs are checked as there (same errors). `chunk_size` = queries
    per block (default: ~CHUNK_PAIRS query-item pairs)."""
    query, db = check_codes(query_codes, "query_codes"), check_codes(db_codes, "db_codes")
    q_labels, d_labels = check_pair(query, db, query_labels, db_labels)
    n_query, n_db, bits = len(query), len(db), query.shape[1]
    depth_of = cutoffs(topk, n_db)
    depths = list(depth_of.values())

    def on_device(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)

    q_codes, d_codes = on_device(query), on_device(db)
    q_sets, d_sets = on_device(q_labels > 0), on_device(d_labels > 0)
    total = torch.zeros(len(depths), dtype=torch.float64, device=q_codes.device)
    for c in query_chunks(n_query, n_db, chunk_size or max(1, CHUNK_PAIRS // n_db)):
        distance = ((bits - q_codes[c] @ d_codes.T) / 2).to(torch.int64)  # exact integers, see above
        relevant = (q_sets[c] @ d_sets.T) > 0
        total += average_precisions(ranked_relevance(distance, relevant, max(depths)), depths).sum(dim=0)
    return {k: float(v) for k, v in zip(depth_of, total.cpu() / n_query)}
