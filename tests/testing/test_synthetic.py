from __future__ import annotations

import numpy as np
import pytest
import zarr

from tileseg.testing.synthetic import blobs_2d, blobs_3d, dice, make_scene, render, write_blobs_zarr


@pytest.mark.parametrize("shape, region", [
    ((150, 170), (slice(13, 97), slice(40, 170))),
    ((40, 50, 60), (slice(5, 33), slice(0, 17), slice(31, 59))),
])
def test_region_equals_crop_of_whole_image(shape, region):
    scene = make_scene(shape, seed=3)
    full, inst = render(scene)
    part, pinst = render(scene, region)
    np.testing.assert_array_equal(part, full[region])
    np.testing.assert_array_equal(pinst, inst[region])


@pytest.mark.parametrize("shape, chunk_sets", [
    ((200, 300), [(64, 64), (200, 300), (37, 111)]),
    ((48, 40, 56), [(16, 16, 16), (48, 40, 56), (7, 40, 13)]),
])
def test_zarr_writer_independent_of_chunking(tmp_path, shape, chunk_sets):
    stores = []
    for i, chunks in enumerate(chunk_sets):
        g = write_blobs_zarr(tmp_path / f"s{i}.zarr", shape, chunks, seed=7, workers=2)
        assert g["image"].chunks == chunks
        stores.append({k: g[k][...] for k in ("image", "labels", "instances")})
    for other in stores[1:]:
        for k in ("image", "labels", "instances"):
            np.testing.assert_array_equal(other[k], stores[0][k])
    # equals the in-memory maker
    maker = blobs_2d if len(shape) == 2 else blobs_3d
    img, lab = maker(shape, seed=7)
    np.testing.assert_array_equal(stores[0]["image"], img)
    np.testing.assert_array_equal(stores[0]["labels"], lab)
    np.testing.assert_array_equal(stores[0]["labels"], (stores[0]["instances"] > 0).astype(np.uint8))


def test_same_call_twice_identical_other_seed_differs(tmp_path):
    a = write_blobs_zarr(tmp_path / "a.zarr", (128, 96), (32, 32), seed=1)
    b = write_blobs_zarr(tmp_path / "b.zarr", (128, 96), (32, 32), seed=1)
    c = write_blobs_zarr(tmp_path / "c.zarr", (128, 96), (32, 32), seed=2)
    np.testing.assert_array_equal(a["image"][...], b["image"][...])
    assert not np.array_equal(a["image"][...], c["image"][...])
    reopened = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    assert reopened.attrs["tileseg_synthetic"]["seed"] == 1
    assert tuple(reopened["image"].metadata.dimension_names) == ("y", "x")
    with pytest.raises(Exception):  # noqa: B017 - zarr raises its own "exists" error
        write_blobs_zarr(tmp_path / "a.zarr", (128, 96), (32, 32), seed=1)


def test_labels_consistent_with_image():
    img, lab = blobs_2d((512, 512), seed=4)
    _, inst = blobs_2d((512, 512), seed=4, instances=True)
    scene = make_scene((512, 512), seed=4)
    assert set(np.unique(lab)) == {0, 1}
    assert 0.05 < lab.mean() < 0.2  # coverage 0.12 before overlaps
    assert 0 < len(np.unique(inst)) - 1 <= scene.n_blobs
    fg, bg = img[lab == 1].astype(float), img[lab == 0].astype(float)
    assert fg.mean() - bg.mean() > 0.2 * 255
    # every instance lies where its ellipse says: its centroid is close to the blob centre
    ids = np.unique(inst)[1:]
    k = ids[np.argmax([np.sum(inst == i) for i in ids])]  # the largest visible blob
    ys, xs = np.nonzero(inst == k)
    assert np.hypot(ys.mean() - scene.centers[k - 1, 0], xs.mean() - scene.centers[k - 1, 1]) < 3
    # a global threshold is imperfect, a smoothed one is better: the task needs spatial context
    best_raw = max(dice(img > t, lab) for t in range(0, 256, 4))
    assert best_raw < 0.9


def test_3d_and_dtypes():
    img16, lab = blobs_3d((24, 32, 40), seed=5, dtype=np.uint16)
    assert img16.dtype == np.uint16 and img16.shape == lab.shape == (24, 32, 40)
    f, _ = blobs_3d((24, 32, 40), seed=5, dtype=np.float32)
    np.testing.assert_allclose(img16 / 65535.0, f, atol=1e-4)
    with pytest.raises(ValueError, match="3D"):
        blobs_3d((10, 10))


def test_dice():
    a = np.array([1, 1, 0, 0])
    assert dice(a, a) == 1.0
    assert dice(a, 1 - a) == 0.0
    assert dice(a, np.array([1, 0, 0, 0])) == pytest.approx(2 / 3)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
