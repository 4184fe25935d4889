"""Vector writer: one polygon per object across chunk borders, exact rasterization back, CRS, completion."""

from __future__ import annotations

import hashlib
import os
import struct

import dask
import dask.array as da
import numpy as np
import pytest

pytest.importorskip("pyogrio", reason="the vector writer needs the 'vector' extra")
rasterio = pytest.importorskip("rasterio", reason="the vector writer needs the 'vector' extra")
ndi = pytest.importorskip("scipy.ndimage")

import pyogrio  # noqa: E402
import pyogrio.raw  # noqa: E402
from rasterio.features import rasterize  # noqa: E402

from tileseg.errors import OutputError  # noqa: E402
from tileseg.image import Image  # noqa: E402
from tileseg.stitching.labels import label  # noqa: E402
from tileseg.writers import get_writer, is_complete  # noqa: E402

CRS = "EPSG:32621"
TRANSFORM = (30.0, 0.0, 500010.0, 0.0, -30.0, 4000020.0)
NAMES = ("background", "water", "forest", "urban")


def scene(shape=(120, 130), smooth=5, seed=0):
    """A class map of blobs (with holes, diagonal contacts, objects across chunks) and a nodata corner."""
    rng = np.random.default_rng(seed)
    field = ndi.uniform_filter(rng.random(shape), smooth) if smooth else rng.random(shape)
    a = (np.digitize(field, np.quantile(field, [0.4, 0.6, 0.8]))).astype(np.uint8)
    a[:4, :5] = 255
    return a


def image_of(a, chunks):
    return Image(da.from_array(a, chunks=chunks), axes=("y", "x"), crs=CRS, transform=TRANSFORM, nodata=255,
                 class_names=NAMES)


def _ring(buf, k):
    (n,) = struct.unpack_from("<I", buf, k)
    pts = np.frombuffer(buf, "<f8", 2 * n, k + 4).reshape(n, 2)
    return [tuple(p) for p in pts.tolist()], k + 4 + 16 * n


def _polygon(buf, k):
    _, kind, n = struct.unpack_from("<BII", buf, k)
    assert kind == 3
    k += 9
    rings = []
    for _ in range(n):
        r, k = _ring(buf, k)
        rings.append(r)
    return rings, k


def geometry(wkb):
    """GeoJSON-like dict of a little-endian WKB Polygon or MultiPolygon (test helper, no shapely)."""
    _, kind = struct.unpack_from("<BI", wkb, 0)
    if kind == 3:
        return {"type": "Polygon", "coordinates": _polygon(wkb, 0)[0]}
    (n,) = struct.unpack_from("<I", wkb, 5)
    k, polys = 9, []
    for _ in range(n):
        p, k = _polygon(wkb, k)
        polys.append(p)
    return {"type": "MultiPolygon", "coordinates": polys}


def read_vector(path):
    meta, _, geoms, fields = pyogrio.raw.read(path)
    cols = dict(zip(meta["fields"].tolist(), fields))
    return meta, [geometry(g) for g in geoms], cols


def burn(geoms, values, shape):
    return rasterize(list(zip(geoms, values.tolist())), out_shape=shape, transform=rasterio.Affine(*TRANSFORM),
                     fill=0, dtype="int64")


def n_components(a):
    return sum(ndi.label(a == c)[1] for c in range(1, len(NAMES)))


@pytest.mark.parametrize("ext,chunks,smooth", [("gpkg", (37, 41), 5), ("geojson", (16, 24), 5),
                                               ("gpkg", (7, 9), 0)])
def test_polygons_rasterize_back_exactly_one_per_object(tmp_path, ext, chunks, smooth):
    a = scene(smooth=smooth)
    out = str(tmp_path / f"a.{ext}")
    get_writer("vector").write(image_of(a, chunks), out)
    assert os.listdir(tmp_path) == [f"a.{ext}"] and is_complete(out, writer="vector")
    meta, geoms, cols = read_vector(out)
    assert pyogrio.read_info(out)["crs"] == CRS
    expected = np.where(a == 255, 0, a)
    np.testing.assert_array_equal(burn(geoms, cols["class_id"], a.shape), expected)
    # one feature per connected component (4-connectivity per class), even across chunk borders
    assert len(geoms) == n_components(expected)
    lab, n = label(da.from_array(expected, chunks=chunks), by_value=True)
    lab = lab.compute()
    crossing = [i for i in range(1, n + 1) if len({(y // chunks[0], x // chunks[1]) for y, x in np.argwhere(lab == i)}) > 1]
    assert len(crossing) > 5  # the test exercises merging
    np.testing.assert_array_equal(burn(geoms, cols["label"], a.shape), lab)  # labels: raster order, as label()
    np.testing.assert_array_equal(cols["label"], np.arange(1, n + 1))
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:] * 900.0
    np.testing.assert_array_equal(cols["area"], areas)
    assert list(cols["class"]) == [NAMES[c] for c in cols["class_id"]]
    assert 0 not in cols["class_id"] and 255 not in cols["class_id"]


def test_simplify_reduces_vertices_keeps_area(tmp_path):
    a = scene(shape=(90, 100), smooth=9)
    exact, simple = str(tmp_path / "e.gpkg"), str(tmp_path / "s.gpkg")
    get_writer("vector").write(image_of(a, 32), exact)
    get_writer("vector").write(image_of(a, 32), simple, options={"simplify_tolerance": 45.0})
    (_, g0, c0), (_, g1, c1) = read_vector(exact), read_vector(simple)
    count = lambda gs: sum(len(r) for g in gs for r in g["coordinates"])  # noqa: E731 (Polygon layer)
    assert len(g0) == len(g1) and count(g1) < 0.8 * count(g0)
    np.testing.assert_array_equal(c0["area"], c1["area"])


def digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            with open(os.path.join(dirpath, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_write_task_twice_identical_and_nothing_before_finalize(tmp_path):
    a = scene()
    image = image_of(a, 40)
    w = get_writer("vector")
    handle = w.prepare(image, str(tmp_path / "a.gpkg"))
    dask.compute(w.write_task(handle, image))
    first = digest(handle.target)
    dask.compute(w.write_task(handle, image))
    assert digest(handle.target) == first
    assert not os.path.exists(tmp_path / "a.gpkg") and not is_complete(str(tmp_path / "a.gpkg"), writer="vector")
    w.finalize(handle)
    assert os.listdir(tmp_path) == ["a.gpkg"] and is_complete(str(tmp_path / "a.gpkg"), writer="vector")


def _boom(block, block_info=None):
    if block_info[0]["chunk-location"] == (1, 1):
        raise RuntimeError("boom")
    return block


def test_failure_mid_write_leaves_nothing(tmp_path):
    image = image_of(scene(), 40)
    bad = image.with_data(image.data.map_blocks(_boom, dtype=image.dtype))
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="boom"):
        get_writer("vector").write(bad, str(tmp_path / "a.gpkg"))
    assert os.listdir(tmp_path) == [] and not is_complete(str(tmp_path / "a.gpkg"), writer="vector")


@pytest.mark.parametrize("ext", ["gpkg", "geojson"])
def test_foreign_vector_file_not_complete_nor_replaced(tmp_path, ext):
    out = tmp_path / f"a.{ext}"
    square = struct.pack("<BII", 1, 3, 1) + struct.pack("<I", 5) + np.array(
        [0, 0, 1, 0, 1, 1, 0, 1, 0, 0], "<f8").tobytes()
    pyogrio.raw.write(str(out), np.array([square], dtype=object), [np.array([1])], ["x"],
                      geometry_type="Polygon", crs=CRS)
    before = out.read_bytes()
    assert not is_complete(str(out), writer="vector")
    image = image_of(scene(shape=(30, 30)), 16)
    with pytest.raises(OutputError, match="already exists"):
        get_writer("vector").write(image, str(out))
    assert out.read_bytes() == before and os.listdir(tmp_path) == [f"a.{ext}"]
    get_writer("vector").write(image, str(out), overwrite=True)
    assert is_complete(str(out), writer="vector")
    with pytest.raises(OutputError, match="finished tileseg output"):
        get_writer("vector").write(image, str(out))


def test_never_replaces_a_non_vector_file_and_checks_input(tmp_path):
    out = tmp_path / "a.gpkg"
    out.write_text("not a geopackage")
    image = image_of(scene(shape=(30, 30)), 16)
    with pytest.raises(OutputError, match="not a GPKG"):
        get_writer("vector").write(image, str(out), overwrite=True)
    assert out.read_text() == "not a geopackage" and not is_complete(str(out), writer="vector")
    with pytest.raises(OutputError, match=".gpkg or .geojson"):
        get_writer("vector").write(image, str(tmp_path / "a.shp"))
    prob = Image(da.zeros((2, 8, 8), dtype="float32"), axes=("c", "y", "x"))
    with pytest.raises(OutputError, match="integer class map"):
        get_writer("vector").write(prob, str(tmp_path / "p.gpkg"))


def test_pipeline_outputs_cog_and_vector(tmp_path):
    """One run writes the class map as a COG and its polygons, from a georeferenced Zarr input."""
    pytest.importorskip("skimage")
    pytest.importorskip("rio_cogeo")
    from rio_cogeo.cogeo import cog_validate
    from skimage.filters import threshold_otsu

    import tileseg
    from tileseg.runner import run_pipeline

    rng = np.random.default_rng(4)
    field = ndi.uniform_filter(rng.random((150, 170)), 7)
    intensity = (field * 1000).astype(np.float32)
    src = Image(da.from_array(intensity, chunks=64), axes=("y", "x"), crs=CRS, transform=TRANSFORM)
    tileseg.write(src, tmp_path / "scene.zarr")
    (tmp_path / "p.yaml").write_text(
        "version: 1\ninput: {path: scene.zarr}\nmethod: otsu\ntiling: {chunks: [48, 56]}\n"
        "outputs: [{path: 'out/{stem}.tif', writer: cog, options: {blocksize: 64}},\n"
        "          {path: 'out/{stem}.gpkg', writer: vector}]\n")
    report = run_pipeline(tmp_path / "p.yaml", scheduler="threads")
    assert report.ok, report.items[0].error
    tif, gpkg = report.items[0].outputs
    assert tif.endswith("scene.tif") and gpkg.endswith("scene.gpkg")
    expected = (intensity > threshold_otsu(intensity)).astype(np.uint8)
    assert is_complete(tif, writer="cog") and is_complete(gpkg, writer="vector")
    assert cog_validate(tif)[0]
    with rasterio.open(tif) as ds:
        np.testing.assert_array_equal(ds.read(1), expected)
        assert ds.crs == rasterio.crs.CRS.from_user_input(CRS) and tuple(ds.transform)[:6] == TRANSFORM
        assert ds.colormap(1) and "CLASS_NAMES" in ds.tags()
    _, geoms, cols = read_vector(gpkg)
    assert len(geoms) == ndi.label(expected)[1] and pyogrio.read_info(gpkg)["crs"] == CRS
    np.testing.assert_array_equal(burn(geoms, cols["class_id"], expected.shape), expected)
    again = run_pipeline(tmp_path / "p.yaml", scheduler="threads")  # resumable: both recorded complete
    assert again.items[0].status == "skipped"
