"""Areas of interest: vector polygons and raster masks narrow the validity, patches outside are skipped."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest

import tileseg
from tileseg.aoi import apply_aoi
from tileseg.image import Image

pytest.importorskip("rasterio")
pytest.importorskip("pyogrio")
pytest.importorskip("shapely")

TRANSFORM = (10.0, 0.0, 399960.0, 0.0, -10.0, 5600040.0)


def _image(shape=(120, 140)):
    raw = np.random.default_rng(0).random(shape, dtype=np.float32)
    return Image(da.from_array(raw, chunks=(50, 45)), axes=("y", "x"), crs="EPSG:32633", transform=TRANSFORM)


def _polygon_lonlat():
    """A triangle given in WGS84 (the AOI's CRS differs from the image's)."""
    from rasterio.warp import transform

    xs, ys = [400000.0, 401200.0, 400300.0, 400000.0], [5599900.0, 5599500.0, 5598900.0, 5599900.0]
    lon, lat = transform("EPSG:32633", "EPSG:4326", xs, ys)
    return {"type": "Polygon", "coordinates": [list(zip(lon, lat))]}, list(zip(xs, ys))


def test_vector_aoi_equals_rasterio_on_the_whole_grid(tmp_path):
    from rasterio import Affine
    from rasterio.features import rasterize
    from rasterio.warp import transform_geom

    geom, _ = _polygon_lonlat()
    fc = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}},
          "features": [{"type": "Feature", "properties": {"id": 1}, "geometry": geom}]}
    (tmp_path / "aoi.geojson").write_text(json.dumps(fc))
    img = apply_aoi(_image(), tmp_path / "aoi.geojson")
    got = img.mask.compute()
    whole = rasterize([transform_geom("EPSG:4326", "EPSG:32633", geom)], out_shape=(120, 140),
                      transform=Affine(*TRANSFORM), dtype="uint8").astype(bool)
    np.testing.assert_array_equal(got, whole)
    assert 500 < got.sum() < 0.5 * got.size  # crosses chunk borders, not trivial


def test_raster_aoi_and_errors(tmp_path):
    inside = np.zeros((120, 140), np.uint8)
    inside[10:60, 30:100] = 1
    tileseg.write(Image(da.from_array(inside, chunks=40), axes=("y", "x")), tmp_path / "m.zarr")
    img = _image()
    img = img.with_data(img.data, mask=da.from_array(np.arange(140) < 90, chunks=45)[None, :].repeat(120, 0))
    out = apply_aoi(img, tmp_path / "m.zarr")
    np.testing.assert_array_equal(out.mask.compute(), (inside == 1) & (np.arange(140) < 90)[None, :])
    tileseg.write(Image(da.zeros((5, 5), dtype=np.uint8, chunks=5), axes=("y", "x")), tmp_path / "small.zarr")
    with pytest.raises(tileseg.errors.InputError, match=r"small\.zarr.*on the image's grid"):
        apply_aoi(_image(), tmp_path / "small.zarr")
    (tmp_path / "empty.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(tileseg.errors.InputError, match="no geometry"):
        apply_aoi(_image(), tmp_path / "empty.geojson")
    with pytest.raises(tileseg.errors.InputError, match="no CRS"):
        apply_aoi(Image(da.zeros((8, 8)), axes=("y", "x")), tmp_path / "empty.geojson")


def test_pipeline_aoi_skips_patches_outside(tmp_path):
    _, xy = _polygon_lonlat()
    fc = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "EPSG:32633"}},
          "features": [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [xy]}}]}
    (tmp_path / "a_aoi.geojson").write_text(json.dumps(fc))
    tileseg.write(_image(), tmp_path / "a.zarr")
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: a.zarr, aoi: '{stem}_aoi.geojson'}\nmethod: {fixed: {threshold: 0.5}}\n"
        "output: {path: 'out/{stem}.zarr'}\n")
    report = tileseg.run(tmp_path / "p.yaml", scheduler="synchronous")
    assert report.ok, report.items[0].error
    cfg = tileseg.load_pipeline(tmp_path / "p.yaml")
    assert cfg.input.aoi == str(tmp_path / "{stem}_aoi.geojson")
    # the method's statistics and classes cover the AOI only; the output keeps the image's geometry
    out = tileseg.open(tmp_path / "out" / "a.zarr")
    assert out.crs == "EPSG:32633" and out.transform == TRANSFORM
    inside = apply_aoi(_image(), tmp_path / "a_aoi.geojson").mask.compute()
    got = out.data.compute()
    raw = _image().data.compute()
    assert out.nodata == 255 and (got[~inside] == 255).all()
    np.testing.assert_array_equal(got[inside], (raw[inside] > 0.5).astype(np.uint8))
