"""Training-free baselines (ITQ, CCA, LSH, PCA-ITQ, CCA-ITQ, CLIP cosine) and ridge selection,
against closed forms and planted structure on small seeded synthetic data."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from cmhash.baselines import selection
from cmhash.baselines.cca import cca
from cmhash.baselines.itq import itq
from cmhash.baselines.methods import METHODS, CcaItq, Lsh, PcaItq
from cmhash.errors import ConfigError
from cmhash.evaluation.ranking import mean_average_precision


def correlated_pairs(n: int, dx: int, dy: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two views sharing a 3-dim latent through random mixing, plus independent noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    x = z @ rng.standard_normal((3, dx)) + rng.standard_normal((n, dx)) + 2.0
    y = z @ rng.standard_normal((3, dy)) + rng.standard_normal((n, dy)) - 1.0
    return x, y


def clustered(n: int, dim: int, seed: int, classes: int = 16, rotate_text: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Well-separated classes seen by both modalities; each modality has its own offset (and,
    with rotate_text, the text side lives in a rotated copy of the image space)."""
    rng = np.random.default_rng(seed)
    protos = 6.0 * np.random.default_rng(99).standard_normal((classes, dim))
    cls = rng.integers(0, classes, n)
    image = protos[cls] + rng.standard_normal((n, dim)) + 3.0
    text = protos[cls] + rng.standard_normal((n, dim)) - 5.0
    if rotate_text:
        text = text @ np.linalg.qr(np.random.default_rng(7).standard_normal((dim, dim)))[0]
    return image, text, np.eye(classes, dtype=np.uint8)[cls]


# ----------------------------------------------------------------------------------- ITQ


def test_itq_rotation_is_orthogonal_and_loss_never_rises():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    v -= v.mean(axis=0)
    result = itq(v, n_iter=30, seed=3)
    r = result.rotation
    np.testing.assert_allclose(r @ r.T, np.eye(16), atol=1e-6)
    losses = np.array(result.losses)
    assert len(losses) == 30
    assert (np.diff(losses) <= 1e-9 * losses[0]).all()
    assert losses[-1] < losses[0]
    # The codes the rotation yields fit it at least as well as the last recorded codes did.
    b = np.where(v @ r >= 0, 1.0, -1.0)
    assert np.sum((b - v @ r) ** 2) <= losses[-1] * (1 + 1e-9)


def test_itq_is_seeded():
    v = np.random.default_rng(1).standard_normal((200, 8))
    np.testing.assert_array_equal(itq(v, 5, seed=4).rotation, itq(v, 5, seed=4).rotation)
    assert not np.allclose(itq(v, 0, seed=4).rotation, itq(v, 0, seed=5).rotation)


# ----------------------------------------------------------------------------------- CCA


def test_cca_projections_are_uncorrelated_and_sorted():
    x, y = correlated_pairs(2000, 10, 7, seed=0)
    fit = cca(x, y, k=5, ridge=0.0)
    px, py = (x - x.mean(axis=0)) @ fit.wx, (y - y.mean(axis=0)) @ fit.wy
    cov = np.cov(np.hstack([px, py]).T, bias=True)
    np.testing.assert_allclose(cov[:5, :5], np.eye(5), atol=1e-8)  # image side: diagonal (unit variances)
    np.testing.assert_allclose(cov[5:, 5:], np.eye(5), atol=1e-8)  # text side
    np.testing.assert_allclose(cov[:5, 5:], np.diag(fit.correlations), atol=1e-8)  # pairs j correlate only with j
    assert (np.diff(fit.correlations) <= 0).all() and fit.correlations[0] == fit.correlations.max()
    assert fit.correlations[2] > 0.5 > fit.correlations[3]  # three shared latent dims, then noise


def test_cca_first_correlation_matches_closed_form():
    # x1 = z + e1, y1 = z + e2 with var(z) = 1, var(e) = s2: corr(x1, y1) = 1 / (1 + s2); every
    # other dim is independent noise, so that is the first canonical correlation.
    rng = np.random.default_rng(5)
    n, s2 = 20000, 0.5
    z = rng.standard_normal(n)
    x = np.column_stack([z + np.sqrt(s2) * rng.standard_normal(n), rng.standard_normal((n, 3))])
    y = np.column_stack([z + np.sqrt(s2) * rng.standard_normal(n), 3.0 * rng.standard_normal((n, 4))])
    fit = cca(x, y, k=2, ridge=1e-9)
    assert fit.correlations[0] == pytest.approx(1 / (1 + s2), abs=0.015)
    assert fit.correlations[1] < 0.05
    assert np.argmax(np.abs(fit.wx[:, 0])) == 0 and np.argmax(np.abs(fit.wy[:, 0])) == 0


def test_cca_ridge_shrinks_correlations_and_too_many_bits_is_a_config_error():
    x, y = correlated_pairs(500, 6, 5, seed=1)
    assert (cca(x, y, 3, ridge=1.0).correlations < cca(x, y, 3, ridge=0.0).correlations).all()
    with pytest.raises(ConfigError, match="at most"):
        cca(x, y, 6)
    with pytest.raises(ConfigError, match="CCA directions"):
        CcaItq.fit(x, y, bits=6)
    with pytest.raises(ConfigError, match="singular"):
        cca(x[:4], y[:4], 2, ridge=0.0)


# -------------------------------------------------------------------------------- methods


def test_lsh_identical_inputs_give_identical_codes_in_either_modality():
    x, _ = correlated_pairs(300, 24, 24, seed=2)
    fit = Lsh.fit(x, x.copy(), bits=32, seed=11)
    np.testing.assert_array_equal(fit.image_codes(x[:50]), fit.text_codes(x[:50]))
    again = Lsh.fit(x, x, bits=32, seed=11)
    np.testing.assert_array_equal(again.image_projection, fit.image_projection)
    np.testing.assert_array_equal(fit.image_projection, fit.text_projection)  # one shared projection
    assert not np.array_equal(Lsh.fit(x, x, bits=32, seed=12).image_projection, fit.image_projection)


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("name", ["lsh", "pca_itq", "cca_itq"])
def test_codes_are_pm1_int8(name, bits):
    x, y = correlated_pairs(100, 40, 40, seed=3)
    fit = METHODS[name].fit(x, y, bits, 0)
    assert fit.binary
    for codes in (fit.image_codes(x[:70]), fit.text_codes(y[:70])):
        assert codes.dtype == np.int8 and codes.shape == (70, bits)
        assert set(np.unique(codes).tolist()) <= {-1, 1}


def test_clip_cosine_gives_unit_float_features():
    x, y = correlated_pairs(50, 12, 12, seed=4)
    fit = METHODS["clip_cosine"].fit(x, y, None, 0)
    assert not fit.binary
    for emb in (fit.embed_image(x), fit.embed_text(y)):
        assert emb.dtype == np.float32 and emb.shape == (50, 12)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)


def cross_map(fit, image, text, label, n_train):
    """MAP@all of held-out queries against the train items, (i2t, t2i)."""
    q, d = slice(n_train, None), slice(None, n_train)
    i2t = mean_average_precision(fit.image_codes(image[q]), fit.text_codes(text[d]), label[q], label[d], topk=[None])[None]
    t2i = mean_average_precision(fit.text_codes(text[q]), fit.image_codes(image[d]), label[q], label[d], topk=[None])[None]
    return i2t, t2i


@pytest.mark.parametrize("method, classes, rotate_text", [(PcaItq, 2, False), (PcaItq, 16, False), (CcaItq, 16, False), (CcaItq, 16, True)])
def test_planted_clusters_are_retrieved_across_modalities(method, classes, rotate_text):
    # CCA whitens every direction to unit variance, so CCA-ITQ needs shared structure spanning
    # about `bits` directions (16 classes); with 2 classes 15 of its 16 bits would be noise.
    image, text, label = clustered(400, 32, seed=6, classes=classes, rotate_text=rotate_text)
    fit = method.fit(image[:300], text[:300], bits=16, seed=0)
    assert min(cross_map(fit, image, text, label, 300)) > 0.98


def test_pca_itq_cannot_align_rotated_modalities():
    # The control for the test above: PCA-ITQ assumes one shared space, CCA-ITQ learns the alignment.
    image, text, label = clustered(400, 32, seed=6, rotate_text=True)
    assert max(cross_map(PcaItq.fit(image[:300], text[:300], bits=16), image, text, label, 300)) < 0.3


# ------------------------------------------------------------------------------ selection


def test_candidates_are_the_product_of_list_valued_knobs_in_order():
    assert selection.candidates({"ridge": [1, 2], "scale_power": [0, 1], "n_iter": 5}) == [
        {"ridge": 1, "scale_power": 0, "n_iter": 5}, {"ridge": 1, "scale_power": 1, "n_iter": 5},
        {"ridge": 2, "scale_power": 0, "n_iter": 5}, {"ridge": 2, "scale_power": 1, "n_iter": 5}]
    assert selection.candidates({}) == [{}]


def test_select_on_val_picks_from_the_candidates_using_train_and_val_only():
    image, text, label = clustered(300, 24, seed=8, rotate_text=True)
    ridges = [1e-4, 1e-2, 1.0]
    chosen = selection.select_on_val("cca_itq", {"ridge": ridges, "n_iter": 10}, (image[:200], text[:200], label[:200]),
                                     (image[200:], text[200:], label[200:]), bits=16, seed=0, topk=20)
    assert chosen.knobs["ridge"] in ridges and chosen.knobs["n_iter"] == 10
    assert [row["knobs"]["ridge"] for row in chosen.table] == ridges
    assert max(row["map"] for row in chosen.table) == next(row["map"] for row in chosen.table if row["knobs"] == chosen.knobs)
    assert all(row["map"] == pytest.approx((row["i2t"] + row["t2i"]) / 2) for row in chosen.table)
    assert np.array_equal(chosen.fitted.image_codes(image), selection.METHODS["cca_itq"].fit(
        image[:200], text[:200], 16, 0, **chosen.knobs).image_codes(image))  # the kept fit is the chosen one
    params = list(inspect.signature(selection.select_on_val).parameters)
    assert not any("query" in p or "retrieval" in p for p in params)


def test_select_on_val_breaks_ties_by_list_order(monkeypatch):
    image, text, label = clustered(120, 16, seed=9, classes=4)
    seen = []

    def constant_map(query_codes, db_codes, query_labels, db_labels, topk):
        seen.append((len(query_codes), len(db_codes)))
        return {k: 0.5 for k in topk}

    monkeypatch.setattr(selection, "mean_average_precision", constant_map)
    chosen = selection.select_on_val("cca_itq", {"ridge": [0.3, 0.1, 0.2]}, (image[:80], text[:80], label[:80]),
                                     (image[80:], text[80:], label[80:]), bits=8, seed=0)
    assert chosen.knobs == {"ridge": 0.3}
    assert set(seen) == {(40, 80)}  # val queries against the train database, both directions
