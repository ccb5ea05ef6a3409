"""The training-free baselines behind one interface: `METHODS[name].fit(train_image, train_text,
bits, seed, **knobs)` returns a fitted method.

A hashing method (`binary = True`) has `image_codes(X)` and `text_codes(Y)`: ±1 int8 [N, bits].
All three here are linear hashes, sign((x - train mean of its modality) @ P_modality):
- lsh: P = one seeded Gaussian [D, bits], shared by both modalities;
- pca_itq: P = (top-`bits` PCA of both modalities' centred train features, stacked) @ one ITQ rotation;
- cca_itq: P_x = Wx @ R and P_y = Wy @ R, with (Wx, Wy) the top-`bits` CCA directions of the
  train pairs and R one ITQ rotation of both modalities' stacked projections.
`clip_cosine` (`binary = False`) has no codes: `embed_image`/`embed_text` give the L2-normalised
float features, ranked by cosine.
"""

from __future__ import annotations

import numpy as np

from cmhash.baselines.cca import cca
from cmhash.baselines.itq import binarise, itq
from cmhash.errors import ConfigError, DataError


def _features(x: object, name: str) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2 or 0 in array.shape or not np.isfinite(array).all():
        raise DataError(f"{name} must be a finite, non-empty [items, dims] matrix, got shape {array.shape}")
    return array


def unit_rows(x: object) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32), as cmhash's model scales its inputs (F.normalize)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _train_pair(train_image: object, train_text: object, same_dim: bool) -> tuple[np.ndarray, np.ndarray]:
    x, y = _features(train_image, "train_image"), _features(train_text, "train_text")
    if len(x) != len(y):
        raise DataError(f"train_image has {len(x)} rows but train_text has {len(y)}; rows must be image-text pairs")
    if same_dim and x.shape[1] != y.shape[1]:
        raise DataError(f"this method needs image and text features of one dimension (one shared space), got {x.shape[1]} and {y.shape[1]}")
    return x, y


def _check_bits(bits: int, most: int | None = None, why: str = "") -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits < 1:
        raise ConfigError(f"bits must be a positive integer, got {bits!r}")
    if most is not None and bits > most:
        raise ConfigError(f"{bits} bits exceed the {most} directions available ({why})")


class LinearHash:
    """A fitted linear hash: codes = sign((x - mean) @ projection), per modality."""

    binary = True

    def __init__(self, image_mean: np.ndarray, image_projection: np.ndarray, text_mean: np.ndarray, text_projection: np.ndarray):
        self.image_mean, self.image_projection = image_mean, image_projection
        self.text_mean, self.text_projection = text_mean, text_projection

    @property
    def bits(self) -> int:
        return self.image_projection.shape[1]

    @staticmethod
    def _codes(x: object, mean: np.ndarray, projection: np.ndarray, name: str) -> np.ndarray:
        x = _features(x, name)
        if x.shape[1] != len(mean):
            raise DataError(f"{name} has {x.shape[1]} dims but the method was fitted on {len(mean)}")
        return binarise((x - mean) @ projection)

    def image_codes(self, x: object) -> np.ndarray:
        return self._codes(x, self.image_mean, self.image_projection, "image features")

    def text_codes(self, y: object) -> np.ndarray:
        return self._codes(y, self.text_mean, self.text_projection, "text features")


class Lsh(LinearHash):
    """Sign of one shared random Gaussian projection (Charikar 2002), each modality centred by its train mean."""

    @classmethod
    def fit(cls, train_image: object, train_text: object, bits: int, seed: int = 0) -> Lsh:
        x, y = _train_pair(train_image, train_text, same_dim=True)
        _check_bits(bits)
        # Shared because CLIP puts both modalities in one space; centring removes the modality gap.
        projection = np.random.default_rng(seed).standard_normal((x.shape[1], bits))
        return cls(x.mean(axis=0), projection, y.mean(axis=0), projection)


class PcaItq(LinearHash):
    """PCA of both modalities' centred train features, stacked, then one ITQ rotation for both."""

    @classmethod
    def fit(cls, train_image: object, train_text: object, bits: int, seed: int = 0, n_iter: int = 50) -> PcaItq:
        x, y = _train_pair(train_image, train_text, same_dim=True)
        _check_bits(bits, x.shape[1], "PCA directions = feature dims")
        mean_x, mean_y = x.mean(axis=0), y.mean(axis=0)
        stacked = np.vstack([x - mean_x, y - mean_y])
        # eigh of the D x D covariance: cheaper than an SVD of the 2N x D data for N >> D.
        values, vectors = np.linalg.eigh(stacked.T @ stacked / len(stacked))
        components = vectors[:, ::-1][:, :bits]  # eigh sorts ascending
        projection = components @ itq(stacked @ components, n_iter, seed).rotation
        return cls(mean_x, projection, mean_y, projection)


class CcaItq(LinearHash):
    """Regularised CCA of the train pairs (top `bits` directions), then one ITQ rotation learned
    on both modalities' projections stacked (so a pair's two views share one code space)."""

    @classmethod
    def fit(cls, train_image: object, train_text: object, bits: int, seed: int = 0, ridge: float = 1e-3,
            n_iter: int = 50, scale_power: float = 0.0) -> CcaItq:
        x, y = _train_pair(train_image, train_text, same_dim=False)
        _check_bits(bits, min(x.shape[1], y.shape[1]), "CCA directions = min(image dims, text dims)")
        fit = cca(x, y, bits, ridge)
        # Optional weighting of direction j by correlation_j ** p (p = 0: every direction counts alike).
        scale = np.clip(fit.correlations, 0.0, None) ** scale_power
        wx, wy = fit.wx * scale, fit.wy * scale
        stacked = np.vstack([(x - fit.mean_x) @ wx, (y - fit.mean_y) @ wy])
        rotation = itq(stacked, n_iter, seed).rotation
        model = cls(fit.mean_x, wx @ rotation, fit.mean_y, wy @ rotation)
        model.correlations = fit.correlations
        return model


class ClipCosine:
    """No hashing: the L2-normalised float CLIP features, ranked by cosine (the real-valued reference)."""

    binary = False

    @classmethod
    def fit(cls, train_image: object = None, train_text: object = None, bits: int | None = None, seed: int = 0) -> ClipCosine:
        return cls()  # nothing to learn; the arguments keep the common interface

    @staticmethod
    def _unit(x: object, name: str) -> np.ndarray:
        x = _features(x, name)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if not (norms > 0).all():
            raise DataError(f"{name} has all-zero rows; cosine similarity is undefined for them")
        return (x / norms).astype(np.float32)

    def embed_image(self, x: object) -> np.ndarray:
        return self._unit(x, "image features")

    def embed_text(self, y: object) -> np.ndarray:
        return self._unit(y, "text features")


METHODS: dict[str, type] = {"lsh": Lsh, "pca_itq": PcaItq, "cca_itq": CcaItq, "clip_cosine": ClipCosine}
