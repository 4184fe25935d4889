"""The public API: segment returns images with geometry, write, xarray in/out, run called often."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

import tileseg
from tileseg.image import Image

RNG = np.random.default_rng(11)


def _box_model(batch: np.ndarray) -> np.ndarray:
    """Two-class logits from a 3x3 box mean (each output pixel depends on its neighbours)."""
    from scipy import ndimage as ndi

    x = batch[:, 0]
    mean = ndi.uniform_filter(x, size=(1,) + (3,) * (x.ndim - 1), mode="nearest")
    return np.stack([0.5 - mean, mean - 0.5], axis=1).astype(np.float32)


def _geo_image(shape=(70, 90)) -> Image:
    raw = RNG.random(shape, dtype=np.float32)
    return Image(
        da.from_array(raw, chunks=(32, 40)), axes=("y", "x"), spacing=(30.0, 30.0), origin=(4000015.0, 500015.0),
        units=("metre", "metre"), direction=((-1.0, 0.0), (0.0, 1.0)), crs="EPSG:32621",
        transform=(30.0, 0.0, 500000.0, 0.0, -30.0, 4000030.0), attrs={"scene": "LC08"}, source="mem://scene",
    )


def test_segment_returns_an_image_with_the_input_geometry():
    img = _geo_image()
    out = tileseg.segment(img, _box_model, patch_size=(32, 32), overlap=0.5, blend="crop", chunks=40,
                          class_names=["land", "water"])
    assert isinstance(out, Image)
    for key in ("spacing", "origin", "units", "direction", "crs", "transform", "attrs", "source"):
        assert getattr(out, key) == getattr(img, key), key
    assert out.axes == ("y", "x") and out.class_names == ("land", "water") and out.is_class_map
    assert out.nodata is None and out.reader_info == {}
    # crop blending with a receptive-field radius (1) <= overlap / 2 equals one whole-image forward
    whole = _box_model(img.data.compute()[None, None])[0]
    np.testing.assert_array_equal(out.data.compute(), np.argmax(whole, axis=0))
    prob = tileseg.segment(img, _box_model, patch_size=(32, 32), output="probabilities")
    assert prob.axes == ("c", "y", "x") and prob.class_names is None and prob.dtype == np.float32
    with pytest.raises(tileseg.errors.ModelError, match="class_names lists 3 classes"):
        tileseg.segment(img, _box_model, patch_size=(32, 32), class_names=["a", "b", "c"])


def test_nodata_and_mask_pixels_are_the_results_nodata():
    raw = RNG.random((60, 50), dtype=np.float32)
    raw[:10] = -9999.0
    mask = np.ones((60, 50), bool)
    mask[:, -7:] = False
    img = Image(da.from_array(raw, chunks=25), axes=("y", "x"), nodata=-9999.0, mask=da.from_array(mask, chunks=25))
    labels = tileseg.segment(img, _box_model, patch_size=(16, 16), chunks=20)
    valid = (raw != -9999.0) & mask
    got = labels.data.compute()
    assert labels.nodata == 255 and labels.dtype == np.uint8
    assert (got[~valid] == 255).all() and set(np.unique(got[valid])) <= {0, 1}
    probs = tileseg.segment(img, _box_model, patch_size=(16, 16), output="probabilities").data.compute()
    assert np.isnan(probs[:, ~valid]).all() and not np.isnan(probs[:, valid]).any()


def test_write_keeps_geometry_and_class_names(tmp_path):
    out = tileseg.segment(_geo_image(), _box_model, patch_size=(32, 32), class_names=["land", "water"])
    job = tileseg.write(out, tmp_path / "seg.zarr")
    assert job.done and tileseg.writers.is_complete(str(tmp_path / "seg.zarr"))
    back = tileseg.open(tmp_path / "seg.zarr")
    for key in ("spacing", "origin", "units", "direction", "crs", "transform", "class_names", "attrs"):
        assert getattr(back, key) == getattr(out, key), key
    np.testing.assert_array_equal(back.data.compute(), out.data.compute())
    with pytest.raises(tileseg.errors.OutputError, match="already exists"):
        tileseg.write(out, tmp_path / "seg.zarr")


def test_write_picks_the_writer_from_the_path_ending(tmp_path):
    """A .tif path gets a COG (georeferenced, read back by rasterio), not a Zarr folder named .tif; a .dcm path
    the DICOM SEG writer (which refuses an image without DICOM references) instead of a folder named .dcm."""
    rasterio = pytest.importorskip("rasterio", reason="the cog writer needs the 'geo' extra")
    out = tileseg.segment(_geo_image(), _box_model, patch_size=(32, 32), output="labels")
    tileseg.write(out, tmp_path / "seg.tif")
    assert (tmp_path / "seg.tif").is_file()
    with rasterio.open(tmp_path / "seg.tif") as ds:
        assert ds.crs.to_epsg() == 32621 and tuple(ds.transform)[:6] == out.transform
        np.testing.assert_array_equal(ds.read(1), out.data.compute())
    with pytest.raises(tileseg.errors.OutputError, match="seg.dcm.*dicom_seg writer"):
        tileseg.write(out, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()
    tileseg.write(out, tmp_path / "seg.dcm.zarr")  # an explicit store name stays Zarr
    assert tileseg.writers.is_complete(str(tmp_path / "seg.dcm.zarr"))


def test_pipeline_output_writer_defaults_from_the_path_ending():
    from tileseg.config.schema import OutputConfig

    assert OutputConfig(path="out/{stem}_seg.nii.gz").writer == "nifti"
    assert OutputConfig(path="out/{stem}.TIF").writer == "cog"
    assert OutputConfig(path="out/{stem}.zarr").writer == "zarr"
    assert OutputConfig(path="out/{stem}.tif", writer="zarr").writer == "zarr"  # given explicitly: kept


def test_run_stays_callable(tmp_path):
    import zarr

    zarr.create_array(str(tmp_path / "a.zarr"), shape=(40, 30), chunks=(16, 16), dtype="float32")[:] = (
        RNG.random((40, 30), dtype=np.float32))
    (tmp_path / "p.yaml").write_text("version: 1\ninput: {path: a.zarr}\nmethod: {otsu: {}}\n"
                                     "output: {path: 'out/{stem}.zarr'}\n")
    statuses = [tileseg.run(tmp_path / "p.yaml", scheduler="synchronous").items[0].status for _ in range(3)]
    assert statuses == ["ok", "skipped", "skipped"]
    assert callable(tileseg.run) and tileseg.run.__module__ == "tileseg.api"


def test_public_functions_show_their_real_signatures():
    import inspect

    for fn in (tileseg.open, tileseg.segment, tileseg.write, tileseg.run):
        params = inspect.signature(fn).parameters.values()
        assert not any(p.kind is p.VAR_KEYWORD for p in params), fn.__name__
    assert "patch_size" in inspect.signature(tileseg.segment).parameters


def test_xarray_in_xarray_out_keeps_dims_coords_attrs_and_crs():
    xr = pytest.importorskip("xarray")
    rioxarray = pytest.importorskip("rioxarray")  # noqa: F841 - registers the .rio accessor
    y = 4000015.0 - 30.0 * np.arange(64)
    x = 500015.0 + 30.0 * np.arange(80)
    raw = RNG.random((1, 64, 80), dtype=np.float32)
    arr = xr.DataArray(raw, dims=("band", "y", "x"), coords={"band": [1], "y": y, "x": x},
                       attrs={"long_name": "reflectance"}, name="scene").rio.write_crs("EPSG:32621")
    img = tileseg.open(arr)
    assert img.axes == ("c", "y", "x") and img.spacing == (30.0, 30.0) and img.origin == (4000015.0, 500015.0)
    assert img.direction == ((-1.0, 0.0), (0.0, 1.0))
    assert img.transform == tuple(arr.rio.transform())[:6]
    out = tileseg.segment(arr, _box_model, patch_size=(32, 32), overlap=0.5, blend="crop",
                          class_names=["land", "water"])
    assert isinstance(out, xr.DataArray) and out.dims == ("y", "x") and out.name == "scene"
    np.testing.assert_array_equal(out["y"].values, y)
    np.testing.assert_array_equal(out["x"].values, x)
    assert out.rio.crs == arr.rio.crs and out.rio.transform() == arr.rio.transform()
    assert out.attrs["long_name"] == "reflectance" and out.attrs["flag_meanings"] == "land water"
    whole = _box_model(raw[None])[0]
    np.testing.assert_array_equal(out.values, np.argmax(whole, axis=0))
    # dims in another order come back in that order; a dask-backed array stays lazy
    arr_t = arr.isel(band=0).transpose("x", "y").chunk({"x": 40})
    out_t = tileseg.segment(arr_t, _box_model, patch_size=(32, 32), output="probabilities")
    assert out_t.dims == ("class", "x", "y") and isinstance(out_t.data, da.Array)
