"""Ranking the database for each query, and the MAP family computed from that ranking.

Definitions (written out in docs/evaluation.md):
- codes are ±1; Hamming distance = (bits - q·r) / 2; relevant = shares at least one label;
- the database is ranked by distance, ties broken by database index (lower index first), so
  every number here is deterministic;
- AP@K = (1/R) Σ_{relevant ranks j ≤ K} (hits up to j) / j with R the relevant items in the
  top K; a query with R = 0 scores 0 and still counts; K = None (or K ≥ database size) means
  the whole ranking (MAP@all).

How it is fast (queries go in memory-bounded chunks; every cut-off comes from one ranking):
- codes and labels are bit-packed once; distances are popcount(q XOR r) and relevance is
  (q AND r) != 0, one pass each over a [chunk, N] block;
- distances are small integers, so numpy's stable argsort is a radix sort (O(N) per row);
  when only short cut-offs are asked for, only the items up to each row's K-th smallest
  distance are sorted;
- MAP@all touches only the relevant positions of the ranking;
- tie-aware and chance MAP need no sorting: per-distance counts of items and of relevant
  items (one bincount) give them in closed form.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from cmhash.errors import ConfigError, DataError

Cutoff = int | None
Scores = dict[Cutoff, float]

# (query, database item) pairs per block by default. Each pair needs at most ~50 bytes of
# working memory (distance, relevance, int64 sort order, bookkeeping of relevant positions),
# so a block stays near 50 MB whatever the database size; blocks this small also keep the
# row-wise passes in cache, which measured faster than bigger blocks (benchmarks/bench_map.py).
CHUNK_PAIRS = 2**20


# ---------------------------------------------------------------------------- input checks


def _matrix(x: object, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim != 2 or 0 in array.shape:
        raise DataError(f"{name} must be a non-empty 2-D array [items, dims], got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{name} must be numeric, got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{name} contains NaN or inf values; fix the features or codes that produced them")
    return array


def check_codes(codes: object, name: str) -> np.ndarray:
    """A [N, bits] array of ±1 values (any numeric dtype), else DataError."""
    array = _matrix(codes, name)
    if not (np.abs(array) == 1).all():
        raise DataError(f"{name} must hold only -1 and +1 (got values {np.unique(array)[:5].tolist()}...); "
                        "binarise with np.where(x >= 0, 1, -1)")
    return array


def check_labels(labels: object, name: str, n_items: int) -> np.ndarray:
    """Multi-hot [N, C]; a label is present where the value is > 0."""
    array = _matrix(labels, name)
    if len(array) != n_items:
        raise DataError(f"{name} has {len(array)} rows but its codes/embeddings have {n_items}; they must describe the same items")
    return array


def check_pair(query: np.ndarray, db: np.ndarray, query_labels: object, db_labels: object) -> tuple[np.ndarray, np.ndarray]:
    """Checks query/database shapes agree and returns the two label matrices."""
    if query.shape[1] != db.shape[1]:
        raise DataError(f"query has {query.shape[1]} dims per item but the database has {db.shape[1]}; "
                        "encode both with the same model and code length")
    q_labels = check_labels(query_labels, "query_labels", len(query))
    d_labels = check_labels(db_labels, "db_labels", len(db))
    if q_labels.shape[1] != d_labels.shape[1]:
        raise DataError(f"query_labels have {q_labels.shape[1]} classes but db_labels have {d_labels.shape[1]}")
    return q_labels, d_labels


def cutoffs(topk: Iterable[Cutoff], n_db: int) -> dict[Cutoff, int]:
    """Each requested K (None = all) with the number of ranks it really covers (≤ n_db)."""
    result: dict[Cutoff, int] = {}
    for k in topk:
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise ConfigError(f"cut-off K must be a positive integer or None (= whole ranking), got {k!r}")
        result[None if k is None else int(k)] = n_db if k is None else min(int(k), n_db)
    if not result:
        raise ConfigError("give at least one cut-off K (None = whole ranking)")
    return result


# ------------------------------------------------------------------ distances and relevance


def pack_bits(x: np.ndarray) -> np.ndarray:
    """Rows of (x > 0) packed into the narrowest unsigned words that hold them (uint8 up to
    8 dims, ..., uint64; several uint64 words beyond 64): [N, words]. Narrow words keep the
    [chunk, N] temporaries of the bitwise ops small."""
    packed = np.packbits(x > 0, axis=1)
    word = next((size for size in (1, 2, 4) if packed.shape[1] <= size), 8)
    packed = np.pad(packed, ((0, 0), (0, -packed.shape[1] % word)))
    return np.ascontiguousarray(packed).view(f"u{word}")


def _distance_dtype(bits: int) -> type:
    return np.uint8 if bits <= np.iinfo(np.uint8).max else np.uint16


def packed_hamming(query_words: np.ndarray, db_words: np.ndarray, dtype: type) -> np.ndarray:
    """[q, N] popcount(q XOR r) summed over words."""
    distance = np.bitwise_count(query_words[:, None, 0] ^ db_words[None, :, 0]).astype(dtype, copy=False)
    for w in range(1, query_words.shape[1]):
        distance += np.bitwise_count(query_words[:, None, w] ^ db_words[None, :, w])
    return distance


def packed_relevance(query_words: np.ndarray, db_words: np.ndarray) -> np.ndarray:
    """[q, N] True where the two label sets intersect."""
    shared = query_words[:, None, 0] & db_words[None, :, 0]
    for w in range(1, query_words.shape[1]):
        shared |= query_words[:, None, w] & db_words[None, :, w]
    return shared != 0


def hamming_distances(query_codes: object, db_codes: object) -> np.ndarray:
    """[Q, N] Hamming distances between ±1 codes, uint8 (uint16 beyond 255 bits).

    Equals (bits - q·r) / 2. Memory is Q·N bytes: call it on chunks of queries for big sets.
    """
    query, db = check_codes(query_codes, "query_codes"), check_codes(db_codes, "db_codes")
    if query.shape[1] != db.shape[1]:
        raise DataError(f"query codes have {query.shape[1]} bits but database codes have {db.shape[1]}")
    return packed_hamming(pack_bits(query), pack_bits(db), _distance_dtype(query.shape[1]))


# ------------------------------------------------------------------------------- chunking


def query_chunks(n_query: int, n_db: int, chunk_size: int | None) -> Iterator[slice]:
    """Slices of `chunk_size` queries (default: about CHUNK_PAIRS query-item pairs)."""
    if chunk_size is None:
        chunk_size = max(1, CHUNK_PAIRS // n_db)
    elif chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive number of queries, got {chunk_size}")
    for start in range(0, n_query, chunk_size):
        yield slice(start, min(start + chunk_size, n_query))


class HammingTask:
    """Packed codes and labels of one query/database pair, cut into [chunk, N] blocks."""

    def __init__(self, query_codes: object, db_codes: object, query_labels: object, db_labels: object):
        query, db = check_codes(query_codes, "query_codes"), check_codes(db_codes, "db_codes")
        q_labels, d_labels = check_pair(query, db, query_labels, db_labels)
        self.bits, self.n_query, self.n_db = query.shape[1], len(query), len(db)
        self.query_words, self.db_words = pack_bits(query), pack_bits(db)
        self.query_labels, self.db_labels = pack_bits(q_labels), pack_bits(d_labels)

    def distances(self, chunk: slice) -> np.ndarray:
        return packed_hamming(self.query_words[chunk], self.db_words, _distance_dtype(self.bits))

    def relevance(self, chunk: slice) -> np.ndarray:
        return packed_relevance(self.query_labels[chunk], self.db_labels)


# ------------------------------------------------------------------------ exact ranking


def ranked_relevance(key: np.ndarray, relevant: np.ndarray, depth: int) -> np.ndarray:
    """[q, depth] relevance of each row's first `depth` items when ranked by ascending key,
    ties by column index (stable), depth ≤ number of columns."""
    n_rows, n_cols = key.shape
    if depth >= n_cols:
        order = np.argsort(key, axis=1, kind="stable")  # radix sort for uint8/uint16 keys
        ranked = np.empty_like(relevant)
        for row in range(n_rows):  # row by row beats take_along_axis and a flat take
            relevant[row].take(order[row], out=ranked[row])
        return ranked
    # Only items up to each row's depth-th smallest key can reach the top `depth`. (A radix
    # sort of the values finds that key faster than np.partition does on small integers.)
    threshold = np.sort(key, axis=1, kind="stable")[:, depth - 1 : depth]
    rows, cols = np.divmod(np.flatnonzero(key <= threshold), n_cols)
    order = np.lexsort((cols, key[rows, cols], rows))
    rows, cols = rows[order], cols[order]
    first = np.searchsorted(rows, np.arange(n_rows))  # every row has ≥ depth candidates
    take = first[:, None] + np.arange(depth)
    return relevant[rows[take], cols[take]]


def _precision_sum_prefix(ranked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σ_{relevant j} hits(j)/j and the hits, per row of a short [q, depth] ranking."""
    hits = np.cumsum(ranked, axis=1)
    return (ranked * hits / np.arange(1, ranked.shape[1] + 1)).sum(axis=1), hits[:, -1]


def _precision_sum_whole(ranked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same over whole rows, touching only the relevant positions (a dense float pass
    over every rank would cost several times more). Row by row, so the temporaries stay in
    cache; cumsum adds each row's terms from zero in rank order, which is what keeps every
    committed MAP bit for bit (a running sum over the whole chunk would lose digits)."""
    sums = np.zeros(len(ranked))
    found = np.count_nonzero(ranked, axis=1)
    hits = np.arange(1, ranked.shape[1] + 1, dtype=np.float64)
    for row, (relevant, n_found) in enumerate(zip(ranked, found)):
        if n_found:
            precision = np.flatnonzero(relevant).astype(np.float64)  # exact: ranks < 2**53
            precision += 1
            np.divide(hits[:n_found], precision, out=precision)
            sums[row] = np.cumsum(precision)[-1]
    return sums, found


def precision_sums(ranked: np.ndarray, depths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """For each row and each depth d (≤ ranked.shape[1]): Σ_{relevant ranks j ≤ d} hits(j)/j
    and the hits within the top d. Both [rows, len(depths)]."""
    parts = [_precision_sum_whole(ranked) if d >= ranked.shape[1] else _precision_sum_prefix(ranked[:, :d]) for d in depths]
    return np.stack([p[0] for p in parts], axis=1), np.stack([p[1] for p in parts], axis=1)


def _mean_ap(blocks: Iterator[tuple[np.ndarray, np.ndarray]], depth_of: dict[Cutoff, int], n_query: int) -> Scores:
    """MAP at every cut-off from (key, relevance) chunks; one ranking per chunk for all K."""
    depths = np.array(list(depth_of.values()))
    total = np.zeros(len(depths))
    for key, relevant in blocks:
        sums, hits = precision_sums(ranked_relevance(key, relevant, int(depths.max())), depths)
        total += np.divide(sums, hits, out=np.zeros_like(sums), where=hits > 0).sum(axis=0)
    return {k: float(v) for k, v in zip(depth_of, total / n_query)}


def mean_average_precision(query_codes: object, db_codes: object, query_labels: object, db_labels: object,
                           topk: Sequence[Cutoff] = (50, None), chunk_size: int | None = None) -> Scores:
    """MAP@K for every K in `topk` (None = MAP@all) of Hamming ranking, ties by database index.

    Returns {K: MAP}. `chunk_size` = queries per block (default: ~1M query-item pairs).
    """
    task = HammingTask(query_codes, db_codes, query_labels, db_labels)
    depth_of = cutoffs(topk, task.n_db)
    chunks = query_chunks(task.n_query, task.n_db, chunk_size)
    return _mean_ap(((task.distances(c), task.relevance(c)) for c in chunks), depth_of, task.n_query)


def hamming_keys(query_codes: object, db_codes: object, chunk_size: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """(queries, [chunk, N] Hamming distances) blocks: the ranking key MAP sorts on (ties by
    index via ranked_relevance), for metrics whose relevance is not a label intersection."""
    query, db = check_codes(query_codes, "query_codes"), check_codes(db_codes, "db_codes")
    if query.shape[1] != db.shape[1]:
        raise DataError(f"query codes have {query.shape[1]} bits but database codes have {db.shape[1]}")
    q_words, d_words, dtype = pack_bits(query), pack_bits(db), _distance_dtype(query.shape[1])
    for c in query_chunks(len(query), len(db), chunk_size):
        yield c, packed_hamming(q_words[c], d_words, dtype)


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    x = x.astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not (norms > 0).all():
        raise DataError(f"{name} has all-zero rows; cosine similarity is undefined for them")
    return x / norms


def _distinct_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of x and, for each row, the index of its copy among them.

    BLAS can round the same dot product differently at different output positions (or
    chunk sizes), so duplicated database rows (common: identical tag sets give identical text
    embeddings) are scored once and share that score; they then tie exactly and rank by index.
    """
    rows = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1])))[:, 0]
    _, first, slot = np.unique(rows, return_index=True, return_inverse=True)
    return x[first], slot


def cosine_map(query_emb: object, db_emb: object, query_labels: object, db_labels: object,
               topk: Sequence[Cutoff] = (50, None), chunk_size: int | None = None) -> Scores:
    """Real-valued (task 0) MAP: rank by cosine similarity, highest first, ties by index."""
    query, db = _matrix(query_emb, "query_emb"), _matrix(db_emb, "db_emb")
    q_labels, d_labels = check_pair(query, db, query_labels, db_labels)
    q_words, d_words = pack_bits(q_labels), pack_bits(d_labels)
    depth_of = cutoffs(topk, len(db))
    blocks = ((key, packed_relevance(q_words[c], d_words)) for c, key in _cosine_blocks(query, db, chunk_size))
    return _mean_ap(blocks, depth_of, len(query))


def _cosine_blocks(query: np.ndarray, db: np.ndarray, chunk_size: int | None) -> Iterator[tuple[slice, np.ndarray]]:
    query, db = _unit_rows(query, "query_emb"), _unit_rows(db, "db_emb")
    distinct_db, slot = _distinct_rows(db)
    # Negated similarity ranks ascending (sorts compare floats by value: -0.0 ties with 0.0).
    for c in query_chunks(len(query), len(db), chunk_size):
        yield c, -(query[c] @ distinct_db.T)[:, slot]


def cosine_keys(query_emb: object, db_emb: object, chunk_size: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """(queries, [chunk, N] negated cosine) blocks: the key cosine_map ranks on, ascending."""
    query, db = _matrix(query_emb, "query_emb"), _matrix(db_emb, "db_emb")
    if query.shape[1] != db.shape[1]:
        raise DataError(f"query has {query.shape[1]} dims per item but the database has {db.shape[1]}; "
                        "encode both with the same model")
    return _cosine_blocks(query, db, chunk_size)


# ------------------------------------------------- tie-aware (expected over tie orders)


def bucket_counts(distance: np.ndarray, relevant: np.ndarray, n_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the number of items and of relevant items at each distance: two [q, n_buckets]."""
    # One bincount over (row, distance, relevant) codes counts both at once.
    code = distance.astype(np.int64) * 2 + relevant + (np.arange(len(distance)) * 2 * n_buckets)[:, None]
    counts = np.bincount(code.ravel(), minlength=len(distance) * 2 * n_buckets).reshape(-1, n_buckets, 2)
    return counts.sum(axis=2), counts[:, :, 1]


class _Tables:
    """Harmonic numbers and log-factorials up to n, for the closed forms below."""

    def __init__(self, n: int):
        steps = np.arange(1, n + 1, dtype=np.float64)
        self.harmonic = np.concatenate([[0.0], np.cumsum(1.0 / steps)])
        self.log_factorial = np.concatenate([[0.0], np.cumsum(np.log(steps))])

    def log_choose(self, n: np.ndarray, k: np.ndarray) -> np.ndarray:
        return self.log_factorial[n] - self.log_factorial[k] - self.log_factorial[n - k]


def _expected_precision_sum(before: np.ndarray, hits_before: np.ndarray, n: np.ndarray, r: np.ndarray,
                            tables: _Tables) -> np.ndarray:
    """E[Σ hits/rank over the r relevant items of a group of n items in uniformly random order],
    the group following `before` items of which `hits_before` are relevant.

    A relevant item at group position p (uniform on 1..n) has rank before+p and, in
    expectation, hits_before + 1 + (p-1)(r-1)/(n-1) hits (the other r-1 relevant items are
    spread uniformly over the other n-1 slots). With s = (r-1)/(n-1):
        Σ_p [hits_before + 1 + s(p-1)] / (before + p)
      = n·s + (hits_before + 1 - s(before + 1)) · (harmonic[before + n] - harmonic[before]),
    times r/n (each relevant item sits at each p with probability 1/n).
    """
    slope = (r - 1) / np.maximum(n - 1, 1)  # for n ≤ 1 any value does: the slope terms cancel
    harmonic = tables.harmonic[before + n] - tables.harmonic[before]
    return r / np.maximum(n, 1) * (n * slope + (hits_before + 1 - slope * (before + 1)) * harmonic)


def expected_ap(items: np.ndarray, hits: np.ndarray, depth: int, tables: _Tables) -> np.ndarray:
    """Expected AP@depth per row over all orders of tied items, from [q, groups] counts of
    items and relevant items per tie group (groups in rank order).

    Groups ending at or before `depth` count whole. The boundary group (the one holding
    rank `depth`) contributes only its first m = depth - before slots; the number X of
    relevant items among them is hypergeometric(n, r, m), and given X = x those x relevant
    items sit uniformly among the m slots — the same situation as a whole group of m items
    with x relevant. AP@depth divides by the relevant count in the top depth, H + X (H =
    relevant items before the boundary group), which is random, so the expectation is
        Σ_x P(X = x) · (full + E[boundary sum | x]) / (H + x),   terms with H + x = 0 being 0;
    the whole groups' sum is independent of X, so its expectation `full` can be used there.
    """
    before = np.cumsum(items, axis=1) - items
    hits_before = np.cumsum(hits, axis=1) - hits
    boundary = np.sum(before + items < depth, axis=1)[:, None]
    whole = np.arange(items.shape[1]) < boundary
    full = np.where(whole, _expected_precision_sum(before, hits_before, items, hits, tables), 0.0).sum(axis=1, keepdims=True)

    b, h, n, r = (np.take_along_axis(a, boundary, axis=1) for a in (before, hits_before, items, hits))
    m = depth - b
    low, high = np.maximum(0, m - (n - r)), np.minimum(r, m)
    x = low + np.arange(int((high - low).max()) + 1)
    inside = x <= high
    x = np.minimum(x, high)
    log_pmf = tables.log_choose(r, x) + tables.log_choose(n - r, m - x) - tables.log_choose(n, m)
    pmf = np.where(inside, np.exp(log_pmf), 0.0)
    in_top = h + x
    numerator = full + _expected_precision_sum(b, h, m, x, tables)
    ap = np.divide(numerator, in_top, out=np.zeros(numerator.shape), where=in_top > 0)
    return (pmf * ap).sum(axis=1)


def _mean_expected_ap(counts: Iterator[tuple[np.ndarray, np.ndarray]], depth_of: dict[Cutoff, int],
                      n_query: int, n_db: int) -> Scores:
    tables = _Tables(n_db)
    total = dict.fromkeys(depth_of, 0.0)
    for items, hits in counts:
        for k, depth in depth_of.items():
            total[k] += float(expected_ap(items, hits, depth, tables).sum())
    return {k: v / n_query for k, v in total.items()}


def tie_aware_map(query_codes: object, db_codes: object, query_labels: object, db_labels: object,
                  topk: Sequence[Cutoff] = (50, None), chunk_size: int | None = None) -> Scores:
    """Expected MAP@K over all orders of equally distant items (McSherry & Najork 2008;
    He et al., CVPR 2018): the number MAP would average to over random tie-breaking.
    Exact closed form from per-distance counts; no sorting."""
    task = HammingTask(query_codes, db_codes, query_labels, db_labels)
    depth_of = cutoffs(topk, task.n_db)
    chunks = query_chunks(task.n_query, task.n_db, chunk_size)
    counts = (bucket_counts(task.distances(c), task.relevance(c), task.bits + 1) for c in chunks)
    return _mean_expected_ap(counts, depth_of, task.n_query, task.n_db)


def chance_map(query_labels: object, db_labels: object, topk: Sequence[Cutoff] = (50, None),
               chunk_size: int | None = None) -> Scores:
    """Expected MAP@K of a uniformly random ranking: tie-aware MAP with every item tied."""
    q_labels, d_labels = _matrix(query_labels, "query_labels"), _matrix(db_labels, "db_labels")
    if q_labels.shape[1] != d_labels.shape[1]:
        raise DataError(f"query_labels have {q_labels.shape[1]} classes but db_labels have {d_labels.shape[1]}")
    q_words, d_words = pack_bits(q_labels), pack_bits(d_labels)
    n_query, n_db = len(q_labels), len(d_labels)
    depth_of = cutoffs(topk, n_db)
    counts = ((np.full((c.stop - c.start, 1), n_db), packed_relevance(q_words[c], d_words).sum(axis=1, keepdims=True))
              for c in query_chunks(n_query, n_db, chunk_size))
    return _mean_expected_ap(counts, depth_of, n_query, n_db)

