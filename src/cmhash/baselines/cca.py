"""Regularised canonical correlation analysis between paired rows of two modalities.

Covariances are the biased (1/N) ones of the data centred by its own means. Each is
regularised as C + ridge * (trace(C) / d) * I: the ridge is relative to the mean variance
per dimension, so one value means the same amount of shrinkage whatever the features' scale
or dimension (ridge = 0 is plain CCA, and needs full-rank covariances). Both sides are
whitened with the inverse square root of their regularised covariance (eigh), and the SVD of
the whitened cross-covariance gives the canonical pairs, strongest first. The projections
satisfy Wx^T Cxx_reg Wx = I, Wy^T Cyy_reg Wy = I and Wx^T Cxy Wy = diag(correlations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmhash.errors import ConfigError, DataError

# Relative size below which a regularised covariance counts as singular (float64 rounding).
_SINGULAR = 1e-10


@dataclass(frozen=True)
class CcaResult:
    wx: np.ndarray  # [dx, k] image-side projection (apply to X - mean_x)
    wy: np.ndarray  # [dy, k] text-side projection (apply to Y - mean_y)
    correlations: np.ndarray  # [k], descending
    mean_x: np.ndarray  # [dx] train means the projections expect removed
    mean_y: np.ndarray  # [dy]


def regularised_cov(centred: np.ndarray, ridge: float) -> np.ndarray:
    cov = centred.T @ centred / len(centred)
    dim = cov.shape[0]
    return cov + ridge * (np.trace(cov) / dim) * np.eye(dim)


def inverse_sqrt(cov: np.ndarray, side: str) -> np.ndarray:
    """Symmetric C^(-1/2); a singular C is a settings problem (ridge too small for the data)."""
    values, vectors = np.linalg.eigh(cov)
    if values[0] <= _SINGULAR * max(values[-1], np.finfo(float).tiny):
        raise ConfigError(f"the {side} covariance is singular (fewer pairs than dims, or constant/duplicate dims); use a ridge > 0")
    return (vectors / np.sqrt(values)) @ vectors.T


def _paired(x: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise DataError(f"CCA needs paired [N, d] matrices with N >= 2, got shapes {x.shape} and {y.shape}")
    return x, y


def cca(x: object, y: object, k: int, ridge: float = 1e-3) -> CcaResult:
    """The top-k canonical directions of paired X [N, dx] and Y [N, dy] (rows are pairs)."""
    x, y = _paired(x, y)
    if not 1 <= k <= min(x.shape[1], y.shape[1]):
        raise ConfigError(f"CCA gives at most min(image dims, text dims) = {min(x.shape[1], y.shape[1])} directions; asked for {k} bits")
    if not ridge >= 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")
    mean_x, mean_y = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mean_x, y - mean_y
    white_x = inverse_sqrt(regularised_cov(xc, ridge), "image")
    white_y = inverse_sqrt(regularised_cov(yc, ridge), "text")
    # Canonical pairs are the singular pairs of the cross-covariance between whitened sides.
    u, s, vt = np.linalg.svd(white_x @ (xc.T @ yc / len(x)) @ white_y, full_matrices=False)
    return CcaResult(white_x @ u[:, :k], white_y @ vt[:k].T, s[:k], mean_x, mean_y)
