"""Resampling: chunked == whole-array SciPy, geometry kept, round trips."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from tileseg.image import Image
from tileseg.resample import index_map, labels_from_scores, resample, resample_to, resampled_shape

CASES = [  # shape, spacing, new spacing, input chunks, output chunks
    ((23, 31), (1.0, 1.0), (0.7, 1.9), (5, 7), (3, 4)),
    ((23, 31), (1.0, 2.0), (2.5, 0.75), (23, 31), (7, 11)),
    ((17, 19), (0.5, 0.5), (0.5, 0.5), (4, 9), (5, 5)),
    ((9, 13, 17), (2.0, 1.0, 0.5), (0.9, 1.3, 0.6), (4, 5, 6), (3, 7, 5)),
    ((11, 8, 10), (1.0, 1.0, 1.0), (2.0, 0.5, 3.0), (3, 3, 3), (2, 5, 4)),
]


def _image(shape, spacing, chunks, *, seed=0, origin=None, dtype=np.float32, **kw):
    x = np.random.default_rng(seed).random(shape).astype(dtype)
    origin = origin if origin is not None else tuple(0.5 + i for i in range(len(shape)))
    axes = ("z", "y", "x")[-len(shape):]
    return x, Image(data=da.from_array(x, chunks=chunks), axes=axes, spacing=spacing, origin=origin, **kw)


@pytest.mark.parametrize("shape, spacing, new, in_chunks, out_chunks", CASES)
def test_linear_equals_scipy_on_the_whole_array(shape, spacing, new, in_chunks, out_chunks):
    x, img = _image(shape, spacing, in_chunks)
    out = resample(img, new, order=1, chunks=out_chunks)
    assert out.spatial_shape == resampled_shape(shape, spacing, new)
    assert out.data.npartitions > 1
    # SciPy's zoom-like map: input index = output index * new / old spacing (same origin)
    ref = ndi.affine_transform(x, np.diag(np.divide(new, spacing)), 0.0, output_shape=out.spatial_shape, order=1,
                               mode="nearest")
    np.testing.assert_allclose(out.data.compute(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape, spacing, new, in_chunks, out_chunks", CASES)
def test_nearest_is_exact_and_rounds_ties_up(shape, spacing, new, in_chunks, out_chunks):
    x = np.random.default_rng(1).integers(0, 5, shape).astype(np.uint8)
    img = Image(data=da.from_array(x, chunks=in_chunks), axes=("z", "y", "x")[-len(shape):], spacing=spacing,
                class_names=tuple("abcde"))
    out = resample(img, new, order=0, chunks=out_chunks)
    assert out.dtype == np.uint8 and out.is_class_map
    # independent oracle: index = clip(floor(j * new / old + 0.5))
    idx = [np.clip(np.floor(np.arange(m) * t / s + 0.5 + 1e-9).astype(int), 0, n - 1)  # ties up, as documented
           for m, t, s, n in zip(out.spatial_shape, new, spacing, shape)]
    np.testing.assert_array_equal(out.data.compute(), x[np.ix_(*idx)])


def test_cubic_is_close_to_scipy():
    x, img = _image((40, 37), (1.0, 1.0), (9, 8))
    out = resample(img, (0.6, 1.7), order=3, chunks=(7, 6))
    m, o = index_map(img, out.spacing, out.origin, out.direction)
    ref = ndi.affine_transform(x, m, o, output_shape=out.spatial_shape, order=3, mode="nearest")
    np.testing.assert_allclose(out.data.compute(), ref, atol=1e-4)


def test_world_positions_of_voxel_centres_match():
    direction = ((0.0, 0.6, 0.8), (0.0, 0.8, -0.6), (1.0, 0.0, 0.0))
    x, img = _image((6, 8, 10), (3.0, 0.5, 0.8), (3, 4, 5), origin=(-10.0, 4.0, 7.0), direction=direction)
    out = resample(img, (1.0, 1.0, 1.0))
    assert out.origin == img.origin and out.direction == img.direction and out.spacing == (1.0, 1.0, 1.0)
    world = lambda im, p: np.asarray(im.origin) + (np.asarray(p) * im.spacing) @ np.asarray(im.direction)  # noqa: E731
    m, o = index_map(img, out.spacing, out.origin, out.direction)
    for p in [(0, 0, 0), (5, 2, 7), (17, 3, 1)]:
        q = m @ np.asarray(p, dtype=float) + o  # where output voxel p reads the input
        np.testing.assert_allclose(world(out, p), world(img, q), atol=1e-9)
    # the physical extent (shape x spacing) is kept to within half a new voxel
    extent_old = np.multiply(img.spatial_shape, img.spacing)
    extent_new = np.multiply(out.spatial_shape, out.spacing)
    assert np.all(np.abs(extent_new - extent_old) <= np.asarray(out.spacing) / 2)


def test_resample_to_another_grid_matches_scipy_and_takes_its_geometry():
    x, img = _image((20, 30), (1.0, 1.0), (6, 7), origin=(0.0, 0.0))
    like = Image(data=da.zeros((12, 9), chunks=(5, 4)), axes=("y", "x"), spacing=(1.3, 2.2), origin=(2.25, -1.0))
    out = resample_to(img, like, order=1)
    assert (out.spatial_shape, out.spacing, out.origin) == (like.spatial_shape, like.spacing, like.origin)
    assert out.data.chunks == like.data.chunks
    ref = ndi.affine_transform(x, np.diag([1.3, 2.2]), (2.25, -1.0), output_shape=(12, 9), order=1, mode="nearest")
    np.testing.assert_allclose(out.data.compute(), ref, atol=1e-5)


def test_round_trip_of_a_smooth_image_is_close():
    zz, yy, xx = np.meshgrid(*(np.linspace(0, 1, n) for n in (12, 30, 28)), indexing="ij")
    x = (np.sin(2 * yy) + np.cos(3 * xx) + zz).astype(np.float32)
    img = Image(data=da.from_array(x, chunks=(5, 7, 9)), axes=("z", "y", "x"), spacing=(2.0, 0.7, 0.7))
    back = resample_to(resample(img, (1.0, 0.5, 1.1), order=1), img, order=1).data.compute()
    np.testing.assert_allclose(back[:-1, :-1, :-1], x[:-1, :-1, :-1], atol=0.01)


def test_class_map_round_trip_at_the_same_spacing_is_exact():
    x = np.random.default_rng(3).integers(0, 7, (15, 22)).astype(np.uint16)
    img = Image(data=da.from_array(x, chunks=(4, 5)), axes=("y", "x"), spacing=(0.8, 1.2), origin=(5.0, 6.0))
    back = resample_to(resample(img, (0.8, 1.2), order=0), img, order=0)
    np.testing.assert_array_equal(back.data.compute(), x)
    up = resample(img, (0.4, 0.6), order=0)  # an exact 2x: every pixel doubled, back to itself
    np.testing.assert_array_equal(resample_to(up, img, order=0).data.compute(), x)


def test_channels_validity_and_transform():
    x = np.random.default_rng(4).random((2, 10, 12)).astype(np.float32)
    mask = np.ones((10, 12), bool)
    mask[:, :3] = False
    img = Image(data=da.from_array(x, chunks=(1, 4, 5)), axes=("c", "y", "x"), spacing=(30.0, 30.0),
                origin=(4000015.0, 500015.0), mask=da.from_array(mask, chunks=4),
                transform=(30.0, 0.0, 500000.0, 0.0, -30.0, 4000030.0))
    out = resample(img, (15.0, 60.0))
    assert out.shape == (2, 20, 6) and out.has_channels
    for c in range(2):
        ref = ndi.affine_transform(x[c], np.diag([0.5, 2.0]), 0.0, output_shape=(20, 6), order=1, mode="nearest")
        np.testing.assert_allclose(out.data[c].compute(), ref, atol=1e-5)
    ref_mask = mask[np.ix_(np.clip(np.floor(np.arange(20) * 0.5 + 0.5).astype(int), 0, 9), np.arange(6) * 2)]
    np.testing.assert_array_equal(out.mask.compute(), ref_mask)
    assert out.transform == (60.0, 0.0, 500015.0 - 30.0, 0.0, -15.0, 4000015.0 + 7.5)


def test_labels_from_scores_is_argmax():
    s = np.random.default_rng(5).random((3, 9, 8)).astype(np.float32)
    img = Image(data=da.from_array(s, chunks=(1, 4, 4)), axes=("c", "y", "x"))
    out = labels_from_scores(img, ("a", "b", "c"))
    np.testing.assert_array_equal(out.data.compute(), s.argmax(0))
    assert out.is_class_map


def test_bad_arguments():
    _, img = _image((5, 5), (1.0, 1.0), 5)
    with pytest.raises(ValueError, match="spacing"):
        resample(img, (1.0,))
    with pytest.raises(ValueError, match="spacing"):
        resample(img, (1.0, 0.0))
    with pytest.raises(ValueError, match="order"):
        resample(img, (1.0, 1.0), order=2)


# --------------------------------------------------------------------------- the engine with target_spacing


def _mean3(batch: np.ndarray) -> np.ndarray:
    """(N, 1, *patch) -> (N, 3, *patch): a patch-local 3x3 mean and two pointwise maps (patch borders matter)."""
    x = batch[:, :1]
    m = ndi.uniform_filter(x, size=(1, 1) + (3,) * (x.ndim - 2), mode="constant")
    return np.concatenate([m, 1.0 - x, 0.5 * x * x + 0.2], axis=1).astype(np.float32)


def _scipy_to(x: np.ndarray, matrix, offset, shape) -> np.ndarray:
    return ndi.affine_transform(x, matrix, offset, output_shape=shape, order=1, mode="nearest")


@pytest.mark.parametrize("shape, spacing, target, patch, chunks", [
    ((45, 38), (1.0, 0.8), (0.7, 1.1), (16, 16), (13, 11)),
    ((14, 20, 17), (2.5, 1.0, 1.0), (1.5, 1.3, 0.9), (8, 8, 8), (7, 9, 6)),
])
def test_segment_with_target_spacing_equals_the_steps_done_by_hand(shape, spacing, target, patch, chunks):
    import tileseg

    x, img = _image(shape, spacing, tuple(c + 2 for c in chunks), origin=tuple(-3.0 + i for i in range(len(shape))))
    got = tileseg.segment(img, _mean3, patch_size=patch, chunks=chunks, target_spacing=target)
    assert (got.spatial_shape, got.spacing, got.origin, got.direction) == (
        img.spatial_shape, img.spacing, img.origin, img.direction)
    assert got.class_names == ("class_0", "class_1", "class_2") and got.dtype == np.uint8
    # by hand: SciPy resampling to the target grid, segment there, SciPy back, argmax
    new_shape = resampled_shape(shape, spacing, target)
    moved = _scipy_to(x, np.diag(np.divide(target, spacing)), 0.0, new_shape)
    logits = tileseg.segment(moved, _mean3, patch_size=patch, chunks=chunks, output="logits").data.compute()
    back = np.stack([_scipy_to(c, np.diag(np.divide(spacing, target)), 0.0, shape) for c in logits])
    top2 = np.sort(back, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-4
    labels = got.data.compute()
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], back.argmax(0)[clear])


def test_segment_with_target_spacing_probabilities_and_nodata():
    import tileseg

    x, _ = _image((30, 26), (1.0, 1.0), 9)
    x[:, :5] = -1.0
    img = Image(data=da.from_array(x, chunks=9), axes=("y", "x"), spacing=(1.0, 1.0), nodata=-1.0)
    probs = tileseg.segment(img, _mean3, patch_size=(12, 12), target_spacing=(0.6, 1.4), output="probabilities")
    p = probs.data.compute()
    assert p.shape == (3, 30, 26) and probs.nodata != probs.nodata  # NaN
    assert np.isnan(p[:, :, :5]).all()
    np.testing.assert_allclose(p[:, :, 5:].sum(0), 1.0, atol=1e-5)
    labels = tileseg.segment(img, _mean3, patch_size=(12, 12), target_spacing=(0.6, 1.4))
    lab = labels.data.compute()
    assert labels.nodata == 255 and (lab[:, :5] == 255).all() and (lab[:, 5:] < 3).all()


def test_target_spacing_is_checked():
    import tileseg
    from tileseg.errors import ConfigError, TilingError

    _, img = _image((20, 20), (1.0, 1.0), 10)
    with pytest.raises(ConfigError, match="target_spacing"):
        tileseg.segment(img, _mean3, patch_size=(8, 8), target_spacing=(1.0, -2.0))
    with pytest.raises(TilingError, match="target_spacing"):
        tileseg.segment(img, _mean3, patch_size=8, target_spacing=(1.0, 1.0, 1.0))


def test_pipeline_yaml_with_target_spacing_runs(tmp_path):
    pytest.importorskip("torch")
    import sys
    import textwrap
    from pathlib import Path

    import zarr

    import tileseg
    from tileseg.runner import run_pipeline

    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_helpers import save_conv_model, write_scene

    save_conv_model(tmp_path / "model.pt")
    image, _ = write_scene(tmp_path / "a.zarr", shape=(50, 45), seed=3)
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        version: 1
        input: {path: "a.zarr", array: image}
        tiling: {patch_size: [24, 24], overlap: 0.25, chunks: [32, 32], target_spacing: [0.75, 1.5]}
        model: {torchscript: {path: model.pt}, output: labels, batch_size: 4, classes: [background, object]}
        output: {path: "out/{stem}_seg.zarr"}
        execution: {scheduler: threads, workers: 2}
        """))
    report = run_pipeline(tmp_path / "p.yaml")
    assert report.ok, report.items
    out = zarr.open_group(report.items[0].output, mode="r")["0"][...]
    assert out.shape == image.shape
    want = tileseg.segment(image, str(tmp_path / "model.pt"), patch_size=(24, 24), overlap=0.25, chunks=(32, 32),
                           target_spacing=(0.75, 1.5)).data.compute()
    np.testing.assert_array_equal(out, want)
    assert 0.05 < out.mean() < 0.95
    text = (tmp_path / "p.yaml").read_text().replace("[0.75, 1.5]", "[0.75, 0]")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(Exception, match="target_spacing"):
        tileseg.load_pipeline(tmp_path / "bad.yaml")


def test_plan_lays_the_grid_on_the_resampled_image():
    from tileseg.graph import plan
    from tileseg.options import TilingOptions

    _, img = _image((40, 30), (1.0, 1.0), 10)
    p = plan(img, TilingOptions(patch_size=(16, 16), overlap=0.0, target_spacing=(0.5, 2.0)))
    assert p["shape"] == (40, 30) and p["resampled_shape"] == (80, 15)
    assert p["n_patches"] == 5 * 1  # 80 / 16 rows; the 15 columns are padded to one patch


def test_each_output_chunk_reads_only_the_input_blocks_under_it():
    from dask.optimization import cull

    x = np.zeros((200, 300), np.float32)
    img = Image(data=da.from_array(x, chunks=(20, 30)), axes=("y", "x"))  # 10 x 10 input blocks
    out = resample(img, (0.5, 0.5), order=1, chunks=(40, 60))  # 400 x 600: 10 x 10 output chunks
    block = out.data.blocks[4, 7]
    kept, _ = cull(dict(block.__dask_graph__()), block.__dask_keys__())
    inputs = {k for k in kept if isinstance(k, tuple) and k[0] == img.data.name}
    # output rows 160..199 read input rows 80..100 (with the halo): blocks 4-5, likewise columns 7-8
    assert 1 <= len(inputs) <= 4, sorted(inputs)


def test_target_spacing_with_channels_xarray_and_no_change():
    import tileseg

    xr = pytest.importorskip("xarray")
    x = np.random.default_rng(6).random((2, 21, 25)).astype(np.float32)
    img = Image(data=da.from_array(x, chunks=(1, 8, 8)), axes=("c", "y", "x"), spacing=(2.0, 2.0))

    def two_channel(b):
        return np.concatenate([b[:, :1] - b[:, 1:], b[:, 1:] - b[:, :1]], axis=1)

    got = tileseg.segment(img, two_channel, patch_size=(8, 8), target_spacing=(1.0, 3.0)).data.compute()
    moved = np.stack([_scipy_to(c, np.diag([0.5, 1.5]), 0.0, (42, 17)) for c in x])
    logits = two_channel(moved[None])[0]
    back = np.stack([_scipy_to(c, np.diag([2.0, 2 / 3]), 0.0, (21, 25)) for c in logits])
    clear = np.abs(back[0] - back[1]) > 1e-4
    np.testing.assert_array_equal(got[clear], back.argmax(0)[clear])
    same = tileseg.segment(img, two_channel, patch_size=(8, 8), target_spacing=(2.0, 2.0)).data.compute()
    np.testing.assert_array_equal(same, (x[1] > x[0]).astype(np.uint8))
    arr = xr.DataArray(x[0], dims=("y", "x"), coords={"y": np.arange(21) * 2.0, "x": np.arange(25) * 2.0})
    out = tileseg.segment(arr, _mean3, patch_size=(8, 8), target_spacing=(1.0, 3.0))
    assert isinstance(out, xr.DataArray) and out.shape == (21, 25)
    np.testing.assert_array_equal(out["x"].values, arr["x"].values)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), ndim=st.sampled_from([2, 3]), order=st.sampled_from([0, 1]))
def test_any_chunking_equals_the_whole_array(data, ndim, order):
    shape = data.draw(st.tuples(*[st.integers(1, 13)] * ndim))
    in_chunks = data.draw(st.tuples(*[st.integers(1, 13)] * ndim))
    out_chunks = data.draw(st.tuples(*[st.integers(1, 9)] * ndim))
    steps = st.sampled_from([0.25, 0.5, 0.7, 1.0, 1.3, 2.0, 3.0])
    spacing, new = data.draw(st.tuples(*[steps] * ndim)), data.draw(st.tuples(*[steps] * ndim))
    x = np.random.default_rng(0).integers(0, 9, shape).astype(np.float32)
    img = Image(data=da.from_array(x, chunks=in_chunks), axes=("z", "y", "x")[-ndim:], spacing=spacing)
    out = resample(img, new, order=order, chunks=out_chunks)
    whole = resample(img.with_data(img.data.rechunk(-1)), new, order=order, chunks=-1).data.compute()
    np.testing.assert_allclose(out.data.compute(), whole, atol=1e-5 if order else 0)
    if order == 0:
        idx = [np.clip(np.floor(np.arange(m) * t / s + 0.5 + 1e-9).astype(int), 0, n - 1)  # ties up, as documented
               for m, t, s, n in zip(out.spatial_shape, new, spacing, shape)]
        np.testing.assert_array_equal(whole, x[np.ix_(*idx)])
    else:
        ref = ndi.affine_transform(x, np.diag(np.divide(new, spacing)), 0.0, output_shape=out.spatial_shape,
                                   order=1, mode="nearest")
        np.testing.assert_allclose(whole, ref, atol=1e-5)
