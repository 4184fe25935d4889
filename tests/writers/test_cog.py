"""COG writer: georeferencing, values, class names and colours, idempotence, recorded completion, streaming."""

from __future__ import annotations

import hashlib
import os

import dask
import dask.array as da
import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio", reason="the cog writer needs the 'geo' extra")
cogeo = pytest.importorskip("rio_cogeo.cogeo", reason="the cog writer needs the 'geo' extra")

from tileseg.errors import ConfigError, OutputError  # noqa: E402
from tileseg.image import Image  # noqa: E402
from tileseg.writers import get_writer, is_complete  # noqa: E402

CRS = "EPSG:32621"
TRANSFORM = (30.0, 0.0, 500010.0, 0.0, -30.0, 4000020.0)
NAMES = ("background", "water", "forest", "urban")
RNG = np.random.default_rng(3)


def class_map(shape=(300, 260), chunks=(96, 112), nodata=255):
    ref = RNG.integers(0, len(NAMES), size=shape).astype(np.uint8)
    ref[:7, :11] = nodata
    image = Image(da.from_array(ref, chunks=chunks), axes=("y", "x"), crs=CRS, transform=TRANSFORM,
                  nodata=nodata, class_names=NAMES)
    return ref, image


def probabilities(shape=(2, 300, 260), nodata=None):
    ref = RNG.random(shape).astype(np.float32)
    ref[:, 0, 0] = (0.0, 1.0)
    if nodata is not None:
        ref[:, 5:9, 20:30] = nodata
    image = Image(da.from_array(ref, chunks=(2, 128, 100)), axes=("c", "y", "x"), crs=CRS, transform=TRANSFORM,
                  nodata=nodata, class_names=NAMES[:2])
    return ref, image


def digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            full = os.path.join(dirpath, f)
            h.update(os.path.relpath(full, root).encode())
            with open(full, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_class_map_georeferencing_values_names_colours(tmp_path):
    ref, image = class_map()
    out = tmp_path / "classes.tif"
    get_writer("cog").write(image, str(out), options={"blocksize": 64})
    assert os.listdir(tmp_path) == ["classes.tif"]  # partial folder removed
    valid, errors, _ = cogeo.cog_validate(str(out))
    assert valid, errors
    with rasterio.open(out) as src:
        assert src.crs == rasterio.crs.CRS.from_user_input(CRS)
        assert tuple(src.transform)[:6] == TRANSFORM
        assert (src.height, src.width, src.count) == ref.shape + (1,)
        assert src.nodata == 255 and src.dtypes == ("uint8",)
        assert src.overviews(1), "no overviews"
        assert src.block_shapes == [(64, 64)]
        np.testing.assert_array_equal(src.read(1), ref)
        tags = src.tags()
        assert tags["TILESEG_STATUS"] == "complete" and tags["CLASS_NAMES"] == '["background", "water", "forest", "urban"]'
        assert src.descriptions == ("classes: background, water, forest, urban",)
        cmap = src.colormap(1)
    colours = [cmap[i] for i in range(len(NAMES))]
    assert len(set(colours)) == len(NAMES) and all(c[3] == 255 for c in colours)
    assert cmap[255][3] == 0  # nodata transparent
    assert is_complete(str(out), writer="cog")


@pytest.mark.parametrize("as_", ["float32", "float16", "uint8"])
def test_probabilities_as(tmp_path, as_):
    ref, image = probabilities()
    out = tmp_path / "p.tif"
    get_writer("cog").write(image, str(out), options={"blocksize": 64, "probabilities_as": as_})
    assert cogeo.cog_validate(str(out))[0]
    with rasterio.open(out) as src:
        got = src.read()
        assert src.count == 2 and src.descriptions == NAMES[:2]
        assert src.crs == rasterio.crs.CRS.from_user_input(CRS) and tuple(src.transform)[:6] == TRANSFORM
        assert src.nodata is None and src.overviews(1)
        if as_ == "uint8":
            assert src.dtypes == ("uint8",) * 2 and src.scales == (1 / 255,) * 2
            np.testing.assert_array_equal(got, np.rint(ref * 255).astype(np.uint8))
        else:  # float16 is stored as Float32 with NBITS=16 (GDAL < 3.11 has no Float16 type)
            assert src.dtypes == ("float32",) * 2
            want = ref.astype(np.float16).astype(np.float32) if as_ == "float16" else ref
            np.testing.assert_array_equal(got, want)
            assert src.tags(1, "IMAGE_STRUCTURE").get("NBITS") == ("16" if as_ == "float16" else None)


def test_uint8_probabilities_keep_nodata(tmp_path):
    ref, image = probabilities(nodata=float("nan"))
    out = tmp_path / "p.tif"
    get_writer("cog").write(image, str(out), options={"blocksize": 64, "probabilities_as": "uint8"})
    with rasterio.open(out) as src:
        got = src.read()
        assert src.nodata == 255 and src.scales == (1 / 254,) * 2
    bad = np.isnan(ref)
    np.testing.assert_array_equal(got[bad], 255)
    np.testing.assert_array_equal(got[~bad], np.rint(ref[~bad] * 254))


def test_float_nodata_round_trips(tmp_path):
    ref, image = probabilities(nodata=-1.0)
    out = tmp_path / "p.tif"
    get_writer("cog").write(image, str(out), options={"blocksize": 64, "compress": "zstd", "predictor": 3})
    with rasterio.open(out) as src:
        assert src.nodata == -1.0 and src.compression.name.lower() == "zstd"
        np.testing.assert_array_equal(src.read(), ref)


def test_write_task_twice_gives_identical_store(tmp_path):
    ref, image = class_map(chunks=(100, 100))  # dask chunks not aligned with the 64 blocks: rechunked
    w = get_writer("cog")
    handle = w.prepare(image, str(tmp_path / "a.tif"), blocksize=64)
    assert handle.chunks == (64, 64)
    dask.compute(w.write_task(handle, image))
    first = digest(handle.target)
    dask.compute(w.write_task(handle, image))
    assert digest(handle.target) == first
    assert not os.path.exists(tmp_path / "a.tif")  # nothing at the final path before finalize
    w.finalize(handle, {"run_id": "x"})
    with rasterio.open(tmp_path / "a.tif") as src:
        np.testing.assert_array_equal(src.read(1), ref)
    assert not os.path.exists(handle.target)


def _boom(block, block_info=None):
    if block_info[0]["chunk-location"] == (1, 1):
        raise RuntimeError("boom")
    return block


def test_failure_mid_write_leaves_nothing(tmp_path):
    ref, image = class_map()
    bad = image.with_data(image.data.map_blocks(_boom, dtype=image.dtype))
    out = tmp_path / "a.tif"
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="boom"):
        get_writer("cog").write(bad, str(out), options={"blocksize": 64})
    assert os.listdir(tmp_path) == [] and not is_complete(str(out), writer="cog")


def test_failure_while_building_the_cog_leaves_nothing(tmp_path, monkeypatch):
    import rasterio.shutil

    ref, image = class_map()
    w = get_writer("cog")
    handle = w.prepare(image, str(tmp_path / "a.tif"), blocksize=64)
    dask.compute(w.write_task(handle, image))

    def fail(*args, **kwargs):
        raise rasterio.errors.RasterioIOError("disk full")

    monkeypatch.setattr(rasterio.shutil, "copy", fail)
    with pytest.raises(OutputError, match="disk full"):
        w.finalize(handle)
    w.abort(handle)
    assert os.listdir(tmp_path) == [] and not is_complete(str(tmp_path / "a.tif"), writer="cog")


def test_foreign_geotiff_is_not_complete_nor_replaced_without_overwrite(tmp_path):
    out = tmp_path / "a.tif"
    with rasterio.open(out, "w", driver="GTiff", width=4, height=3, count=1, dtype="uint8") as dst:
        dst.write(np.ones((1, 3, 4), np.uint8))
        dst.update_tags(TILESEG_STATUS="incomplete")
    before = out.read_bytes()
    assert not is_complete(str(out), writer="cog")
    ref, image = class_map()
    with pytest.raises(OutputError, match="already exists"):
        get_writer("cog").write(image, str(out), options={"blocksize": 64})
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["a.tif"]
    get_writer("cog").write(image, str(out), overwrite=True, options={"blocksize": 64})
    assert is_complete(str(out), writer="cog")
    # a finished output is not replaced without overwrite either
    with pytest.raises(OutputError, match="finished tileseg output"):
        get_writer("cog").write(image, str(out))


@pytest.mark.parametrize("kind", ["text", "dir", "png"])
def test_never_replaces_a_non_geotiff(tmp_path, kind):
    out = tmp_path / "a.tif"
    if kind == "text":
        out.write_text("my notes")
    elif kind == "dir":
        out.mkdir()
    else:
        with rasterio.open(out, "w", driver="PNG", width=4, height=3, count=1, dtype="uint8") as dst:
            dst.write(np.ones((1, 3, 4), np.uint8))
    ref, image = class_map()
    with pytest.raises(OutputError, match="not a GeoTIFF"):
        get_writer("cog").write(image, str(out), overwrite=True)
    assert not is_complete(str(out), writer="cog")
    assert sorted(os.listdir(tmp_path))[0] == "a.tif" and not any(".partial-" in n for n in os.listdir(tmp_path))


def test_api_write_round_trip(tmp_path):
    import tileseg

    ref, image = class_map(shape=(70, 90), chunks=32)
    job = tileseg.write(image, tmp_path / "x.tif", writer="cog")
    assert job.done and is_complete(str(tmp_path / "x.tif"), writer="cog")
    with rasterio.open(tmp_path / "x.tif") as src:
        np.testing.assert_array_equal(src.read(1), ref)
        assert src.crs == rasterio.crs.CRS.from_user_input(CRS) and src.nodata == 255


def test_finalize_streams_block_by_block(tmp_path, monkeypatch):
    """finalize reads the partial store one chunk at a time (never the whole scene)."""
    from tileseg.writers import cog_build

    ref, image = probabilities(shape=(2, 300, 260))
    sizes = []
    real = cog_build.read_block
    monkeypatch.setattr(cog_build, "read_block", lambda arr, sel: sizes.append(real(arr, sel).size) or real(arr, sel))
    get_writer("cog").write(image, str(tmp_path / "p.tif"), options={"blocksize": 64})
    assert len(sizes) == 5 * 5  # ceil(300/64) x ceil(260/64) blocks
    assert max(sizes) == 2 * 64 * 64 and sum(sizes) == ref.size


def test_options_are_checked(tmp_path):
    ref, image = class_map()
    w = get_writer("cog")
    for bad in ({"compress": "jpeg"}, {"blocksize": 100}, {"probabilities_as": "int8"},
                {"overview_resampling": "median"}, {"predictor": 5}, {"predictor": True}):
        with pytest.raises(ConfigError):
            w.write(image, str(tmp_path / "a.tif"), options=bad)
    with pytest.raises(ConfigError, match="did you mean 'blocksize'"):
        w.write(image, str(tmp_path / "a.tif"), options={"blocksiz": 64})
    with pytest.raises(OutputError, match="local files only"):
        w.write(image, "memory://a.tif")
    vol = Image(da.zeros((2, 8, 8), dtype="uint8"), axes=("z", "y", "x"))
    with pytest.raises(OutputError, match="2-D"):
        w.write(vol, str(tmp_path / "v.tif"))
    assert os.listdir(tmp_path) == []


def test_image_without_transform_uses_spacing_and_origin(tmp_path):
    data = da.from_array(np.arange(64 * 48, dtype=np.int32).reshape(64, 48), chunks=32)
    image = Image(data, axes=("y", "x"), spacing=(2.0, 3.0), origin=(101.0, 11.5))
    get_writer("cog").write(image, str(tmp_path / "a.tif"), options={"blocksize": 16})
    with rasterio.open(tmp_path / "a.tif") as src:
        assert tuple(src.transform)[:6] == image.affine and src.crs is None and src.dtypes == ("int32",)
        np.testing.assert_array_equal(src.read(1), data.compute())
