"""GeoTIFF reader: lazy windowed reads equal rasterio's whole reads; metadata and errors name the file."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

import tileseg  # noqa: E402
from tileseg.errors import FormatError, ImageNotFoundError, InputError  # noqa: E402
from tileseg.readers import detect_reader, expand_inputs, open_image  # noqa: E402
from tileseg.readers.geotiff import GeoTiffReader, block_chunks  # noqa: E402

DESCRIPTIONS = ("blue", "green", "red", "nir")
TRANSFORM = Affine(30.0, 0.0, 694005.0, 0.0, -30.0, -2766615.0)


def write_tif(path, data, *, block=64, nodata=None, crs="EPSG:32621", transform=TRANSFORM, descriptions=None,
              overviews=(), compress="deflate", mask=None, scales=None, offsets=None, driver="GTiff"):
    """A tiled GeoTIFF holding ``data`` (bands, rows, cols); returns its path as str."""
    profile = dict(driver="GTiff", count=data.shape[0], height=data.shape[1], width=data.shape[2],
                   dtype=data.dtype, tiled=True, blockxsize=block, blockysize=block, compress=compress)
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions or ()):
            dst.set_band_description(i + 1, d)
        if scales is not None:
            dst.scales, dst.offsets = scales, offsets
        if mask is not None:
            dst.write_mask(mask.astype(np.uint8) * 255)
        dst.update_tags(SENSOR="synthetic")
        if overviews:
            dst.build_overviews(list(overviews))
    return str(path)


def scene(shape=(4, 300, 410), seed=0, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    base = (yy * 7 + xx * 3) % 997
    out = np.stack([base + 100 * b + rng.integers(1, 50, shape[1:]) for b in range(shape[0])])
    return out.astype(dtype)


@pytest.fixture
def tif(tmp_path):
    data = scene()
    data[:, :20, :30] = 0
    path = write_tif(tmp_path / "scene.tif", data, nodata=0, descriptions=DESCRIPTIONS, overviews=(2, 4))
    return path, data


def test_can_open_names_only():
    assert GeoTiffReader.can_open("a/b.TIF") and GeoTiffReader.can_open("https://h/x.tiff?sig=1")
    assert not GeoTiffReader.can_open("a/b.ome.tif") and not GeoTiffReader.can_open("a.zarr")
    assert detect_reader("s3://bucket/scene.tif") is GeoTiffReader


@pytest.mark.parametrize("bands", [None, [4, 3, 2], [2], ["red", "NIR"], "green", 3])
def test_lazy_windows_equal_rasterio_for_band_selections(tif, bands):
    path, data = tif
    img = tileseg.open(path, options={"bands": bands, "chunks": (100, 150)})
    with rasterio.open(path) as ds:
        names = [d.lower() for d in ds.descriptions]
        sel = [b if isinstance(b, int) else names.index(b.lower()) + 1 for b in
               ([bands] if isinstance(bands, (int, str)) else bands or range(1, 5))]
        want = ds.read(sel)
    assert img.axes == ("c", "y", "x") and img.shape == want.shape and img.dtype == want.dtype
    assert img.data.numblocks == (1, 3, 3)  # one task per window, nothing read yet
    np.testing.assert_array_equal(img.data.compute(), want)
    np.testing.assert_array_equal(want, data[[s - 1 for s in sel]])
    assert img.attrs["band_descriptions"] == [DESCRIPTIONS[s - 1] for s in sel]


def test_default_chunks_are_multiples_of_the_block(tif):
    path, _ = tif
    assert tileseg.open(path).data.chunks == ((4,), (300,), (410,))  # small: one window
    assert block_chunks((256, 256), (1860, 2041)) == (1024, 1024)
    assert block_chunks((200, 300), (5000, 5000)) == (1000, 900)
    assert block_chunks((16, 485), (373, 485)) == (373, 485)


@pytest.mark.parametrize("level", [1, 2, -1])
def test_overview_levels_equal_rasterio(tif, level):
    path, _ = tif
    img = tileseg.open(path, level=level)
    with rasterio.open(path, overview_level=(level % 3) - 1) as ds:
        want, transform = ds.read(), tuple(ds.transform)[:6]
    assert img.shape == want.shape and img.transform == pytest.approx(transform)
    np.testing.assert_array_equal(img.data.compute(), want)
    assert img.spacing == pytest.approx((abs(transform[4]), transform[0]))


def test_level_out_of_range_names_file_and_count(tif):
    path, _ = tif
    with pytest.raises(InputError, match=r"scene\.tif.* has 3 level\(s\)"):
        tileseg.open(path, level=3)


def test_georeferencing_equals_rasterio(tif):
    path, data = tif
    img = tileseg.open(path)
    with rasterio.open(path) as ds:
        assert img.crs == "EPSG:32621" and rasterio.crs.CRS.from_user_input(img.crs) == ds.crs
        assert img.transform == tuple(ds.transform)[:6] and img.nodata == ds.nodata == 0
        first_centre = ds.transform @ (0.5, 0.5)
        gdal_valid = ds.dataset_mask() > 0
    assert img.origin == pytest.approx((first_centre[1], first_centre[0]))
    assert img.spacing == (30.0, 30.0) and img.units == ("metre", "metre")
    assert img.direction == ((-1.0, 0.0), (0.0, 1.0))
    assert img.mask is None  # nodata only: Image.valid() applies it
    np.testing.assert_array_equal(img.valid().compute(), gdal_valid)  # GDAL's own rule
    assert img.attrs["tags"]["SENSOR"] == "synthetic" and img.attrs["band_colorinterp"][0] == "gray"
    assert img.reader_info["n_levels"] == 3 and img.format == "geotiff"


def test_internal_mask_becomes_lazy_mask(tmp_path):
    data = scene((3, 130, 150))
    mask = np.ones(data.shape[1:], bool)
    mask[40:90, 10:60] = False
    path = write_tif(tmp_path / "m.tif", data, mask=mask)
    img = tileseg.open(path, options={"chunks": 64, "bands": [3, 1]})
    with rasterio.open(path) as ds:
        want = ds.dataset_mask() != 0
    assert img.mask is not None and img.mask.chunks == ((64, 64, 2), (64, 64, 22))
    np.testing.assert_array_equal(img.mask.compute(), want)
    np.testing.assert_array_equal(want, mask)


def test_scale_offset(tmp_path):
    data = scene((2, 70, 90))
    data[:, 0, 0] = 7
    path = write_tif(tmp_path / "s.tif", data, nodata=7, scales=[0.5, 2.0], offsets=[1.0, -3.0])
    img = tileseg.open(path, options={"scale_offset": True})
    want = data.astype(np.float32) * np.array([0.5, 2.0], np.float32)[:, None, None]
    want += np.array([1.0, -3.0], np.float32)[:, None, None]
    want[:, 0, 0] = np.nan
    assert img.dtype == np.float32 and np.isnan(img.nodata)
    np.testing.assert_array_equal(img.data.compute(), want)
    assert img.attrs["applied_scales"] == [0.5, 2.0]


def test_directory_and_glob_inputs(tmp_path):
    for name in ("b.tif", "a.tiff"):
        write_tif(tmp_path / name, scene((1, 40, 50)))
    (tmp_path / "notes.txt").write_text("x")
    assert expand_inputs(str(tmp_path)) == [str(tmp_path / "a.tiff"), str(tmp_path / "b.tif")]
    assert expand_inputs(str(tmp_path / "*.tif")) == [str(tmp_path / "b.tif")]


# ---------------------------------------------------------------- bad inputs, each naming the file
def test_missing_file(tmp_path):
    with pytest.raises(ImageNotFoundError, match="nope.tif"):
        open_image(str(tmp_path / "nope.tif"), reader="geotiff")


def test_band_index_and_name_out_of_range(tif):
    path, _ = tif
    with pytest.raises(InputError, match=r"scene\.tif.*band 5 out of range.*4 band.*4='nir'"):
        tileseg.open(path, options={"bands": [1, 5]})
    with pytest.raises(InputError, match=r"scene\.tif.*no band described 'swir'.*1='blue'"):
        tileseg.open(path, options={"bands": ["swir"]})


def test_unsupported_dtype(tmp_path):
    data = (scene((1, 40, 40)).astype(np.float32) + 1j).astype(np.complex64)
    path = write_tif(tmp_path / "c.tif", data, compress=None)
    with pytest.raises(FormatError, match=r"c\.tif.*unsupported dtype 'complex64'"):
        tileseg.open(path)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_no_crs_is_allowed_with_a_warning(tmp_path, caplog):
    data = scene((1, 40, 50))
    path = write_tif(tmp_path / "plain.tif", data, crs=None)
    with caplog.at_level(logging.WARNING, logger="tileseg.readers.geotiff"):
        img = tileseg.open(path)
    assert "plain.tif has no CRS" in caplog.text
    assert img.crs is None and img.transform is None and img.spacing == (1.0, 1.0)
    np.testing.assert_array_equal(img.data.compute(), data)


def test_not_a_tiff(tmp_path):
    (tmp_path / "fake.tif").write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(FormatError, match=r"fake\.tif.*not a readable GeoTIFF"):
        tileseg.open(str(tmp_path / "fake.tif"))


def test_truncated_file_fails_at_compute_naming_file_and_window(tmp_path):
    data = scene((1, 512, 512))
    src = write_tif(tmp_path / "src.tif", data)
    cog = str(tmp_path / "cut.tif")
    from rasterio.shutil import copy

    copy(src, cog, driver="COG", blocksize=128, compress="deflate")
    size = os.path.getsize(cog)
    with open(cog, "r+b") as fh:
        fh.truncate(size // 2)
    img = tileseg.open(cog, options={"chunks": 128})  # the header is intact: open is fine
    with pytest.raises(InputError, match=r"cut\.tif.*cannot read window rows \d+:\d+, cols \d+:\d+"):
        img.data.compute(scheduler="sync")


def test_corrupt_tile_fails_at_compute_naming_file_and_window(tmp_path):
    data = scene((1, 256, 256))
    path = write_tif(tmp_path / "bad.tif", data)
    with rasterio.open(path) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_1_2", "TIFF", bidx=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_1_2", "TIFF", bidx=1))
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * size)
    img = tileseg.open(path, options={"chunks": 64})
    np.testing.assert_array_equal(img.data[:, :64].compute(), data[:, :64])  # other tiles are fine
    with pytest.raises(InputError, match=r"bad\.tif.*cannot read window rows 128:192, cols 64:128.*"):
        img.data.compute(scheduler="sync")


def test_size_budget_checked_on_metadata(tif):
    path, _ = tif
    with pytest.raises(InputError, match=r"scene\.tif.*over the budget"):
        tileseg.open(path, max_pixels=1000)


def test_end_to_end_run_keeps_crs_and_transform(tmp_path):
    from skimage.filters import threshold_otsu

    data = scene((2, 200, 230), seed=3)[::-1]
    write_tif(tmp_path / "in.tif", data, descriptions=("nir", "red"))
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: '*.tif', reader: auto, options: {bands: [red]}}\nmethod: otsu\n"
        "output: {path: 'out/{stem}.zarr', overwrite: true}\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        report = tileseg.run(tmp_path / "p.yaml", scheduler="synchronous")
    finally:
        os.chdir(cwd)
    assert report.ok, report.items[0].error
    out = tileseg.open(str(tmp_path / "out" / "in.zarr"))
    assert out.crs == "EPSG:32621" and out.transform == tuple(TRANSFORM)[:6]
    np.testing.assert_array_equal(np.squeeze(out.data.compute()), data[1] > threshold_otsu(data[1]))


def test_lazy_image_pickles_and_handles_stay_bounded(tmp_path):
    import pickle

    from tileseg.readers import _gdal

    paths = [write_tif(tmp_path / f"f{i}.tif", scene((1, 40, 50), seed=i)) for i in range(20)]
    for i, path in enumerate(paths):
        img = pickle.loads(pickle.dumps(tileseg.open(path)))  # what a distributed worker receives
        np.testing.assert_array_equal(img.data.compute(scheduler="sync"), scene((1, 40, 50), seed=i))
    assert len(_gdal._HANDLES.handles) == _gdal.MAX_HANDLES_PER_THREAD
    _gdal.close_handles()


def test_url_mapping_and_env_override(tif):
    from tileseg.readers._gdal import DEFAULT_ENV, gdal_path

    assert gdal_path("https://h/a.tif") == "/vsicurl/https://h/a.tif"
    assert gdal_path("s3://b/k/a.tif") == "/vsis3/b/k/a.tif" and gdal_path("gs://b/a.tif") == "/vsigs/b/a.tif"
    assert gdal_path("file:///d/a.tif") == "/d/a.tif" and gdal_path("/d/a.tif") == "/d/a.tif"
    with pytest.raises(InputError, match="unsupported URL scheme 'ftp'"):
        gdal_path("ftp://h/a.tif")
    assert DEFAULT_ENV["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR" and DEFAULT_ENV["VSI_CACHE"] == "TRUE"
    path, data = tif
    img = tileseg.open(path, options={"env": {"GDAL_HTTP_MAX_RETRY": "7"}})
    assert img.reader_info["env"]["GDAL_HTTP_MAX_RETRY"] == "7"
    assert img.reader_info["env"]["GDAL_HTTP_MERGE_CONSECUTIVE_RANGES"] == "YES"
    np.testing.assert_array_equal(img.data.compute(), data)
    with pytest.raises(tileseg.errors.ConfigError, match="unknown geotiff reader option"):
        tileseg.open(path, options={"bandz": [1]})


def test_band_count_different_from_the_models_channels_names_the_file(tmp_path):
    """A 4-band scene and a one-channel model: the item fails naming the file, other items go on."""
    torch = pytest.importorskip("torch")
    import warnings

    write_tif(tmp_path / "four.tif", scene((4, 64, 80)))
    write_tif(tmp_path / "one.tif", scene((1, 64, 80), seed=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(1, 2, 3, padding=1)), str(tmp_path / "m.pt"))
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: ['four.tif', 'one.tif']}\ntiling: {patch_size: [32, 32]}\n"
        "model: {torchscript: {path: m.pt}}\noutput: {path: 'out/{stem}.tif', writer: cog}\n")
    report = tileseg.run(tmp_path / "p.yaml", scheduler="synchronous")
    bad, good = report.items
    assert bad.status == "failed" and "four.tif" in bad.error and "expects 1 input channels" in bad.error
    assert "has 4" in bad.error and not (tmp_path / "out" / "four.tif").exists()
    assert good.status == "ok"
    with rasterio.open(tmp_path / "out" / "one.tif") as ds, rasterio.open(tmp_path / "one.tif") as src:
        assert ds.crs == src.crs and ds.transform == src.transform and ds.tags()["TILESEG_STATUS"] == "complete"
