"""Region growing and watershed across chunks against whole-image SciPy/scikit-image."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import flood
from skimage.segmentation import watershed as sk_watershed

from tileseg import registry
from tileseg.errors import ConfigError
from tileseg.methods import regions as R


def oracle_components(mask, seeds, connectivity):
    labels, _ = ndi.label(mask, ndi.generate_binary_structure(mask.ndim, connectivity))
    return np.isin(labels, np.unique(labels[seeds & mask])) & mask


@st.composite
def masks(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(4, 14 if ndim == 3 else 50)) for _ in range(ndim))
    chunks = tuple(draw(st.integers(1, s)) for s in shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    mask = rng.random(shape) < draw(st.sampled_from([0.3, 0.5, 0.65]))
    seeds = rng.random(shape) < 0.02
    conn = draw(st.integers(1, ndim))
    return mask, seeds, chunks, conn


@settings(max_examples=30, deadline=None)
@given(masks())
def test_seeded_components_equal_whole_image_label(case):
    mask, seeds, chunks, conn = case
    got = R.seeded_components(
        da.from_array(mask, chunks=chunks), da.from_array(seeds, chunks=chunks), connectivity=conn
    )
    np.testing.assert_array_equal(got.compute(), oracle_components(mask, seeds, conn))


def test_component_through_3d_chunk_corners():
    # a diagonal chain of voxels meets only at chunk corners: joined with connectivity 3 only
    m = np.zeros((8, 8, 8), bool)
    for i in range(8):
        m[i, i, i] = True
    s = np.zeros_like(m)
    s[0, 0, 0] = True
    d, ds = da.from_array(m, chunks=2), da.from_array(s, chunks=2)
    for conn, n in ((3, 8), (2, 1)):
        got = R.seeded_components(d, ds, connectivity=conn).compute()
        np.testing.assert_array_equal(got, oracle_components(m, s, conn))
        assert got.sum() == n


def smooth(shape, seed):
    rng = np.random.default_rng(seed)
    a = ndi.gaussian_filter(rng.random(shape), 3)
    return ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)


@pytest.mark.parametrize("conn", [1, 2])
@pytest.mark.parametrize("chunks", [(7, 9), (13, 64), (64, 5)])
def test_region_growing_from_a_point_equals_flood(conn, chunks):
    a = smooth((64, 70), 1)
    got = R.region_growing(
        da.from_array(a, chunks=chunks), points=[(30, 33)], tolerance=20, connectivity=conn
    )
    want = flood(a, (30, 33), tolerance=20, connectivity=conn)
    assert want.sum() > 200  # a region larger than the chunks
    np.testing.assert_array_equal(got.compute(), want.astype(np.uint8))


def test_region_growing_seed_mask_and_window_3d():
    a = smooth((20, 22, 24), 2)
    seeds = np.zeros(a.shape, bool)
    seeds[5, 5, 5] = seeds[15, 12, 20] = True
    d = da.from_array(a, chunks=(6, 7, 5))
    got = R.region_growing(
        d, seed_mask=da.from_array(seeds, chunks=4), tolerance=15, connectivity=1
    ).compute()
    ref = a[seeds].astype(float).mean()
    window = (a >= ref - 15) & (a <= ref + 15)
    np.testing.assert_array_equal(got, oracle_components(window, seeds, 1).astype(np.uint8))
    got2 = registry.get("methods", "region_growing")(
        d, points=[[5, 5, 5]], low=100, high=180, connectivity=3
    ).compute()
    window2 = (a >= 100) & (a <= 180)
    s2 = np.zeros(a.shape, bool)
    s2[5, 5, 5] = True
    np.testing.assert_array_equal(got2, oracle_components(window2, s2, 3).astype(np.uint8))
    with pytest.raises(ConfigError, match="exactly one"):
        R.region_growing(d, tolerance=3)


def blobs(shape, n, seed, rmax=5):
    """Small touching disk/ball pairs: every object spans < 2 * (2 * rmax + 1) pixels."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    img = np.zeros(shape, np.uint8)
    for _ in range(n):
        c = rng.integers(rmax + 2, np.array(shape) - rmax - 2)
        r = rng.integers(2, rmax + 1)
        for shift in (0, r):
            c2 = c.copy()
            c2[0] = min(c2[0] + shift, shape[0] - 1)
            img[sum((g - x) ** 2 for g, x in zip(grid, c2)) <= r * r] = 200
    return img


def test_watershed_with_markers_equals_skimage_when_objects_fit_in_halo():
    rng = np.random.default_rng(0)
    for shape, chunks_list in (
        ((90, 100), [(20, 23), (45, 7), (90, 100)]),
        ((30, 32, 34), [(10, 11, 9), (30, 8, 34)]),
    ):
        img = blobs(shape, 14 if len(shape) == 2 else 6, seed=len(shape))
        mask = img > 100
        dist = ndi.distance_transform_edt(mask)
        landscape = -dist + rng.random(shape) * 1e-3  # no ties: scikit-image's result is unique
        comps, _ = ndi.label(mask)
        extent = max(max(s.stop - s.start for s in o) for o in ndi.find_objects(comps))
        peaks = peak_local_max(dist, min_distance=2, labels=comps, exclude_border=False)
        markers = np.zeros(shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        want = sk_watershed(landscape, markers, mask=mask)
        for chunks in chunks_list:
            got = R.watershed(
                da.from_array(landscape, chunks=chunks),
                da.from_array(markers, chunks=chunks),
                mask=da.from_array(mask, chunks=chunks),
                halo_px=extent + 1,
            )
            np.testing.assert_array_equal(got.compute(), want)


def _ws_oracle(img, t, min_distance):
    """The whole-image pipeline, each object flooded on its own (as tileseg documents)."""
    mask = img > t
    dist = ndi.distance_transform_edt(mask)
    comps, _ = ndi.label(mask)
    peaks = peak_local_max(
        dist, min_distance=min_distance, threshold_abs=0.0, labels=comps, exclude_border=False
    )
    pm = np.zeros(mask.shape, bool)
    pm[tuple(peaks.T)] = True
    markers, _ = ndi.label(pm, ndi.generate_binary_structure(img.ndim, img.ndim))
    out = np.zeros(mask.shape, np.int64)
    for i, sl in enumerate(ndi.find_objects(comps), start=1):
        sub = comps[sl] == i
        out[sl][sub] = sk_watershed(-dist[sl], np.where(sub, markers[sl], 0), mask=sub)[sub]
    return out, sk_watershed(-dist, markers, mask=mask)


def _same_partition(a, b):
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize(
    "shape,chunk_sets",
    [((96, 110), [(24, 31), (50, 12), (96, 110)]), ((28, 30, 32), [(9, 10, 11), (28, 15, 8)])],
)
def test_watershed_from_threshold_is_chunking_independent_and_matches_skimage(shape, chunk_sets):
    img = blobs(shape, 16 if len(shape) == 2 else 6, seed=7)
    per_object, whole = _ws_oracle(img, 100, 3)
    comps, _ = ndi.label(img > 100)
    halo = max(max(s.stop - s.start for s in o) for o in ndi.find_objects(comps)) + 1
    results = []
    for chunks in chunk_sets:
        got = registry.get("methods", "watershed")(
            da.from_array(img, chunks=chunks), threshold=100, halo_px=halo
        )
        results.append(got.compute())
        assert _same_partition(results[-1], per_object)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])  # same ids whatever the chunking
    # against scikit-image's single whole-image watershed: only tie-breaking pixels may differ
    assert ((results[0] > 0) == (whole > 0)).all()
    pairs = np.unique(np.stack([results[0].ravel(), whole.ravel()]), axis=1)
    assert pairs.shape[1] <= len(np.unique(whole)) + 3
