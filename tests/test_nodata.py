"""Nodata never reaches the model: all-invalid patches are skipped, results unchanged elsewhere."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

import tileseg
from tileseg.image import Image
from tileseg.tiling.grid import make_grid


class Counting:
    """A 3x3-mean model that records the patches it sees."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.batches.append(batch.copy())
        mean = ndi.uniform_filter(batch[:, 0], size=(1, 3, 3), mode="nearest")
        return np.stack([-mean, mean], axis=1).astype(np.float32)

    @property
    def n(self) -> int:
        return sum(len(b) for b in self.batches)


def _scene(seed: int = 0):
    """A scene with a rotated valid footprint (nodata outside) and a masked strip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:150, :170]
    footprint = (np.abs((yy - 75) * 0.8 + (xx - 85) * 0.6) < 45) & (np.abs(-(yy - 75) * 0.6 + (xx - 85) * 0.8) < 60)
    raw = (rng.random((150, 170)) * 100 + 50).astype(np.float32)
    raw[~footprint] = -9999.0
    mask = np.ones_like(footprint)
    mask[:, 150:] = False
    return raw, footprint & mask, mask


def _image(raw, mask):
    return Image(da.from_array(raw, chunks=(40, 50)), axes=("y", "x"), nodata=-9999.0,
                 mask=da.from_array(mask, chunks=(40, 50)))


def test_all_nodata_patches_never_reach_the_model_and_results_are_unchanged():
    raw, valid, mask = _scene()
    img = _image(raw, mask)
    skipping, full = Counting(), Counting()
    kw = dict(patch_size=(32, 32), overlap=0.5, chunks=48, batch_size=4, output="probabilities",
              preprocess=["zscore"], fill_value=0.0, out_channels=2)
    a = tileseg.segment(img, skipping, **kw).data.compute()
    b = tileseg.segment(img, full, skip_nodata=False, **kw).data.compute()
    grid = make_grid(raw.shape, (32, 32), overlap=0.5, chunks=48)
    expected = sum(valid[y:y + 32, x:x + 32].any() for y in grid.axes[0].starts for x in grid.axes[1].starts)
    assert skipping.n == expected < full.n == grid.n_patches
    # every patch the model saw holds valid pixels; the invalid ones arrive as fill_value (0 after zscore)
    seen = np.concatenate(skipping.batches)[:, 0]
    assert all((p != 0).any() for p in seen)
    # valid pixels: identical to predicting everything (the same patches cover them); invalid: NaN nodata
    np.testing.assert_array_equal(a[:, valid], b[:, valid])
    assert np.isnan(a[:, ~valid]).all() and np.isnan(b[:, ~valid]).all()
    # zscore statistics come from the valid pixels only
    z = (raw - raw[valid].mean()) / raw[valid].std()
    z[~valid] = 0.0
    ref = tileseg.segment(Image(da.from_array(z, chunks=(40, 50)), axes=("y", "x")), Counting(),
                          patch_size=(32, 32), overlap=0.5, chunks=48, output="probabilities").data.compute()
    np.testing.assert_allclose(a[:, valid], ref[:, valid], atol=2e-5)


def test_labels_and_blocks_without_any_patch():
    raw, valid, mask = _scene(1)
    raw[:, :60] = -9999.0  # whole output blocks of nodata
    valid[:, :60] = False
    model = Counting()
    out = tileseg.segment(_image(raw, mask), model, patch_size=(24, 24), chunks=30)
    got = out.data.compute()
    assert out.nodata == 255 and (got[~valid] == 255).all() and set(np.unique(got[valid])) <= {0, 1}
    mean = ndi.uniform_filter(np.where(valid, raw, 0), 3, mode="nearest")
    interior = ndi.binary_erosion(valid, iterations=2)  # away from the footprint's edge
    np.testing.assert_array_equal(got[interior], (mean[interior] > 0).astype(np.uint8))


@pytest.mark.parametrize("shape, patch, slab", [
    ((40, 37, 29), (16, 16, 16), np.s_[:20]),
    ((12, 90, 80), (16, 32, 32), np.s_[:, :, :45]),  # z is padded (12 < 16)
])
def test_3d_and_padded_axes(shape, patch, slab):
    rng = np.random.default_rng(2)
    raw = rng.random(shape).astype(np.float32) + 1
    raw[slab] = 0  # nodata
    img = Image(da.from_array(raw, chunks=16), axes=("z", "y", "x"), nodata=0.0)
    model = Counting()

    def model3d(batch):
        model.batches.append(batch.copy())
        return np.concatenate([-batch, batch], axis=1)

    out = tileseg.segment(img, model3d, patch_size=patch, overlap=0.25, output="logits",
                          out_channels=2).data.compute()
    full = tileseg.segment(img, lambda b: np.concatenate([-b, b], axis=1), patch_size=patch, overlap=0.25,
                           output="logits", skip_nodata=False).data.compute()
    valid = raw != 0
    np.testing.assert_allclose(out[:, valid], full[:, valid], rtol=1e-6)
    assert 0 < model.n < make_grid(shape, patch, overlap=0.25).n_patches


def test_run_report_counts_skipped_patches(tmp_path):
    torch = pytest.importorskip("torch")
    import warnings

    raw, valid, mask = _scene(3)
    tileseg.write(Image(da.from_array(raw, chunks=(40, 50)), axes=("y", "x"), nodata=-9999.0), tmp_path / "s.zarr")
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(conv), str(tmp_path / "m.pt"))
    truth = np.where(raw == -9999.0, 255, (raw > 100).astype(np.uint8)).astype(np.uint8)
    tileseg.write(Image(da.from_array(truth, chunks=64), axes=("y", "x"), nodata=255), tmp_path / "ref.zarr")
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: s.zarr}\ntiling: {patch_size: [32, 32], overlap: 0.5, chunks: [48, 48]}\n"
        "model: {torchscript: {path: m.pt}, classes: [a, b]}\noutput: {path: 'out/{stem}.zarr'}\n"
        "evaluate: {reference: {path: ref.zarr}}\n")
    item = tileseg.run(tmp_path / "p.yaml", scheduler="synchronous").items[0]
    assert item.status == "ok", item.error
    nodata_valid = raw != -9999.0
    grid = make_grid(raw.shape, (32, 32), overlap=0.5, chunks=48)
    active = sum(nodata_valid[y:y + 32, x:x + 32].any() for y in grid.axes[0].starts for x in grid.axes[1].starts)
    assert (item.n_patches, item.n_patches_skipped) == (active, grid.n_patches - active)
    back = tileseg.open(tmp_path / "out" / "s.zarr")
    pred = back.data.compute()
    assert back.nodata == 255 and (pred[~nodata_valid] == 255).all()
    # Dice only over the pixels both the reference and the output call valid
    p, r = pred[nodata_valid] == 1, truth[nodata_valid] == 1
    assert item.dice["b"] == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()))


@pytest.mark.parametrize("output, blend", [("probabilities", "gaussian"), ("labels", "crop")])
def test_owner_tasks_skip_all_nodata_patches_of_images_too_large_for_a_validity_pass(monkeypatch, output, blend):
    # huge images leave out all-nodata patches inside the owner tasks (no pass over the validity first):
    # the same patches reach the model and the result is identical to the pass's
    import tileseg.graph as graph

    raw, valid, mask = _scene(1)
    img = _image(raw, mask)
    kw = dict(patch_size=(32, 32), overlap=0.5, chunks=48, batch_size=4, output=output, blend=blend,
              preprocess=["zscore"], fill_value=0.0, out_channels=2)
    with_pass = Counting()
    want = tileseg.segment(img, with_pass, **kw).data.compute()
    monkeypatch.setattr(graph, "PREPASS_MAX_PIXELS", 100)
    called = []
    monkeypatch.setattr(graph, "active_patches", lambda *a: called.append(1))
    in_tasks = Counting()
    got = tileseg.segment(img, in_tasks, **kw).data.compute()
    assert not called
    np.testing.assert_array_equal(got, want)
    grid = make_grid(raw.shape, (32, 32), overlap=0.5, chunks=48)
    assert in_tasks.n == with_pass.n < grid.n_patches  # exactly the patches holding a valid pixel
    assert not any((b == 0.0).all(axis=(1, 2, 3)).any() for b in in_tasks.batches)  # no all-fill patch


# ------------------------------------------------------------------ post-processing keeps nodata (end to end)
def _geotiff_with_nodata(path):
    """A uint8 GeoTIFF: smooth blobs crossing the 40-px chunks, nodata 255 in the [:50, :50] corner."""
    rasterio = pytest.importorskip("rasterio")

    rng = np.random.default_rng(0)
    smooth = ndi.gaussian_filter(rng.random((120, 130)), 3)
    raw = ((smooth - smooth.min()) / np.ptp(smooth) * 250).astype(np.uint8)
    raw[:50, :50] = 255
    with rasterio.open(path, "w", driver="GTiff", width=130, height=120, count=1, dtype="uint8", nodata=255,
                       crs="EPSG:32633", transform=rasterio.Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4100000.0)) as dst:
        dst.write(raw, 1)
    return raw


def _by_hand(raw, steps):
    """Otsu on the valid pixels, then each step on the whole image with nodata treated by hand."""
    import warnings

    import skimage.morphology as skm
    from skimage.filters import threshold_otsu

    invalid = raw == 255
    mask = raw > threshold_otsu(raw[~invalid])
    fp = skm.disk(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # binary_* are deprecated in 0.26
        for step in steps:
            if step == "opening":  # nodata is outside the image: True for the erosion, False for the dilation
                mask = skm.binary_dilation(skm.binary_erosion(mask | invalid, fp) & ~invalid, fp)
            elif step == "closing":
                mask = skm.binary_erosion(skm.binary_dilation(mask & ~invalid, fp) | invalid, fp)
            elif step == "remove_small_objects":
                mask = skm.remove_small_objects(mask & ~invalid, max_size=19)
    mask &= ~invalid
    if steps[-1] == "label":
        out = ndi.label(mask)[0].astype(np.int64)
        out[invalid] = -1
        return out, -1
    out = mask.astype(np.uint8)
    out[invalid] = 255
    return out, 255


@pytest.mark.parametrize("steps", [["opening"], ["closing"], ["label"], ["remove_small_objects", "label"],
                                   ["opening", "remove_small_objects", "label"]])
def test_pipeline_postprocess_keeps_geotiff_nodata(tmp_path, steps):
    """`tileseg run`: GeoTIFF with nodata -> otsu -> postprocess -> Zarr; nodata stays nodata, the rest
    equals the whole-image computation."""
    import yaml
    from click.testing import CliRunner

    from tileseg.cli import main

    raw = _geotiff_with_nodata(tmp_path / "scene.tif")
    post = [{"remove_small_objects": {"min_size_px": 20}} if s == "remove_small_objects" else
            {s: {"footprint": "disk", "radius": 1}} if s in ("opening", "closing") else s for s in steps]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "version": 1, "input": {"path": "scene.tif"}, "method": {"otsu": {}}, "tiling": {"chunks": [40, 40]},
        "postprocess": post, "output": {"path": "out.zarr", "writer": "zarr"},
        "execution": {"scheduler": "threads", "workers": 2}}))
    res = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tileseg.open(str(tmp_path / "out.zarr"))
    expected, nodata = _by_hand(raw, steps)
    assert out.nodata == nodata and out.dtype == expected.dtype
    got = np.asarray(out.data)
    assert (got[:50, :50] == nodata).all()
    np.testing.assert_array_equal(got, expected)
