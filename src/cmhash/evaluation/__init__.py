"""Retrieval metrics: MAP family (exact, tie-aware, chance, cosine) and curves (PR, P@N)."""

from cmhash.evaluation.curves import pr_curve, precision_at_n
from cmhash.evaluation.ranking import (
    chance_map,
    cosine_map,
    hamming_distances,
    mean_average_precision,
    tie_aware_map,
)

__all__ = [
    "chance_map",
    "cosine_map",
    "hamming_distances",
    "mean_average_precision",
    "pr_curve",
    "precision_at_n",
    "tie_aware_map",
]
