"""Iterative quantisation (ITQ; Gong & Lazebnik, CVPR 2011 / TPAMI 2013): the rotation of
centred, projected data that brings it closest to the corners of the hypercube.

Alternates B = sign(V R) (best codes for a fixed rotation) and the orthogonal Procrustes
solution R = argmin_R ||B - V R||_F (best rotation for fixed codes); each half-step can only
lower the quantisation loss ||B - V R||_F^2, so the recorded losses never rise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmhash.errors import ConfigError, DataError


def binarise(x: np.ndarray) -> np.ndarray:
    """±1 int8 codes: sign with 0 -> +1 (so every bit is defined)."""
    return np.where(x >= 0, 1, -1).astype(np.int8)


def random_rotation(bits: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal [bits, bits] matrix: Q of the QR of a Gaussian matrix."""
    q, r = np.linalg.qr(rng.standard_normal((bits, bits)))
    # Fixing the signs of R's diagonal makes Q Haar-distributed rather than biased by LAPACK's sign choice.
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def procrustes(codes: np.ndarray, data: np.ndarray) -> np.ndarray:
    """The orthogonal R minimising ||codes - data @ R||_F: with data^T codes = U S W^T, R = U W^T
    (it maximises trace(R^T data^T codes))."""
    u, _, wt = np.linalg.svd(data.T @ codes)
    return u @ wt


def quantisation_loss(codes: np.ndarray, data: np.ndarray, rotation: np.ndarray) -> float:
    return float(np.sum((codes - data @ rotation) ** 2))


@dataclass(frozen=True)
class ItqResult:
    rotation: np.ndarray  # [bits, bits], orthogonal; codes are sign(V @ rotation)
    losses: list[float]  # ||B - V R||_F^2 after each iteration's rotation update


def itq(projected: np.ndarray, n_iter: int = 50, seed: int = 0) -> ItqResult:
    """ITQ rotation of `projected` [N, bits] (already centred and projected, e.g. by PCA or CCA)."""
    v = np.asarray(projected, dtype=np.float64)
    if v.ndim != 2 or 0 in v.shape:
        raise DataError(f"ITQ needs a non-empty [items, bits] matrix, got shape {v.shape}")
    if n_iter < 0:
        raise ConfigError(f"n_iter must be >= 0 ITQ iterations, got {n_iter}")
    rotation = random_rotation(v.shape[1], np.random.default_rng(seed))
    losses = []
    for _ in range(n_iter):
        codes = binarise(v @ rotation).astype(np.float64)
        rotation = procrustes(codes, v)
        losses.append(quantisation_loss(codes, v, rotation))
    return ItqResult(rotation, losses)
