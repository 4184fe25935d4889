"""Chunked connected-component labelling equals scipy.ndimage.label on the whole image."""

from __future__ import annotations

import gc
import os
import pickle

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from tileseg.errors import ConfigError, InputError
from tileseg.stitching.labels import _first_in_raster_order, components, label
from tileseg.testing.strategies import chunkings

SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def cases(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(3, 28 if ndim == 2 else 12), min_size=ndim, max_size=ndim)))
    chunks = draw(chunkings(shape, max_cuts=4))
    seed = draw(st.integers(0, 2**16))
    sigma = draw(st.sampled_from([0.0, 0.7, 1.5, 3.0]))
    frac = draw(st.sampled_from([0.2, 0.5, 0.7]))
    connectivity = draw(st.integers(1, ndim))
    rng = np.random.default_rng(seed)
    img = rng.random(shape)
    if sigma:
        img = ndi.gaussian_filter(img, sigma)
    mask = img > np.quantile(img, 1 - frac)
    return mask, chunks, connectivity


def _ref(mask, connectivity):
    return ndi.label(mask, ndi.generate_binary_structure(mask.ndim, connectivity))


@SETTINGS
@given(cases())
def test_sequential_labels_equal_scipy_exactly(case):
    mask, chunks, connectivity = case
    ref, n_ref = _ref(mask, connectivity)
    lab, n = label(da.from_array(mask, chunks=chunks), connectivity=connectivity)
    assert n == n_ref
    assert lab.dtype == np.int64
    assert lab.chunks == chunks
    np.testing.assert_array_equal(lab.compute(), ref)


@SETTINGS
@given(cases())
def test_non_sequential_labels_equal_up_to_permutation(case):
    mask, chunks, connectivity = case
    ref, n_ref = _ref(mask, connectivity)
    lab, n = label(da.from_array(mask, chunks=chunks), connectivity=connectivity, sequential=False)
    got = lab.compute()
    assert n == n_ref
    np.testing.assert_array_equal(got == 0, ref == 0)
    pairs = set(zip(ref[mask].tolist(), got[mask].tolist()))
    # A bijection between reference and computed labels.
    assert len(pairs) == n_ref == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    assert set(np.unique(got[mask]).tolist()) == set(range(1, n + 1))


@pytest.mark.parametrize("connectivity,expected", [(1, 2), (2, 2), (3, 1)])
def test_objects_touching_only_at_a_3d_chunk_corner(connectivity, expected):
    mask = np.zeros((8, 8, 8), bool)
    mask[2:4, 2:4, 2:4] = True  # ends at the corner of chunk (0, 0, 0)
    mask[4:6, 4:6, 4:6] = True  # starts at the corner of chunk (1, 1, 1)
    lab, n = label(da.from_array(mask, chunks=4), connectivity=connectivity)
    assert n == expected
    np.testing.assert_array_equal(lab.compute(), _ref(mask, connectivity)[0])


@pytest.mark.parametrize("connectivity,expected", [(1, 2), (2, 1), (3, 1)])
def test_objects_touching_only_along_a_3d_chunk_edge(connectivity, expected):
    mask = np.zeros((8, 8, 8), bool)
    mask[3, 3, :] = True  # chunk column (0, 0, *)
    mask[4, 4, :] = True  # chunk column (1, 1, *): touches across the z-parallel edge only
    lab, n = label(da.from_array(mask, chunks=4), connectivity=connectivity)
    assert n == expected
    np.testing.assert_array_equal(lab.compute(), _ref(mask, connectivity)[0])


def test_blob_much_larger_than_the_chunks_is_one_object():
    zz, yy, xx = np.mgrid[:30, :30, :30]
    mask = (zz - 15) ** 2 + (yy - 15) ** 2 + (xx - 15) ** 2 < 13**2  # spans 27+ chunks
    mask[15, 15, :] = False  # a cut that does not split it
    lab, n = label(da.from_array(mask, chunks=(5, 7, 6)), connectivity=1)
    assert n == 1
    np.testing.assert_array_equal(lab.compute(), mask.astype(np.int64))


def test_spiral_connected_through_many_chunks():
    # A serpentine path: one component whose pieces in each chunk are disjoint.
    mask = np.zeros((21, 21), bool)
    mask[::4, :] = True
    for i, r in enumerate(range(0, 17, 4)):
        mask[r : r + 5, 20 if i % 2 == 0 else 0] = True
    ref, n_ref = _ref(mask, 1)
    assert n_ref == 1
    lab, n = label(da.from_array(mask, chunks=3))
    assert n == 1
    np.testing.assert_array_equal(lab.compute(), ref)


def test_empty_and_full_masks():
    empty = da.zeros((10, 12), dtype=bool, chunks=4)
    lab, n = label(empty)
    assert n == 0 and not lab.compute().any()
    full = da.ones((10, 12, 5), dtype=bool, chunks=(3, 5, 2))
    lab, n = label(full, connectivity=2)
    assert n == 1 and (lab.compute() == 1).all()


def test_integer_input_means_nonzero_foreground():
    img = np.array([[0, 3, 3, 0, 7], [0, 0, 2, 0, 7]])
    lab, n = label(da.from_array(img, chunks=2))
    assert n == 2
    np.testing.assert_array_equal(lab.compute(), ndi.label(img != 0)[0])


@SETTINGS
@given(st.integers(0, 2**16), st.integers(1, 2), st.sampled_from([(3, 4), (5, 5), (7, 2)]))
def test_by_value_labels_each_class_separately(seed, connectivity, chunks):
    rng = np.random.default_rng(seed)
    cls = ndi.zoom(rng.integers(0, 4, (6, 7)), 4, order=0)[:23, :26]
    lab, n = label(da.from_array(cls, chunks=chunks), connectivity=connectivity, by_value=True)
    got = lab.compute()
    struct = ndi.generate_binary_structure(2, connectivity)
    n_ref = 0
    for v in range(1, 4):
        ref, k = ndi.label(cls == v, struct)
        n_ref += k
        sel = cls == v
        pairs = set(zip(ref[sel].tolist(), got[sel].tolist()))
        assert len(pairs) == k == len({b for _, b in pairs})
    assert n == n_ref
    assert (got[cls == 0] == 0).all()
    # Sequential in raster order over all classes.
    firsts = [np.flatnonzero(got.ravel() == i)[0] for i in range(1, n + 1)]
    assert firsts == sorted(firsts)


def test_component_summaries_match_whole_image():
    rng = np.random.default_rng(3)
    mask = ndi.gaussian_filter(rng.random((30, 34)), 1.5) > 0.5
    comps = components(da.from_array(mask, chunks=(7, 9)), connectivity=2)
    ref, n = _ref(mask, 2)
    rank = comps.raster_rank()
    sizes = np.zeros(n, np.int64)
    sizes[rank] = comps.sizes
    np.testing.assert_array_equal(sizes, np.bincount(ref.ravel())[1:])
    border_ref = np.zeros(n + 1, bool)
    for ax in range(2):
        border_ref[np.take(ref, 0, axis=ax)] = True
        border_ref[np.take(ref, -1, axis=ax)] = True
    border = np.zeros(n, bool)
    border[rank] = comps.border
    np.testing.assert_array_equal(border, border_ref[1:])


def test_graph_grows_with_blocks_not_pixels():
    mask = da.zeros((64, 64), dtype=bool, chunks=16)
    lab, _ = label(mask)
    small = len(lab.__dask_graph__())
    mask = da.zeros((640, 640), dtype=bool, chunks=160)
    lab, _ = label(mask)
    assert len(lab.__dask_graph__()) == small


def test_many_chunks_along_one_axis():
    # Provisional labels are block_index * block_size + local; many thin chunks exercise the decoding.
    mask = np.zeros((4, 402), bool)
    mask[0, ::2] = True
    mask[2, :] = True
    mask[2, ::9] = False
    lab, n = label(da.from_array(mask, chunks=(2, 4)), connectivity=2)
    ref, n_ref = _ref(mask, 2)
    assert n == n_ref
    np.testing.assert_array_equal(lab.compute(), ref)


@pytest.mark.parametrize("connectivity", [0, 3, 1.5])
def test_bad_connectivity_is_a_config_error(connectivity):
    with pytest.raises(ConfigError, match="connectivity"):
        label(da.zeros((4, 4), dtype=bool, chunks=2), connectivity=connectivity)


def test_float_input_is_rejected():
    with pytest.raises(InputError, match="float64"):
        label(da.zeros((4, 4), chunks=2))


def test_empty_chunks_and_empty_arrays():
    rng = np.random.default_rng(5)
    mask = rng.random((30, 30)) > 0.5
    x = da.from_array(mask, chunks=((10, 0, 20), (7, 0, 0, 23)))
    lab, n = label(x, connectivity=2)
    ref, n_ref = _ref(mask, 2)
    assert n == n_ref
    np.testing.assert_array_equal(lab.compute(), ref)
    lab, n = label(da.zeros((0, 5), dtype=bool, chunks=2))
    assert n == 0 and lab.compute().shape == (0, 5)


# --- the label store between the scan and the relabel pass -------------------------------------


@settings(max_examples=10, deadline=None)
@given(cases())
def test_memory_and_disk_stores_give_scipys_labels(case):
    mask, chunks, connectivity = case
    ref, n_ref = _ref(mask, connectivity)
    for spill in ("memory", "disk"):
        lab, n = label(da.from_array(mask, chunks=chunks), connectivity=connectivity, spill=spill)
        assert n == n_ref
        np.testing.assert_array_equal(lab.compute(), ref)


def test_labels_under_the_processes_scheduler_equal_scipy():
    # The relabel tasks (and the store) are pickled into worker processes.
    rng = np.random.default_rng(11)
    mask = ndi.gaussian_filter(rng.random((40, 36, 30)), 1.2) > 0.5
    ref, n_ref = _ref(mask, 1)
    with dask.config.set(scheduler="processes", num_workers=2):
        lab, n = label(da.from_array(mask, chunks=(13, 10, 16)))
        got = lab.compute()
    assert n == n_ref
    np.testing.assert_array_equal(got, ref)


def test_disk_store_is_removed_with_the_last_array_using_it():
    mask = da.from_array(np.eye(12, dtype=bool), chunks=5)
    comps = components(mask, connectivity=2, spill="disk")
    path = comps.store.path
    lab = comps.apply(np.arange(1, comps.n + 1))
    assert os.listdir(path)
    del comps
    gc.collect()
    assert os.path.isdir(path)  # the array still needs it
    np.testing.assert_array_equal(lab.compute(), np.eye(12, dtype=np.int64))
    del lab
    gc.collect()
    assert not os.path.exists(path)


def test_a_pickled_store_reads_but_never_removes():
    mask = da.from_array(np.eye(9, dtype=bool), chunks=4)
    comps = components(mask, connectivity=1, spill="disk")
    copy = pickle.loads(pickle.dumps(comps.store))
    np.testing.assert_array_equal(copy.get(0, comps.tokens[0]), comps.store.get(0, comps.tokens[0]))
    del copy
    gc.collect()
    assert os.path.isdir(comps.store.path)
    comps.store.cleanup()
    assert not os.path.exists(comps.store.path)
    lab = comps.apply(np.arange(1, comps.n + 1))
    with pytest.raises(FileNotFoundError, match="provisional labels of chunk"):
        lab.compute()


def test_unknown_spill_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="spill"):
        label(da.zeros((4, 4), dtype=bool, chunks=2), spill="tape")


def test_first_pixel_per_label_across_pieces():
    rng = np.random.default_rng(2)
    mask = ndi.gaussian_filter(rng.random((23, 19)), 1.0) > 0.5
    lab, n = ndi.label(mask)
    expected = [int(np.flatnonzero(lab.ravel() == k)[0]) for k in range(1, n + 1)]
    for step in (1, 2, 7, 64, 10_000):
        assert _first_in_raster_order(lab, step=step).tolist() == expected


@pytest.mark.parametrize("clean_conn,label_conn", [(1, 1), (2, 2), (1, 2), (2, 1)])
def test_labelling_a_cleaned_mask_equals_skimage(clean_conn, label_conn, monkeypatch):
    from skimage.morphology import remove_small_objects as sk_rso

    from tileseg.postprocess.objects import remove_small_objects
    from tileseg.stitching import labels as labels_mod

    rng = np.random.default_rng(clean_conn * 10 + label_conn)
    mask = ndi.gaussian_filter(rng.random((33, 31, 29)), 1.0) > 0.52
    scans = []
    real_scan = labels_mod._scan
    monkeypatch.setattr(labels_mod, "_scan", lambda *a, **k: scans.append(1) or real_scan(*a, **k))
    cleaned = remove_small_objects(da.from_array(mask, chunks=(10, 12, 9)), min_size_px=6, connectivity=clean_conn)
    n_chunks = len(scans)
    lab, n = label(cleaned, connectivity=label_conn)
    # Same connectivity: the cleaned mask's components are the kept ones, no second scan.
    assert len(scans) == (n_chunks if clean_conn == label_conn else 2 * n_chunks)
    ref_mask = sk_rso(mask, max_size=5, connectivity=clean_conn)
    ref, n_ref = _ref(ref_mask, label_conn)
    assert n == n_ref
    np.testing.assert_array_equal(lab.compute(), ref)
