"""Clustering fitted on a whole-image sample: labels identical whatever the chunking."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tileseg import registry
from tileseg.errors import ConfigError
from tileseg.methods import clustering as C


def three_level(shape=(48, 64), seed=0, noise=12.0):
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[:, shape[1] // 3 :] = 1
    truth[shape[0] // 2 :, 2 * shape[1] // 3 :] = 2
    levels = np.array([40.0, 120.0, 210.0])
    img = (levels[truth] + rng.normal(0, noise, shape)).clip(0, 255).astype(np.uint8)
    return img, truth


IMG, TRUTH = three_level()
REF = {kind: C.fit(da.from_array(IMG[None]), 3, kind=kind, sample_size=1500) for kind in ("kmeans", "gmm")}
REF_LABELS = {k: C.predict(m, da.from_array(IMG[None])).compute() for k, m in REF.items()}


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 48), st.integers(1, 64), st.sampled_from(["kmeans", "gmm"]))
def test_labels_identical_whatever_the_chunking(cy, cx, kind):
    d = da.from_array(IMG, chunks=(cy, cx))
    got = registry.get("methods", kind)(d, n_clusters=3, sample_size=1500).compute()
    np.testing.assert_array_equal(got, REF_LABELS[kind])


def test_sample_does_not_depend_on_chunking():
    a = np.arange(30 * 40, dtype=np.float32).reshape(1, 30, 40)
    s1 = C.draw_sample(da.from_array(a, chunks=(1, 30, 40)), sample_size=200, seed=4)
    s2 = C.draw_sample(da.from_array(a, chunks=(1, 7, 9)), sample_size=200, seed=4)
    np.testing.assert_array_equal(s1, s2)
    assert s1.shape == (200, 1) and np.all(np.diff(s1[:, 0]) > 0)  # raster order, no repeats
    s3 = C.draw_sample(da.from_array(a, chunks=(1, 7, 9)), sample_size=200, seed=5)
    assert not np.array_equal(s1, s3)


@pytest.mark.parametrize("kind", ["kmeans", "gmm"])
def test_clusters_separate_three_levels_in_order(kind):
    # class 0 is the darkest level, 2 the brightest
    assert (REF_LABELS[kind] == TRUTH).mean() > 0.995
    assert np.all(np.diff(REF[kind].means[:, 0]) > 0)


def test_multiband_and_mask():
    img, truth = three_level((40, 45), seed=3)
    bands = np.stack([img, (255 - img) // 2])
    got = C.kmeans(da.from_array(bands, chunks=(1, 11, 13)), spacing=(1.0, 1.0), n_clusters=3).compute()
    assert got.shape == img.shape
    assert (got == truth).mean() > 0.995
    # the mask limits the fit: with only two levels visible, k=2 splits those two
    mask = truth < 2
    m = C.fit(
        da.from_array(img[None], chunks=(1, 9, 9)), 2, mask=da.from_array(mask, chunks=9), sample_size=800
    )
    assert 25 < m.means[0, 0] < 55 and 105 < m.means[1, 0] < 135


def test_predict_matches_sklearn_kmeans_assignment():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(2, 20, 30))
    model = C.fit(da.from_array(feats, chunks=(2, 7, 7)), 4, sample_size=600)
    km = KMeans(4, n_init=1, max_iter=1, init=model.means).fit(model.means)
    want = km.predict(feats.reshape(2, -1).T).reshape(20, 30)
    np.testing.assert_array_equal(C.predict(model, da.from_array(feats, chunks=(2, 7, 7))).compute(), want)


def two_band_mixture(shape=(40, 52), seed=7):
    """Three classes with different full covariances: nearest-mean and GMM assignments differ."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.uint8)
    truth[:, shape[1] // 3 :] = 1
    truth[shape[0] // 2 :, 2 * shape[1] // 3 :] = 2
    means = np.array([[60.0, 100.0], [120.0, 60.0], [170.0, 140.0]])
    covs = np.array([[[150.0, 80.0], [80.0, 100.0]], [[900.0, -400.0], [-400.0, 500.0]],
                     [[200.0, 0.0], [0.0, 1200.0]]])
    bands = np.empty((2,) + shape)
    for k in range(3):
        inside = truth == k
        bands[:, inside] = rng.multivariate_normal(means[k], covs[k], inside.sum()).T
    return bands, truth


def test_gmm_predict_matches_sklearn_gaussian_mixture():
    from sklearn.mixture import GaussianMixture

    bands, truth = two_band_mixture()
    shape = truth.shape
    feats = da.from_array(bands, chunks=(2, 13, 17))  # 4 x 4 chunks
    model = C.fit(feats, 3, kind="gmm", sample_size=1500, seed=3)
    got = registry.get("methods", "gmm")(feats, spacing=(1.0, 1.0), n_clusters=3, sample_size=1500, seed=3).compute()
    np.testing.assert_array_equal(got, C.predict(model, feats).compute())
    pixels = bands.reshape(2, -1).T

    # scikit-learn's predict with tileseg's fitted parameters (already in class order)
    sk = GaussianMixture(3, covariance_type="full")
    sk.weights_ = np.exp(model.log_weights)
    sk.means_ = model.means
    sk.precisions_cholesky_ = model.precisions_cholesky
    sk.covariances_ = np.linalg.inv(model.precisions_cholesky @ np.swapaxes(model.precisions_cholesky, 1, 2))
    want = sk.predict(pixels).reshape(shape)
    np.testing.assert_array_equal(got, want)

    # the same mixture fitted by scikit-learn itself on the same sample, classes reordered by band-0 mean
    sample = C.draw_sample(feats, sample_size=1500, seed=3)
    gm = GaussianMixture(3, covariance_type="full", n_init=4, max_iter=300, random_state=3).fit(sample)
    order = np.argsort(gm.means_[:, 0])
    np.testing.assert_allclose(model.means, gm.means_[order], rtol=1e-12)
    np.testing.assert_allclose(np.exp(model.log_weights), gm.weights_[order], rtol=1e-12)
    rank = np.empty(3, np.int64)
    rank[order] = np.arange(3)
    np.testing.assert_array_equal(got, rank[gm.predict(pixels)].reshape(shape))

    # covariances and weights matter here: a nearest-mean assignment would not pass the checks above
    nearest = np.argmin(((pixels[:, None, :] - model.means[None]) ** 2).sum(-1), axis=1).reshape(shape)
    assert (nearest != want).sum() > 50
    assert (got == truth).mean() > 0.9


def test_errors():
    with pytest.raises(ConfigError, match="kind"):
        C.fit(da.zeros((1, 5, 5)), 2, kind="dbscan")
    with pytest.raises(ConfigError, match="n_clusters"):
        C.fit(da.zeros((1, 5, 5)), 0)
